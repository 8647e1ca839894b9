"""The chaos run's data disk: a small ext4 image, loop-mounted as the agent's data dir, that can be filled to the
last byte and made read-only the way an SD card fails.

Full: a filler file takes every free block (fallocate, then writes down to the byte); freeing it is the installer
deleting files. Read-only: `mount -o remount,ro` is refused (EBUSY) while the agent holds its database open for
writing, on any Linux file system, so a live data dir cannot be made read-only that way. What does happen to a
box in the field is the kernel's: an ext4 error (a worn SD card) with `errors=remount-ro` turns the file system
read-only under the running agent, every write then failing (EIO on open files, EROFS on new ones). Here the
error is raised on purpose through ext4's own sysfs switch, `/sys/fs/ext4/<dev>/trigger_fs_error`, which records
a file system error exactly as a failing block would. The journal is aborted, so the only way back is the one a
box takes: stop the agent (a reboot), `e2fsck` (journal replay), mount read-write, start again.

Needs root (mount, loop devices). Every method is blocking: call them through `asyncio.to_thread`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from pathlib import Path

CMD_TIMEOUT_S = 60.0
UMOUNT_TRIES = 20


class DiskError(RuntimeError):
    pass


def _run(*argv: str, ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=CMD_TIMEOUT_S, check=False)
    if done.returncode not in ok:
        raise DiskError(f"{' '.join(argv)}: exit {done.returncode}: {(done.stderr or done.stdout).strip()[-400:]}")
    return done


class DataDisk:
    def __init__(self, image: Path, mountpoint: Path, size_mb: int) -> None:
        self.image, self.mountpoint, self.size_mb = image, mountpoint, size_mb
        self.mounted = False
        self.filler = mountpoint / "chaos-filler"
        self.repairs: list[str] = []  # e2fsck's summary line of each repair
        self.keep_image = True  # left (unmounted) for a post-mortem unless the run says otherwise

    @staticmethod
    def missing_tools() -> list[str]:
        return [t for t in ("mkfs.ext4", "e2fsck", "mount", "umount", "findmnt") if shutil.which(t) is None]

    def create(self) -> None:
        self.image.parent.mkdir(parents=True, exist_ok=True)
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        with self.image.open("wb") as f:
            f.truncate(self.size_mb * 1024 * 1024)
        # -m 0: no blocks reserved for root (the agent runs as root here: "full" must be full for it too)
        _run("mkfs.ext4", "-q", "-F", "-m", "0", "-L", "chaos-data", str(self.image))
        self.mount()

    def mount(self) -> None:
        _run("mount", "-o", "loop,errors=remount-ro", str(self.image), str(self.mountpoint))
        self.mounted = True

    def device(self) -> str:
        """The loop device's name (loop3), for /sys/fs/ext4/<name>/."""
        source = _run("findmnt", "-no", "SOURCE", str(self.mountpoint)).stdout.strip()
        return os.path.basename(os.path.realpath(source))

    def options(self) -> str:
        return _run("findmnt", "-no", "OPTIONS", str(self.mountpoint), ok=(0, 1)).stdout.strip()

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.mountpoint).free

    # -- full --------------------------------------------------------------------------------------------------

    def fill(self) -> int:
        """Take every free byte; returns how many the filler holds."""
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            with contextlib.suppress(OSError):
                os.posix_fallocate(fd, 0, max(1, self.free_bytes() - 64 * 1024))
            os.lseek(fd, 0, os.SEEK_END)
            for size in (65536, 4096, 512, 1):  # the last blocks, down to the byte
                chunk = b"\0" * size
                with contextlib.suppress(OSError):
                    for _ in range(10_000):
                        os.write(fd, chunk)
            with contextlib.suppress(OSError):
                os.fsync(fd)
            return os.fstat(fd).st_size
        finally:
            os.close(fd)

    def unfill(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.filler.unlink()

    # -- read-only -----------------------------------------------------------------------------------------------

    def fail(self, why: str = "chaos: worn SD card") -> None:
        """Record an ext4 error: with errors=remount-ro the kernel makes the mounted file system read-only."""
        Path(f"/sys/fs/ext4/{self.device()}/trigger_fs_error").write_text(why + "\n")

    def read_only(self) -> bool:
        opts = self.options().split(",")
        return "ro" in opts or "emergency_ro" in opts

    def repair(self) -> str:
        """After `fail`, with the agent stopped: unmount, e2fsck (replays the journal), mount again."""
        self.umount()
        done = _run("e2fsck", "-fy", str(self.image), ok=(0, 1, 2))  # 1, 2: errors corrected
        summary = next((ln for ln in reversed(done.stdout.splitlines()) if "files" in ln), "").strip()
        self.repairs.append(f"e2fsck exit {done.returncode}: {summary}")
        self.mount()
        return self.repairs[-1]

    def umount(self) -> None:
        if not self.mounted:
            return
        last = ""
        for _ in range(UMOUNT_TRIES):  # a process that just exited may still be closing its files
            done = subprocess.run(
                ["umount", str(self.mountpoint)], capture_output=True, text=True, timeout=CMD_TIMEOUT_S, check=False
            )
            if done.returncode == 0:
                self.mounted = False
                return
            last = done.stderr.strip()
            time.sleep(0.25)
        raise DiskError(f"umount {self.mountpoint}: {last}")

    def close(self) -> None:
        """Unmount whatever state it is in (lazily if something still holds it); remove the image unless kept."""
        if self.mounted:
            with contextlib.suppress(OSError):  # a read-only file system keeps it: it goes with the image
                self.unfill()
        try:
            self.umount()
        except DiskError:
            subprocess.run(
                ["umount", "-l", str(self.mountpoint)], capture_output=True, timeout=CMD_TIMEOUT_S, check=False
            )
            self.mounted = False
        if not self.keep_image:
            with contextlib.suppress(FileNotFoundError):
                self.image.unlink()
