#!/usr/bin/env bash
# club-agent installer: turns a fresh Raspberry Pi OS / Debian 12 into a running, claimed, supervised agent.
#
#   sudo provisioning/setup.sh --site "Arena Beira-Mar" --court c1="Quadra 1" --court c2="Quadra 2" \
#       --claim-token TOKEN
#
# Safe to run again at any time: every step checks what is there first and says "unchanged" when it is right,
# so a re-run repairs what is wrong (modes, owners, a missing unit) and upgrades the agent from this checkout.
# Run with --help for every option. Exit status: 0 installed and healthy; 3 installed, but something still
# needs the installer (listed at the end: no claim, a doctor FAIL, ...); 1 a step failed; 2 bad usage.
set -Eeuo pipefail
umask 022

readonly SERVICE=club-agent
readonly SERVICE_USER=club-agent
readonly APP_DIR=/opt/club-agent
readonly VENV=$APP_DIR/venv
readonly SHARE_DIR=$APP_DIR/share
readonly INSTALL_STAMP=$VENV/.club-agent-install
readonly CONF_DIR=/etc/club-agent
readonly CONF=$CONF_DIR/agent.toml
readonly SECRETS=$CONF_DIR/secrets.toml
readonly CLAIM_STAMP=$CONF_DIR/.claimed
readonly DATA_DIR=/var/lib/club-agent
readonly RING_DIR=/run/club-agent/ring
readonly UNIT=/etc/systemd/system/$SERVICE.service
readonly UNIT_WANTS=/etc/systemd/system/multi-user.target.wants/$SERVICE.service
readonly UDEV_RULES=/etc/udev/rules.d/70-club-agent-readers.rules
readonly MODPROBE_CONF=/etc/modprobe.d/club-agent-nfc.conf
readonly MODULES_LOAD=/etc/modules-load.d/club-agent.conf
readonly NFC_MODULES=(port100 pn533_usb pn533 pn532_uart nfc)
readonly SERIAL_MODULES=(usbserial cdc_acm)
# Debian's static ids (base-passwd) for the groups a fresh --root prefix is seeded with.
readonly SEED_GROUPS=(dialout:20 video:44 plugdev:46)

SRC_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
readonly SRC_DIR

usage() {
    cat <<'EOF'
Usage: sudo provisioning/setup.sh [OPTIONS]

Installs club-agent on this Raspberry Pi OS / Debian 12 machine from this checkout, and tells you plainly
what is still wrong. Safe to run again: what is already right is left alone ("unchanged").

Steps: checks the OS and Python; installs Debian packages (ffmpeg, libusb, sqlite3, python3-venv; mosquitto
with --with-mosquitto); creates the system user club-agent (groups dialout, plugdev, video); installs the agent
into /opt/club-agent/venv; writes /etc/club-agent/agent.toml and secrets.toml (0600) if they do not exist;
installs the readers' udev rules and the NFC driver blacklist; installs and enables club-agent.service; claims
the device with the cloud; starts the agent; runs `club-agent doctor`; prints a summary.

Site:
  --site NAME             the club's name shown on tablets ([agent] name)         (prompted when missing)
  --court [ID=]NAME       a court; repeat for each. Without ID= the ids are c1, c2, ... in order. Use the ids
                          Ziggy knows when the club has Ziggy.                     (prompted when missing)
  --club-id ID            [agent] club_id (default club-001; the claim may set it)
  --agent-id ID           [agent] agent_id (default edge-01)
  --timezone TZ           the club's IANA time zone (default America/Sao_Paulo)
  --language pt-BR|en     what the readers say (default pt-BR)
  --claim-token TOKEN     the claim token from the club's cloud account (or CLUB_AGENT_CLAIM_TOKEN in the
                          environment, or prompted). Without one the claim is skipped, and said so.
  --cloud-url URL         the club cloud's address for the claim, when agent.toml has no [cloud] base_url yet
  (--site, --court and the ids only shape a NEW agent.toml: an existing one is kept as it is.)

Install:
  --wheelhouse DIR        install the agent's Python packages from this directory only (no internet:
                          pip install --no-index --find-links DIR); make one with
                          pip wheel -w DIR 'setuptools>=77' <the dependencies of pyproject.toml>
  --python PATH           the Python for the venv (default /usr/bin/python3, 3.11 or newer)
  --with-mosquitto        also install Debian's mosquitto (for broker.mode = "external"); left disabled
  --keywedge              USB keyboard-wedge readers: the evdev extra (built with gcc) and the input group
  --no-start              install and enable, but do not start or restart the service

Modes:
  --root DIR              install under DIR instead of / (tests, image building): no packages are installed,
                          nothing is started, systemctl and udev of this machine are not touched; the user is
                          created in DIR/etc/passwd (useradd --prefix), seeded with root and the reader groups
  --dry-run               print what would be done, change nothing
  -y, --yes               never prompt (also when standard input is not a terminal)
  --uninstall             stop and remove the service, the agent, the udev and modprobe files; keeps
                          /etc/club-agent, /var/lib/club-agent and the user
  --purge                 with --uninstall: also remove the configuration, the data and the user
  -h, --help              this help

After an error: fix what the message says and run the same command again.
EOF
}

die_usage() {
    printf 'setup.sh: %s (see --help)\n' "$1" >&2
    exit 2
}

# ---------------------------------------------------------------------------------------------------------------
# Options
ROOT=""
DRY_RUN=0
ASSUME_YES=0
UNINSTALL=0
PURGE=0
NO_START=0
WITH_MOSQUITTO=0
KEYWEDGE=0
WHEELHOUSE=""
PYTHON=/usr/bin/python3
SITE=""
CLUB_ID=""
AGENT_ID=""
TIMEZONE=""
LANGUAGE=""
CLAIM_TOKEN=${CLUB_AGENT_CLAIM_TOKEN:-}
CLOUD_URL=""
COURTS=()

need_arg() {
    [[ $# -ge 2 && -n $2 ]] || die_usage "$1 needs a value"
}

while [[ $# -gt 0 ]]; do
    case $1 in
        -h | --help) usage; exit 0 ;;
        --root) need_arg "$@"; ROOT=$2; shift ;;
        --dry-run) DRY_RUN=1 ;;
        -y | --yes) ASSUME_YES=1 ;;
        --uninstall) UNINSTALL=1 ;;
        --purge) PURGE=1 ;;
        --no-start) NO_START=1 ;;
        --with-mosquitto) WITH_MOSQUITTO=1 ;;
        --keywedge) KEYWEDGE=1 ;;
        --wheelhouse) need_arg "$@"; WHEELHOUSE=$2; shift ;;
        --python) need_arg "$@"; PYTHON=$2; shift ;;
        --site) need_arg "$@"; SITE=$2; shift ;;
        --court) need_arg "$@"; COURTS+=("$2"); shift ;;
        --club-id) need_arg "$@"; CLUB_ID=$2; shift ;;
        --agent-id) need_arg "$@"; AGENT_ID=$2; shift ;;
        --timezone) need_arg "$@"; TIMEZONE=$2; shift ;;
        --language) need_arg "$@"; LANGUAGE=$2; shift ;;
        --claim-token) need_arg "$@"; CLAIM_TOKEN=$2; shift ;;
        --cloud-url) need_arg "$@"; CLOUD_URL=$2; shift ;;
        *) die_usage "unknown option '$1'" ;;
    esac
    shift
done

if [[ -n $ROOT ]]; then
    [[ $ROOT == /* ]] || die_usage "--root needs an absolute path"
    ROOT=${ROOT%/}
fi
[[ $PURGE == 0 || $UNINSTALL == 1 ]] || die_usage "--purge goes with --uninstall"
if [[ -n $WHEELHOUSE ]]; then
    [[ -d $WHEELHOUSE ]] || die_usage "--wheelhouse $WHEELHOUSE is not a directory"
    WHEELHOUSE=$(cd -- "$WHEELHOUSE" && pwd)
fi
case $LANGUAGE in "" | pt-BR | en) ;; *) die_usage "--language is pt-BR or en" ;; esac

INTERACTIVE=0
if [[ $ASSUME_YES == 0 && $DRY_RUN == 0 && -t 0 ]]; then
    INTERACTIVE=1
fi

# ---------------------------------------------------------------------------------------------------------------
# Output, steps and the summary

if [[ -t 1 ]]; then
    BOLD=$'\e[1m' RED=$'\e[31m' GREEN=$'\e[32m' YELLOW=$'\e[33m' RESET=$'\e[0m'
else
    BOLD="" RED="" GREEN="" YELLOW="" RESET=""
fi

STEP_NO=0
STEP_TOTAL=12
STEP_NAME=""
STEP_CHANGES=()
SUMMARY=()
PROBLEMS=()

say() { printf '    %s\n' "$*"; }
warn() { printf '    %swarning:%s %s\n' "$YELLOW" "$RESET" "$*"; }

step() {
    STEP_NO=$((STEP_NO + 1))
    STEP_NAME=$1
    STEP_CHANGES=()
    printf '%s==> [%d/%d] %s%s\n' "$BOLD" "$STEP_NO" "$STEP_TOTAL" "$STEP_NAME" "$RESET"
}

# A change made (or, with --dry-run, one that would be made) in the current step.
changed() {
    STEP_CHANGES+=("$1")
    if [[ $DRY_RUN == 1 ]]; then
        say "would: $1"
    else
        say "done: $1"
    fi
}

# The step's result for the summary: "changed" (listing the changes), "unchanged", or the word given (ok,
# skipped, FAIL, ...); the note says what was checked.
step_end() {
    local result=${1:-} note=${2:-}
    if [[ -z $result && ${#STEP_CHANGES[@]} -gt 0 ]]; then
        if [[ $DRY_RUN == 1 ]]; then result="would change"; else result="changed"; fi
        if [[ -n $note && ${#STEP_CHANGES[@]} -eq 1 ]]; then
            note+=" (1 change above)"
        elif [[ -n $note ]]; then
            note+=" (${#STEP_CHANGES[@]} changes above)"
        else
            note=${STEP_CHANGES[0]}
            if [[ ${#STEP_CHANGES[@]} -gt 1 ]]; then note+="; and $((${#STEP_CHANGES[@]} - 1)) more (above)"; fi
        fi
    elif [[ -z $result ]]; then
        result="unchanged"
    fi
    case $result in
        unchanged | ok) say "${GREEN}${result}${RESET}${note:+: $note}" ;;
        changed | "would change") ;;
        FAIL) say "${RED}${result}${RESET}${note:+: $note}" ;;
        *) say "${YELLOW}${result}${RESET}${note:+: $note}" ;;
    esac
    SUMMARY+=("$(printf '%-14s %-13s %s' "$STEP_NAME" "$result" "$note")")
}

problem() { PROBLEMS+=("$1"); }

# shellcheck disable=SC2317 # called by the ERR trap below
on_error() {
    local status=$? line=$1
    printf '\n%ssetup.sh FAILED%s in step [%d] %s (line %d, status %d).\n' \
        "$RED" "$RESET" "$STEP_NO" "$STEP_NAME" "$line" "$status" >&2
    printf 'Nothing after that step was done. Fix the cause above and run the same command again:\n' >&2
    printf 'the steps already done are kept and will say "unchanged".\n' >&2
    exit 1
}
trap 'on_error $LINENO' ERR

WORK=$(mktemp -d -t club-agent-setup.XXXXXX)
trap 'rm -rf -- "$WORK"' EXIT

# A path on the machine being installed: under --root, inside the prefix.
p() { printf '%s%s' "$ROOT" "$1"; }

# ---------------------------------------------------------------------------------------------------------------
# Users and groups, read from the installed machine's own files (the prefix's under --root)

uid_of() { awk -F: -v n="$1" '$1 == n { print $3; exit }' "$(p /etc/passwd)" 2>/dev/null || true; }
gid_of() { awk -F: -v n="$1" '$1 == n { print $3; exit }' "$(p /etc/group)" 2>/dev/null || true; }
in_group() {
    awk -F: -v u="$1" -v g="$2" '
        $1 == g { n = split($4, m, ","); for (i = 1; i <= n; i++) if (m[i] == u) found = 1 }
        END { exit !found }' "$(p /etc/group)" 2>/dev/null
}

# Numeric owner "uid:gid" for user and group names; empty if either does not exist (yet).
owner_ids() {
    local u g
    u=$(uid_of "$1")
    g=$(gid_of "$2")
    if [[ -n $u && -n $g ]]; then printf '%s:%s' "$u" "$g"; fi
}

# ---------------------------------------------------------------------------------------------------------------
# Files: written only when their content differs (so an unchanged file keeps its mtime), then mode and owner

# ensure_meta PATH MODE USER GROUP: fix mode and owner if they differ.
ensure_meta() {
    local path=$1 mode=$2 user=$3 group=$4 real ids current want
    real=$(p "$path")
    ids=$(owner_ids "$user" "$group")
    if [[ ! -e $real ]]; then
        return 0
    fi
    current=$(stat -c '%a %u:%g' -- "$real")
    if [[ -z $ids ]]; then
        changed "chown $user:$group $path (the user does not exist yet)"
        return 0
    fi
    want="$(printf '%o' "$((8#$mode))") $ids"
    if [[ $current != "$want" ]]; then
        changed "set $path to mode $mode owner $user:$group (was $(stat -c '%a %U:%G' -- "$real"))"
        if [[ $DRY_RUN == 0 ]]; then
            chown "$ids" -- "$real"
            chmod "$mode" -- "$real"
        fi
    fi
}

# ensure_dir PATH MODE USER GROUP
ensure_dir() {
    local path=$1 mode=$2 user=$3 group=$4 real ids
    real=$(p "$path")
    if [[ ! -d $real ]]; then
        ids=$(owner_ids "$user" "$group")
        changed "create $path ($mode $user:$group)"
        if [[ $DRY_RUN == 0 ]]; then
            install -d -m "$mode" -o "${ids%%:*}" -g "${ids##*:}" -- "$real"
        fi
        return 0
    fi
    ensure_meta "$path" "$mode" "$user" "$group"
}

# install_file SRC PATH MODE USER GROUP: write PATH (atomically, mode and owner set before it appears).
install_file() {
    local src=$1 path=$2 mode=$3 user=$4 group=$5 real ids tmp
    real=$(p "$path")
    if [[ -f $real ]] && cmp -s -- "$src" "$real"; then
        ensure_meta "$path" "$mode" "$user" "$group"
        return 0
    fi
    if [[ -e $real ]]; then changed "update $path"; else changed "write $path ($mode $user:$group)"; fi
    if [[ $DRY_RUN == 0 ]]; then
        ids=$(owner_ids "$user" "$group")
        mkdir -p -- "$(dirname -- "$real")"
        tmp=$(mktemp -- "$real.XXXXXX")
        install -m "$mode" -o "${ids%%:*}" -g "${ids##*:}" -- "$src" "$tmp"
        mv -f -- "$tmp" "$real"
    fi
}

remove_path() {
    local path=$1 real
    real=$(p "$path")
    if [[ -e $real || -L $real ]]; then
        changed "remove $path"
        if [[ $DRY_RUN == 0 ]]; then rm -rf -- "$real"; fi
    fi
}

# ---------------------------------------------------------------------------------------------------------------
# The machine

systemd_running() { [[ -z $ROOT && -d /run/systemd/system ]]; }

package_installed() {
    # shellcheck disable=SC2016 # ${db:Status-Status} is dpkg-query's format, not the shell's
    [[ $(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true) == installed ]]
}

# The environment the installed agent's command line runs with: the service's, and under --root the prefix's
# data and ring directories, so that nothing outside the prefix is read or written.
agent_env() {
    AGENT_ENV=(PYTHONDONTWRITEBYTECODE=1 LANG=C.UTF-8 "PATH=/usr/sbin:/usr/bin:/sbin:/bin" "HOME=$WORK"
        "COLUMNS=${COLUMNS:-110}")
    if [[ -n ${TERM:-} ]]; then AGENT_ENV+=("TERM=$TERM"); fi
    if [[ -n $ROOT ]]; then
        AGENT_ENV+=("CLUB_AGENT_AGENT__DATA_DIR=$(p "$DATA_DIR")" "CLUB_AGENT_MEDIA__RING_DIR=$(p "$RING_DIR")")
    fi
}

# Runs the installed agent's command line as root (config check, claim).
agent_cli() {
    agent_env
    env -i "${AGENT_ENV[@]}" "$(p "$VENV")/bin/club-agent" "$@"
}

agent_has_command() {
    [[ -x $(p "$VENV")/bin/club-agent ]] && agent_cli "$@" --help >/dev/null 2>&1
}

source_files() {
    (cd -- "$SRC_DIR" && find pyproject.toml README.md agent firmware_bridges -type f \
        ! -name '*.pyc' ! -path '*/__pycache__/*' ! -path '*.egg-info/*' -print0 | LC_ALL=C sort -z)
}

# What the venv must hold: this checkout's sources, the Python and the extras. Stored in the venv.
install_fingerprint() {
    local sources python
    python=$("$PYTHON" -c 'import sys; print(sys.version.split()[0])' 2>/dev/null) || return 1
    sources=$(cd -- "$SRC_DIR" && source_files | xargs -0 -r sha256sum -- | sha256sum)
    printf 'source_sha256=%s\npython=%s\nextras=%s\n' "${sources%% *}" "$python" \
        "$(if [[ $KEYWEDGE == 1 ]]; then printf wedge; fi)"
}

# ---------------------------------------------------------------------------------------------------------------
# Steps

step_preflight() {
    step "Preflight"
    local id="" version_id="" id_like="" pretty="" arch
    if [[ $DRY_RUN == 0 && $EUID -ne 0 ]]; then
        printf 'setup.sh must run as root: sudo %s\n' "$0" >&2
        exit 1
    fi
    [[ -f $SRC_DIR/pyproject.toml && -d $SRC_DIR/agent && -f $SRC_DIR/systemd/$SERVICE.service ]] || {
        printf 'setup.sh: %s is not a club-agent checkout (run provisioning/setup.sh from inside one)\n' \
            "$SRC_DIR" >&2
        exit 1
    }
    if [[ -r /etc/os-release ]]; then
        # shellcheck disable=SC1091
        id=$(. /etc/os-release && printf '%s' "${ID:-}")
        # shellcheck disable=SC1091
        version_id=$(. /etc/os-release && printf '%s' "${VERSION_ID:-}")
        # shellcheck disable=SC1091
        id_like=$(. /etc/os-release && printf '%s' "${ID_LIKE:-}")
        # shellcheck disable=SC1091
        pretty=$(. /etc/os-release && printf '%s' "${PRETTY_NAME:-}")
    fi
    if [[ $id != debian && $id != raspbian && " $id_like " != *" debian "* ]] || ! command -v dpkg-query >/dev/null; then
        printf 'setup.sh: this is %s; it needs Raspberry Pi OS or Debian 12 (apt, dpkg, systemd)\n' \
            "${pretty:-an unknown system}" >&2
        exit 1
    fi
    arch=$(uname -m)
    if [[ $version_id != 12 ]]; then
        warn "made for Debian 12 (bookworm); this is ${pretty:-$id $version_id}: going on"
        problem "OS: ${pretty:-$id $version_id} is not Debian 12: the agent is tested on Debian 12 only"
    fi
    say "${pretty:-$id $version_id} on $arch; installing from $SRC_DIR${ROOT:+ into $ROOT}"
    if [[ -n $ROOT ]]; then
        [[ -d $ROOT || $DRY_RUN == 1 ]] || mkdir -p -- "$ROOT"
    elif [[ $DRY_RUN == 0 ]]; then
        # One installer at a time.
        exec 9>/run/lock/club-agent-setup.lock
        flock -n 9 || {
            printf 'setup.sh: another setup.sh is running\n' >&2
            exit 1
        }
    fi
    step_end ok "${pretty:-$id $version_id}, $arch"
}

step_packages() {
    step "Packages"
    local wanted=(python3 python3-venv ffmpeg libusb-1.0-0 sqlite3 ca-certificates) missing=() pkg
    if [[ $WITH_MOSQUITTO == 1 ]]; then wanted+=(mosquitto); fi
    if [[ $KEYWEDGE == 1 ]]; then wanted+=(build-essential python3-dev linux-libc-dev); fi
    for pkg in "${wanted[@]}"; do
        package_installed "$pkg" || missing+=("$pkg")
    done
    if [[ ${#missing[@]} -eq 0 ]]; then
        step_end "" "${wanted[*]}"
        return
    fi
    if [[ -n $ROOT ]]; then
        warn "not installed on this machine: ${missing[*]} (--root installs no packages)"
        problem "packages: ${missing[*]} not installed (--root mode installs none)"
        step_end skipped "missing: ${missing[*]}"
        return
    fi
    changed "apt-get install ${missing[*]}"
    if [[ $DRY_RUN == 0 ]]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
        if [[ " ${missing[*]} " == *" mosquitto "* ]] && systemd_running; then
            # Debian starts mosquitto on 1883, the embedded broker's port: it stays off until the site
            # switches to broker.mode = "external" (README, "Large premises").
            systemctl disable --now mosquitto >/dev/null 2>&1 || true
            say "mosquitto installed and left disabled (enable it with broker.mode = \"external\")"
        fi
    fi
    step_end
}

step_python() {
    step "Python"
    local version
    if ! version=$("$PYTHON" -c 'import sys; print(sys.version.split()[0])' 2>/dev/null); then
        if [[ $DRY_RUN == 1 ]]; then
            step_end "would check" "$PYTHON after the packages are installed"
            return
        fi
        printf 'setup.sh: %s does not run (install python3, or give --python PATH)\n' "$PYTHON" >&2
        exit 1
    fi
    if ! "$PYTHON" -c 'import sys; raise SystemExit(sys.version_info < (3, 11))'; then
        printf 'setup.sh: %s is Python %s; the agent needs 3.11 or newer (Debian 12 has 3.11)\n' \
            "$PYTHON" "$version" >&2
        exit 1
    fi
    if ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null && [[ $DRY_RUN == 0 ]]; then
        printf 'setup.sh: %s has no venv module: apt-get install python3-venv\n' "$PYTHON" >&2
        exit 1
    fi
    step_end ok "$PYTHON $version"
}

step_user() {
    step "Service user"
    local groups=(dialout plugdev video) group entry name gid
    if [[ $KEYWEDGE == 1 ]]; then groups+=(input); fi
    local prefix_args=() seeding=0
    if [[ -n $ROOT ]]; then
        prefix_args=(--prefix "$ROOT")
        if [[ ! -f $(p /etc/passwd) ]]; then
            seeding=1
            # A bare prefix: start its user database with root and Debian's reader groups.
            changed "seed $ROOT/etc/passwd, group, shadow, gshadow (root and the reader groups)"
            if [[ $DRY_RUN == 0 ]]; then
                mkdir -p -- "$(p /etc)"
                printf 'root:x:0:0:root:/root:/bin/bash\n' >"$WORK/passwd"
                printf 'root:*:19000:0:99999:7:::\n' >"$WORK/shadow"
                printf 'root:x:0:\n' >"$WORK/group"
                printf 'root:*::\n' >"$WORK/gshadow"
                for entry in "${SEED_GROUPS[@]}"; do
                    name=${entry%%:*}
                    gid=${entry##*:}
                    printf '%s:x:%s:\n' "$name" "$gid" >>"$WORK/group"
                    printf '%s:!::\n' "$name" >>"$WORK/gshadow"
                done
                install -m 0644 -o 0 -g 0 "$WORK/passwd" "$(p /etc/passwd)"
                install -m 0644 -o 0 -g 0 "$WORK/group" "$(p /etc/group)"
                install -m 0640 -o 0 -g 0 "$WORK/shadow" "$(p /etc/shadow)"
                install -m 0640 -o 0 -g 0 "$WORK/gshadow" "$(p /etc/gshadow)"
            fi
        fi
    fi
    for group in "${groups[@]}"; do
        if [[ $seeding == 1 && $DRY_RUN == 1 && " ${SEED_GROUPS[*]} " == *" $group:"* ]]; then
            continue  # it would be seeded above
        fi
        if [[ -z $(gid_of "$group") ]]; then
            changed "create group $group"
            if [[ $DRY_RUN == 0 ]]; then groupadd "${prefix_args[@]}" --system "$group"; fi
        fi
    done
    if [[ -z $(uid_of "$SERVICE_USER") ]]; then
        changed "create system user $SERVICE_USER (groups ${groups[*]}, no login, home $DATA_DIR)"
        if [[ $DRY_RUN == 0 ]]; then
            useradd "${prefix_args[@]}" --system --user-group --home-dir "$DATA_DIR" --no-create-home \
                --shell /usr/sbin/nologin --comment "club-agent service" \
                --groups "$(IFS=,; printf '%s' "${groups[*]}")" "$SERVICE_USER"
        fi
    else
        for group in "${groups[@]}"; do
            if ! in_group "$SERVICE_USER" "$group"; then
                changed "add $SERVICE_USER to group $group"
                if [[ $DRY_RUN == 0 ]]; then usermod "${prefix_args[@]}" --append --groups "$group" "$SERVICE_USER"; fi
            fi
        done
    fi
    step_end "" "$SERVICE_USER in ${groups[*]}"
}

step_directories() {
    step "Directories"
    ensure_dir "$CONF_DIR" 0750 root "$SERVICE_USER"
    ensure_dir "$DATA_DIR" 0700 "$SERVICE_USER" "$SERVICE_USER"
    ensure_dir "$APP_DIR" 0755 root root
    ensure_dir "$SHARE_DIR" 0755 root root
    install_file "$SRC_DIR/provisioning/agent.example.toml" "$SHARE_DIR/agent.example.toml" 0644 root root
    install_file "$SRC_DIR/provisioning/secrets.example.toml" "$SHARE_DIR/secrets.example.toml" 0644 root root
    install_file "$SRC_DIR/README.md" "$SHARE_DIR/README.md" 0644 root root
    step_end "" "$CONF_DIR 0750, $DATA_DIR 0700, $APP_DIR"
}

AGENT_CHANGED=0
step_agent() {
    step "Agent"
    local venv stamp want target fresh=0 pip_args=(install --quiet --no-cache-dir --disable-pip-version-check)
    venv=$(p "$VENV")
    stamp=$(p "$INSTALL_STAMP")
    if ! want=$(install_fingerprint 2>/dev/null); then
        step_end "would install" "$VENV (after Python is installed)"
        AGENT_CHANGED=1
        return
    fi
    if [[ -f $stamp && -x $venv/bin/club-agent ]] && [[ $(cat -- "$stamp") == "$want" ]] &&
        "$venv/bin/python" -c 'import agent' 2>/dev/null; then
        step_end "" "$VENV: $(grep '^python=' "$stamp"), sources sha256 ${want:14:12}"
        return
    fi
    AGENT_CHANGED=1
    if [[ -d $venv ]] && ! grep -qxF "$(grep '^python=' <<<"$want")" "$stamp" 2>/dev/null; then
        # Another Python (a Debian upgrade) or a venv of unknown state: build it afresh.
        remove_path "$VENV"
        fresh=1
    fi
    if [[ ! -d $venv || $fresh == 1 ]]; then
        changed "create venv $VENV ($PYTHON)"
        if [[ $DRY_RUN == 0 ]]; then "$PYTHON" -m venv -- "$venv"; fi
    fi
    changed "pip install the agent from $SRC_DIR${WHEELHOUSE:+ (packages from $WHEELHOUSE only)}"
    if [[ $DRY_RUN == 1 ]]; then
        step_end
        return
    fi
    # Build from a copy: pip builds in the source tree, and the checkout stays as it was.
    mkdir -p "$WORK/src"
    (cd -- "$SRC_DIR" && source_files | xargs -0 cp --parents -t "$WORK/src")
    if [[ -n $WHEELHOUSE ]]; then pip_args+=(--no-index --find-links "$WHEELHOUSE"); fi
    target=$WORK/src
    if [[ $KEYWEDGE == 1 ]]; then target="$WORK/src[wedge]"; fi
    if ! PYTHONDONTWRITEBYTECODE=1 "$venv/bin/python" -m pip "${pip_args[@]}" "$target" >"$WORK/pip.log" 2>&1; then
        tail -n 30 "$WORK/pip.log" | sed 's/^/    pip: /'
        printf '    pip could not install the agent (above). No internet? Bring a wheelhouse: --wheelhouse DIR\n'
        rm -f -- "$stamp"
        false
    fi
    printf '%s\n' "$want" >"$stamp"
    chmod 0644 -- "$stamp"
    step_end "" "$("$venv/bin/python" -c 'import agent; print("club-agent", agent.__version__)') in $VENV"
}

toml_site() {
    # agent.toml for a new box: the site's values; every other key keeps its default (documented in
    # agent.example.toml, installed beside the agent).
    "$PYTHON" - "$@" <<'PY'
import json, re, sys, datetime
site, club_id, agent_id, timezone, language, *courts = sys.argv[1:]
s = lambda v: json.dumps(v, ensure_ascii=False)  # a JSON string is a TOML basic string
out = [
    f"# club-agent configuration for {site}: written by provisioning/setup.sh on {datetime.date.today()}.",
    "# Every key, its default and what it does: /opt/club-agent/share/agent.example.toml",
    "# After an edit:  sudo /opt/club-agent/venv/bin/club-agent config check /etc/club-agent/agent.toml",
    "#                 sudo systemctl restart club-agent",
    "",
    "[agent]",
    f"club_id = {s(club_id)}",
    f"agent_id = {s(agent_id)}",
    f"name = {s(site)}",
    'data_dir = "/var/lib/club-agent"',
    f"language = {s(language)}",
    f"timezone = {s(timezone)}",
    "# Mode 0600, owned by club-agent; next to this file.",
    'secrets_file = "secrets.toml"',
    "",
    "[media]",
    "# RAM (tmpfs): the unit's RuntimeDirectory=club-agent is /run/club-agent.",
    'ring_dir = "/run/club-agent/ring"',
    "",
    "# The front desk's tablet page (/tablet/desk); its token is api_tokens.front-desk in secrets.toml.",
    "[[api.clients]]",
    'name = "front-desk"',
    'role = "desk"',
]
for i, court in enumerate(courts, 1):
    cid, sep, name = court.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", cid):
        cid, name = f"c{i}", court
    out += ["", "[[courts]]", f"id = {s(cid)}", f"name = {s(name)}"]
if not courts:
    out += ["", "# No courts yet: add one [[courts]] block per court (see agent.example.toml)."]
print("\n".join(out))
PY
}

toml_secrets() {
    "$PYTHON" - <<'PY'
import secrets
print("""# club-agent secrets: written by provisioning/setup.sh. Mode 0600, owned by club-agent: the agent refuses
# this file if it is world-accessible or group-writable. Every key: /opt/club-agent/share/secrets.example.toml
# `club-agent provision claim` adds the cloud's keys here.

[api_tokens]
# The front desk's tablet: open http://<this box>:8080/tablet/desk?token=<this token> once on the tablet.
front-desk = "%s"
""" % secrets.token_urlsafe(32), end="")
PY
}

CONFIG_OK=1
CONFIG_CHANGED=0
step_config() {
    step "Configuration"
    local site=$SITE courts_line court
    local -a courts=("${COURTS[@]}")
    if [[ -f $(p "$CONF") ]]; then
        if [[ -n $SITE || ${#COURTS[@]} -gt 0 || -n $CLUB_ID || -n $AGENT_ID || -n $TIMEZONE || -n $LANGUAGE ]]; then
            warn "$CONF exists and is kept as it is: --site, --court and the ids apply to a new one only"
        fi
    else
        if [[ -z $site && $INTERACTIVE == 1 ]]; then
            read -r -p "    The club's name (shown on the tablets): " site
        fi
        if [[ ${#courts[@]} -eq 0 && $INTERACTIVE == 1 ]]; then
            read -r -p "    Court names, separated by commas (e.g. Quadra 1, Quadra 2): " courts_line
            IFS=, read -r -a courts <<<"$courts_line"
            for court in "${!courts[@]}"; do
                courts[court]=$(sed 's/^ *//; s/ *$//' <<<"${courts[court]}")
            done
        fi
        toml_site "${site:-Club}" "${CLUB_ID:-club-001}" "${AGENT_ID:-edge-01}" \
            "${TIMEZONE:-America/Sao_Paulo}" "${LANGUAGE:-pt-BR}" "${courts[@]}" >"$WORK/agent.toml"
    fi
    if [[ -f $WORK/agent.toml ]]; then
        install_file "$WORK/agent.toml" "$CONF" 0640 root "$SERVICE_USER"
    else
        ensure_meta "$CONF" 0640 root "$SERVICE_USER"
    fi
    if [[ ! -f $(p "$SECRETS") ]]; then
        toml_secrets >"$WORK/secrets.toml"
        install_file "$WORK/secrets.toml" "$SECRETS" 0600 "$SERVICE_USER" "$SERVICE_USER"
    else
        ensure_meta "$SECRETS" 0600 "$SERVICE_USER" "$SERVICE_USER"
    fi
    if [[ ${#STEP_CHANGES[@]} -gt 0 ]]; then CONFIG_CHANGED=1; fi
    if ! "$PYTHON" -c 'import sys, tomllib; sys.exit(not tomllib.load(open(sys.argv[1], "rb")).get("courts"))' \
        "$(if [[ -f $WORK/agent.toml ]]; then printf '%s' "$WORK/agent.toml"; else p "$CONF"; fi)" 2>/dev/null; then
        problem "courts: none configured: add a [[courts]] block per court to $CONF (or --court on a new box), then: systemctl restart club-agent"
    fi
    if [[ $DRY_RUN == 1 || ! -x $(p "$VENV")/bin/club-agent ]]; then
        step_end "" "$CONF, $SECRETS"
        return
    fi
    if agent_cli config check "$(p "$CONF")" >"$WORK/check.log" 2>&1; then
        say "$(tail -n 1 "$WORK/check.log")"
        step_end "" "$CONF, $SECRETS"
    else
        CONFIG_OK=0
        sed 's/^/    /' "$WORK/check.log"
        problem "configuration: $(tail -n 1 "$WORK/check.log") (the agent will not start until it is fixed)"
        step_end FAIL "$CONF: club-agent config check failed"
    fi
}

READERS_CHANGED=0
step_readers() {
    step "Readers"
    local before=${#STEP_CHANGES[@]} module
    install_file "$SRC_DIR/provisioning/udev/70-club-agent-readers.rules" "$UDEV_RULES" 0644 root root
    local udev_changed=$((${#STEP_CHANGES[@]} - before))
    before=${#STEP_CHANGES[@]}
    install_file "$SRC_DIR/provisioning/modprobe/club-agent-nfc.conf" "$MODPROBE_CONF" 0644 root root
    local modprobe_changed=$((${#STEP_CHANGES[@]} - before))
    before=${#STEP_CHANGES[@]}
    install_file "$SRC_DIR/provisioning/modules-load/club-agent.conf" "$MODULES_LOAD" 0644 root root
    local modules_changed=$((${#STEP_CHANGES[@]} - before))
    if [[ ${#STEP_CHANGES[@]} -gt 0 ]]; then READERS_CHANGED=1; fi
    if [[ -n $ROOT || $DRY_RUN == 1 ]]; then
        step_end "" "udev rules (/dev/club-reader-*), NFC driver blacklist, serial modules at boot"
        return
    fi
    if [[ $udev_changed -gt 0 ]] && udevadm control --ping >/dev/null 2>&1; then
        udevadm control --reload-rules
        udevadm trigger --action=add --subsystem-match=tty --subsystem-match=usb
        say "udev rules reloaded and applied to the readers plugged in now"
    fi
    if [[ $modprobe_changed -gt 0 ]]; then
        for module in "${NFC_MODULES[@]}"; do
            if [[ -d /sys/module/$module ]] && ! modprobe -r "$module" 2>/dev/null; then
                warn "kernel module $module is loaded and in use: reboot so that nfcpy gets the NFC reader"
                problem "NFC: kernel module $module still loaded: reboot (it is blacklisted now)"
            fi
        done
    fi
    if [[ $modules_changed -gt 0 ]]; then
        modprobe -a "${SERIAL_MODULES[@]}" 2>/dev/null || warn "could not load ${SERIAL_MODULES[*]} now (next boot will)"
    fi
    step_end "" "udev rules (/dev/club-reader-*), NFC driver blacklist, serial modules at boot"
}

UNIT_CHANGED=0
EXPOSURE=""
step_unit() {
    step "systemd unit"
    local analyze_root=() verify_log="$WORK/verify.log"
    install_file "$SRC_DIR/systemd/$SERVICE.service" "$UNIT" 0644 root root
    if [[ ${#STEP_CHANGES[@]} -gt 0 ]]; then
        UNIT_CHANGED=1
        if [[ $DRY_RUN == 0 ]] && systemd_running; then systemctl daemon-reload; fi
    fi
    if [[ -n $ROOT ]]; then
        if [[ ! -L $(p "$UNIT_WANTS") ]]; then
            changed "enable $SERVICE.service (multi-user.target.wants)"
            if [[ $DRY_RUN == 0 ]]; then systemctl --root="$ROOT" --quiet enable "$SERVICE.service"; fi
        fi
        analyze_root=(--root="$ROOT")
    elif [[ $(systemctl is-enabled "$SERVICE.service" 2>/dev/null || true) != enabled ]]; then
        changed "enable $SERVICE.service"
        if [[ $DRY_RUN == 0 ]]; then systemctl --quiet enable "$SERVICE.service"; fi
    fi
    if [[ $DRY_RUN == 1 ]] || ! command -v systemd-analyze >/dev/null; then
        step_end
        return
    fi
    # Verifying needs the machine's own units (multi-user.target, ...), which a --root prefix has not: there
    # the caller verifies (tests/integration/test_setup.py does).
    if [[ -z $ROOT ]]; then
        if systemd-analyze verify "$UNIT" >"$verify_log" 2>&1; then
            say "systemd-analyze verify: ok"
        else
            sed 's/^/    /' "$verify_log"
            problem "systemd unit: systemd-analyze verify $UNIT reported the problems above"
        fi
    fi
    if systemd-analyze security --offline=true "${analyze_root[@]}" "$SERVICE.service" >"$WORK/security.log" 2>&1; then
        EXPOSURE=$(sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p' "$WORK/security.log")
        say "systemd-analyze security: exposure ${EXPOSURE:-?} (0 best, 10 worst)"
    fi
    step_end "" "$UNIT enabled${EXPOSURE:+, exposure $EXPOSURE}"
}

CLAIM_CHANGED=0
step_claim() {
    step "Claim"
    local token=$CLAIM_TOKEN token_hash status args=()
    if [[ -z $token && $INTERACTIVE == 1 && ! -f $(p "$CLAIM_STAMP") ]]; then
        read -r -s -p "    Claim token from the club's cloud account (Enter to skip): " token
        printf '\n'
    fi
    if [[ -z $token ]]; then
        if [[ -f $(p "$CLAIM_STAMP") ]]; then
            step_end "" "claimed $(sed -n 's/^claimed_at=//p' "$(p "$CLAIM_STAMP")")"
        else
            problem "claim: skipped, no claim token: the agent decides offline but syncs nothing with the cloud; run setup.sh --claim-token TOKEN"
            step_end skipped "no claim token (--claim-token, CLUB_AGENT_CLAIM_TOKEN or the prompt)"
        fi
        return
    fi
    token_hash=$(printf '%s' "$token" | sha256sum)
    token_hash=${token_hash%% *}
    if [[ -f $(p "$CLAIM_STAMP") ]] && grep -qxF "token_sha256=$token_hash" "$(p "$CLAIM_STAMP")"; then
        step_end "" "claimed with this token $(sed -n 's/^claimed_at=//p' "$(p "$CLAIM_STAMP")")"
        return
    fi
    if [[ $DRY_RUN == 1 ]]; then
        changed "club-agent provision claim --token ... --config $CONF"
        step_end
        return
    fi
    if ! agent_has_command provision claim; then
        problem "claim: this agent version has no 'club-agent provision claim': the device is not claimed"
        step_end FAIL "no 'provision claim' command in this agent"
        return
    fi
    status=0
    args=(--config "$(p "$CONF")")
    if [[ -n $CLOUD_URL ]]; then args+=(--cloud-url "$CLOUD_URL"); fi
    # the token goes in the environment, not on the command line, where any user's `ps` would show it
    agent_env
    env -i "${AGENT_ENV[@]}" CLUB_AGENT_CLAIM_TOKEN="$token" "$(p "$VENV")/bin/club-agent" provision claim "${args[@]}" \
        >"$WORK/claim.log" 2>&1 || status=$?
    sed 's/^/    /' "$WORK/claim.log"
    # The claim writes the config and the secrets as root: their modes and owners again.
    ensure_meta "$CONF" 0640 root "$SERVICE_USER"
    ensure_meta "$SECRETS" 0600 "$SERVICE_USER" "$SERVICE_USER"
    case $status in
        0)
            CLAIM_CHANGED=1
            printf 'claimed_at=%s\ntoken_sha256=%s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$token_hash" >"$WORK/claimed"
            install_file "$WORK/claimed" "$CLAIM_STAMP" 0640 root "$SERVICE_USER"
            step_end changed "$(grep -m 1 '^claimed' "$WORK/claim.log" || printf claimed)"
            ;;
        2)
            problem "claim: the cloud refused the token: $(tail -n 1 "$WORK/claim.log") (ask for a new token, run setup.sh --claim-token NEW)"
            step_end FAIL "token refused"
            ;;
        *)
            problem "claim: failed (exit $status): $(tail -n 1 "$WORK/claim.log") (network? run setup.sh again)"
            step_end FAIL "exit $status"
            ;;
    esac
}

step_start() {
    step "Start"
    local active
    if [[ -n $ROOT ]]; then
        step_end skipped "--root: nothing is started"
        return
    fi
    if [[ $NO_START == 1 ]]; then
        step_end skipped "--no-start"
        return
    fi
    if ! systemd_running; then
        problem "start: systemd is not running here (a container?): the agent was installed and enabled, not started"
        step_end skipped "systemd is not running"
        return
    fi
    if [[ $CONFIG_OK == 0 ]]; then
        step_end skipped "the configuration does not pass config check"
        return
    fi
    active=$(systemctl is-active "$SERVICE.service" 2>/dev/null || true)
    if [[ $active == active && $((AGENT_CHANGED + CONFIG_CHANGED + UNIT_CHANGED + CLAIM_CHANGED + READERS_CHANGED)) -eq 0 ]]; then
        step_end "" "running since $(systemctl show -P ActiveEnterTimestamp "$SERVICE.service")"
        return
    fi
    if [[ $active == active ]]; then changed "restart $SERVICE"; else changed "start $SERVICE"; fi
    if [[ $DRY_RUN == 1 ]]; then
        step_end
        return
    fi
    systemctl reset-failed "$SERVICE.service" 2>/dev/null || true
    # Type=notify: this returns once the agent said READY=1, or failed.
    if systemctl restart "$SERVICE.service"; then
        step_end
    else
        journalctl -u "$SERVICE.service" -n 20 --no-pager 2>/dev/null | sed 's/^/    /' || true
        problem "start: $SERVICE did not start (journal above; journalctl -u $SERVICE)"
        step_end FAIL "did not start"
    fi
}

# The names of doctor's checks with a status (its table's columns: check, status, detail), for the summary.
doctor_checks() {
    awk -v s="$1" '$2 == s { printf "%s%s", sep, $1; sep = ", " }' "$2"
}

step_doctor() {
    step "Doctor"
    local status=0 warnings
    if [[ $DRY_RUN == 1 ]]; then
        step_end "would run" "club-agent doctor --config $CONF"
        return
    fi
    if ! agent_has_command doctor; then
        problem "doctor: this agent version has no 'club-agent doctor': nothing was checked"
        step_end skipped "no 'doctor' command in this agent"
        return
    fi
    # As root, as the unit's User= is not: doctor judges the service user's access to each file and device
    # from the modes and the user's groups (--user), and opens the database read-only.
    agent_cli doctor --config "$(p "$CONF")" --user "$SERVICE_USER" >"$WORK/doctor.log" 2>&1 || status=$?
    sed 's/^/    /' "$WORK/doctor.log"
    warnings=$(doctor_checks WARN "$WORK/doctor.log")
    if [[ $status == 0 ]]; then
        step_end ok "$(tail -n 1 "$WORK/doctor.log")${warnings:+; look at the warnings: $warnings}"
    else
        problem "doctor: $(tail -n 1 "$WORK/doctor.log"): FAIL: $(doctor_checks FAIL "$WORK/doctor.log") (the fix is under each, above)"
        step_end FAIL "club-agent doctor exit $status (its report is above)"
    fi
}

summary() {
    local line
    local what="installed" dry=""
    if [[ $DRY_RUN == 1 ]]; then dry=" (dry run: nothing was changed)"; fi
    if [[ -z $ROOT && $NO_START == 0 && $DRY_RUN == 0 ]]; then what="installed and running"; fi
    if [[ $DRY_RUN == 1 ]]; then what="not changed (dry run)"; fi
    if [[ $UNINSTALL == 1 && $DRY_RUN == 0 ]]; then
        what="removed"
        if [[ $PURGE == 0 ]]; then what+=" (its configuration, data and user are kept)"; fi
    fi
    printf '\n%s==> Summary%s%s\n' "$BOLD" "$RESET" "$dry"
    for line in "${SUMMARY[@]}"; do
        printf '    %s\n' "$line"
    done
    if [[ ${#PROBLEMS[@]} -eq 0 ]]; then
        printf '\n%sAll done: club-agent is %s%s.%s\n' "$GREEN" "$what" "${ROOT:+ under $ROOT}" "$RESET"
        if [[ $UNINSTALL == 1 || -n $ROOT || $DRY_RUN == 1 ]]; then return; fi
        printf 'Status page: http://%s:8080/   Logs: journalctl -u club-agent -f   Check: club-agent doctor\n' \
            "$(hostname -I 2>/dev/null | awk '{print $1}' || true)"
        return
    fi
    printf '\n%sStill to do (%d):%s\n' "$YELLOW" "${#PROBLEMS[@]}" "$RESET"
    for line in "${PROBLEMS[@]}"; do
        printf '  - %s\n' "$line"
    done
    printf 'Fix these, then run setup.sh again: it changes only what is not right yet.\n'
    EXIT_STATUS=3
}

uninstall() {
    STEP_TOTAL=3
    step "Service"
    if [[ -z $ROOT ]] && systemd_running && systemctl is-enabled "$SERVICE.service" >/dev/null 2>&1; then
        changed "systemctl disable --now $SERVICE"
        if [[ $DRY_RUN == 0 ]]; then systemctl disable --now "$SERVICE.service"; fi
    fi
    remove_path "$UNIT_WANTS"
    remove_path "$UNIT"
    if [[ $DRY_RUN == 0 && ${#STEP_CHANGES[@]} -gt 0 ]] && systemd_running; then systemctl daemon-reload; fi
    step_end
    step "Files"
    remove_path "$UDEV_RULES"
    remove_path "$MODPROBE_CONF"
    remove_path "$MODULES_LOAD"
    remove_path "$APP_DIR"
    step_end
    step "Data"
    if [[ $PURGE == 1 ]]; then
        remove_path "$CONF_DIR"
        remove_path "$DATA_DIR"
        if [[ -n $(uid_of "$SERVICE_USER") ]]; then
            changed "delete user $SERVICE_USER"
            if [[ $DRY_RUN == 0 ]]; then userdel ${ROOT:+--prefix "$ROOT"} "$SERVICE_USER"; fi
        fi
        # userdel leaves the user's group where login.defs lacks USERGROUPS_ENAB (a bare --root prefix).
        if [[ $DRY_RUN == 0 && -n $(gid_of "$SERVICE_USER") ]]; then
            groupdel ${ROOT:+--prefix "$ROOT"} "$SERVICE_USER"
        fi
        step_end
    else
        step_end kept "$CONF_DIR, $DATA_DIR and the user $SERVICE_USER (--purge removes them)"
    fi
    summary
}

main() {
    if [[ $UNINSTALL == 1 ]]; then
        if [[ $DRY_RUN == 0 && $EUID -ne 0 ]]; then
            printf 'setup.sh must run as root\n' >&2
            exit 1
        fi
        uninstall
        return
    fi
    step_preflight
    step_packages
    step_python
    step_user
    step_directories
    step_agent
    step_config
    step_readers
    step_unit
    step_claim
    step_start
    step_doctor
    summary
}

EXIT_STATUS=0
main
exit "$EXIT_STATUS"
