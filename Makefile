# Two commands for a fresh Debian / Raspberry Pi OS machine: `make demo` and `make test`.
# Each installs what it needs: Debian packages when missing, the virtual environment in .venv, the Python packages.

PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_PKGS := python3-venv python3-pip

.PHONY: all demo test test-embedded test-mosquitto lint typecheck unit bench soak chaos deps system-deps test-deps fuzz clean

all: test

system-deps:
	@if ! $(PY) -c 'import ensurepip, venv' >/dev/null 2>&1; then \
		echo "installing $(APT_PKGS)"; \
		$(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PKGS); \
	fi

# The tests run the agent against Debian's mosquitto too (started by the tests on loopback ports), make
# TLS certificates with openssl, and drive the tablet pages in Debian's Chromium (headless). The mosquitto
# service the package starts would hold port 1883, the embedded broker's port, so a mosquitto installed here
# is disabled again. The camera tests run ffmpeg against GStreamer's RTSP server (tests/cameras.py).
# tests/integration/test_setup.py runs provisioning/setup.sh (shellcheck; a venv of Debian's python3) and checks
# the unit and the udev rules with systemd-analyze and udevadm. benchmarks/chaos.py compiles its wall-clock step
# library with cc and formats its data disk with mkfs.ext4 (e2fsprogs).
test-deps:
	@missing=""; \
	[ -x /usr/sbin/mosquitto ] || missing="$$missing mosquitto"; \
	command -v openssl >/dev/null || missing="$$missing openssl"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v shellcheck >/dev/null || missing="$$missing shellcheck"; \
	command -v systemd-analyze >/dev/null || missing="$$missing systemd"; \
	command -v udevadm >/dev/null || missing="$$missing udev"; \
	/usr/bin/python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing="$$missing python3-venv"; \
	[ -x /usr/bin/ffmpeg ] || missing="$$missing ffmpeg"; \
	command -v cc >/dev/null || missing="$$missing gcc"; \
	command -v mkfs.ext4 >/dev/null || missing="$$missing e2fsprogs"; \
	/usr/bin/python3 -c 'import gi; gi.require_version("GstRtspServer", "1.0")' 2>/dev/null \
		|| missing="$$missing python3-gi gir1.2-gst-rtsp-server-1.0"; \
	ls /usr/lib/*/gstreamer-1.0/libgstrtp.so >/dev/null 2>&1 || missing="$$missing gstreamer1.0-plugins-good"; \
	ls /usr/lib/*/gstreamer-1.0/libgstmpegtsdemux.so >/dev/null 2>&1 || missing="$$missing gstreamer1.0-plugins-bad"; \
	if [ -n "$$missing" ]; then \
		echo "installing$$missing"; \
		$(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
		case "$$missing" in *mosquitto*) \
			$(SUDO) systemctl disable --now mosquitto >/dev/null 2>&1 || true;; esac; \
	fi

$(BIN)/python: | system-deps
	$(PY) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $@

deps: $(STAMP)

demo: deps
	$(BIN)/club-agent demo

lint: deps
	$(BIN)/ruff check agent firmware_bridges tests benchmarks
	$(BIN)/ruff format --check agent firmware_bridges tests benchmarks

typecheck: deps
	$(BIN)/mypy

unit: deps
	$(BIN)/pytest tests/unit -q

# The whole suite on the embedded broker, then again with every agent a client of a real mosquitto
# (broker.mode = external); tests of the embedded broker itself are skipped in the second pass.
test: lint typecheck test-embedded test-mosquitto

test-embedded: deps test-deps
	$(BIN)/pytest

test-mosquitto: deps test-deps
	CLUB_AGENT_TEST_BROKER=mosquitto $(BIN)/pytest -q -m "not embedded_only" \
		--ignore=tests/integration/test_broker_conformance.py --ignore=tests/unit --ignore=tests/browser

# Every benchmark, each with its peer side by side in the same run; writes BENCHMARKS.md (about 55 minutes: the soak is 30).
bench: deps test-deps
	$(BIN)/python benchmarks/table.py

# The agent under premises load for 30 minutes (SOAK_ARGS="--minutes 15" to shorten): memory, fds, tap latency and
# outbox depth each minute, plotted to .artifacts/soak.png with a pass/fail summary.
soak: deps test-deps
	$(BIN)/python benchmarks/soak.py $(SOAK_ARGS)

# Chaos (about 8 minutes, bounded to 20): the agent under premises load while every fault kind hits it in a seeded
# random order (kills, cloud faults and an outage, a full and a read-only data disk, clock steps, a reader unplugged,
# a flooding device); the sandbox cloud's log is the oracle. Root: it loop-mounts a small ext4 data disk.
# CHAOS_ARGS="--seed 2 --duration 600" to vary it; the last line is {"lost": ..., "duplicated": ..., ...}.
chaos: deps test-deps
	$(SUDO) $(BIN)/python benchmarks/chaos.py $(CHAOS_ARGS)

# Fuzzing: every atheris target in tests/fuzz for FUZZ_SECONDS each (its corpus grows in build/fuzz/<target>/corpus,
# a crash or a hang is written next to it and fails the run once every target had its turn), then every target on
# hypothesis at the `fuzz` profile (FUZZ_EXAMPLES each, tests/fuzz/conftest.py). `make test` runs a short pass.
FUZZ_SECONDS  ?= 60
FUZZ_EXAMPLES ?= 20000
FUZZ_FLAGS    ?= -max_len=4096 -timeout=60 -rss_limit_mb=4096
FUZZ_TARGETS := $(sort $(basename $(notdir $(wildcard tests/fuzz/fuzz_*.py))))

fuzz: deps
	@failed=""; for target in $(FUZZ_TARGETS); do \
		dir=build/fuzz/$$target; mkdir -p $$dir/corpus; \
		start=$$(date +%s); \
		if $(BIN)/python -m tests.fuzz.$$target -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 $(FUZZ_FLAGS) \
			-artifact_prefix=$$dir/ $$dir/corpus >$$dir/log 2>&1; then result=ok; \
		else result=FAILED; failed="$$failed $$target"; tail -30 $$dir/log; fi; \
		printf '%-16s %-6s %4ss  runs %-9s exec/s %-7s corpus %s\n' $$target $$result $$(($$(date +%s) - start)) \
			"$$(sed -n 's/^stat::number_of_executed_units: *//p' $$dir/log)" \
			"$$(sed -n 's/^stat::average_exec_per_sec: *//p' $$dir/log)" "$$(ls $$dir/corpus | wc -l)"; \
	done; \
	if [ -n "$$failed" ]; then echo "fuzz: crashes in$$failed (inputs in build/fuzz/<target>/, logs beside)"; exit 1; fi
	HYPOTHESIS_PROFILE=fuzz FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/pytest tests/fuzz -q -k "not under_atheris" --durations=20

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis build *.egg-info
