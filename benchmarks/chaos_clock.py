"""The chaos run's wall-clock step: the agent's CLOCK_REALTIME moved by an offset, its monotonic clock untouched.

Nothing in the agent lets a subprocess's wall clock be moved (`agent.trust_clock` only says whether to believe it),
and stepping the machine's own clock would move every process here, the sandbox cloud (the oracle) and the other
engineers' test runs included. So the agent runs with a small LD_PRELOAD library, compiled here from the C below,
that adds an offset to CLOCK_REALTIME, CLOCK_REALTIME_COARSE and CLOCK_TAI (clock_gettime, gettimeofday, time,
timespec_get) and to nothing else: what an NTP step does to a box. The offset is an int64 of nanoseconds at the
start of a file that the library maps shared, so a step is seen by the agent (and the ffmpeg it starts) on its
next clock read, and survives the agent's restarts, as a wrong clock does.

Why not Debian's libfaketime (0.9.10): with FAKETIME_DONT_FAKE_MONOTONIC=1, which an NTP step needs (monotonic
time never jumps), its clock_nanosleep wrapper makes every Python `time.sleep` fail with EINVAL (Python 3.11
sleeps with an absolute CLOCK_MONOTONIC deadline); without it the monotonic clock jumps with the wall clock, which
no real step does, and it also shifts every file's stat() times, which a step does not either.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import shutil
import subprocess
from pathlib import Path

SOURCE = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static int (*real_clock_gettime)(clockid_t, struct timespec *);
static volatile int64_t *offset_ns;

__attribute__((constructor)) static void chaos_clock_init(void) {
    real_clock_gettime = dlsym(RTLD_NEXT, "clock_gettime");
    const char *path = getenv("CHAOS_CLOCK_FILE");
    if (path == NULL) return;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return;
    void *p = mmap(NULL, sizeof(int64_t), PROT_READ, MAP_SHARED, fd, 0);
    close(fd);
    if (p != MAP_FAILED) offset_ns = (volatile int64_t *)p;
}

static void shift(struct timespec *ts) {
    int64_t off = offset_ns != NULL ? __atomic_load_n(offset_ns, __ATOMIC_RELAXED) : 0;
    if (off == 0) return;
    int64_t ns = (int64_t)ts->tv_nsec + off % 1000000000LL;
    ts->tv_sec += off / 1000000000LL + ns / 1000000000LL;
    ns %= 1000000000LL;
    if (ns < 0) { ns += 1000000000LL; ts->tv_sec -= 1; }
    ts->tv_nsec = ns;
}

int clock_gettime(clockid_t id, struct timespec *ts) {
    if (real_clock_gettime == NULL) real_clock_gettime = dlsym(RTLD_NEXT, "clock_gettime");
    int rc = real_clock_gettime(id, ts);
    if (rc == 0 && (id == CLOCK_REALTIME || id == CLOCK_REALTIME_COARSE || id == CLOCK_TAI)) shift(ts);
    return rc;
}

struct chaos_timeval { long tv_sec; long tv_usec; };
struct chaos_timezone { int tz_minuteswest; int tz_dsttime; };

int gettimeofday(void *tv, void *tz) {
    struct timespec ts;
    int rc = clock_gettime(CLOCK_REALTIME, &ts);
    if (rc == 0 && tv != NULL) {
        ((struct chaos_timeval *)tv)->tv_sec = ts.tv_sec;
        ((struct chaos_timeval *)tv)->tv_usec = ts.tv_nsec / 1000;
    }
    if (tz != NULL) {
        ((struct chaos_timezone *)tz)->tz_minuteswest = 0;
        ((struct chaos_timezone *)tz)->tz_dsttime = 0;
    }
    return rc;
}

time_t time(time_t *out) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    if (out != NULL) *out = ts.tv_sec;
    return ts.tv_sec;
}

int timespec_get(struct timespec *ts, int base) {
    if (base != TIME_UTC) return 0;
    return clock_gettime(CLOCK_REALTIME, ts) == 0 ? base : 0;
}
"""

BUILD_TIMEOUT_S = 60.0


class WallClock:
    """The offset file and the library; `env()` is what the agent's environment needs, `step()` moves it."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.library = directory / "chaos_clock.so"
        self.offset_file = directory / "chaos_clock.offset"
        self.offset_s = 0.0
        self.error: str | None = None
        self._map: mmap.mmap | None = None
        self._cell: ctypes.c_int64 | None = None  # the mapped int64 itself

    def build(self) -> bool:
        """Compile the library (cc) and create the offset file at 0; False (with `error`) when it cannot."""
        compiler = shutil.which("cc") or shutil.which("gcc")
        if compiler is None:
            self.error = "no C compiler (cc): the clock step needs one (Debian package gcc)"
            return False
        self.directory.mkdir(parents=True, exist_ok=True)
        source = self.directory / "chaos_clock.c"
        source.write_text(SOURCE, encoding="utf-8")
        built = subprocess.run(
            [compiler, "-shared", "-fPIC", "-O2", "-o", str(self.library), str(source), "-ldl"],
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_S,
            check=False,
        )
        if built.returncode != 0:
            self.error = f"cc failed: {built.stderr.strip()[-400:]}"
            return False
        with self.offset_file.open("wb") as f:
            f.write(b"\0" * mmap.PAGESIZE)
        fd = os.open(self.offset_file, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, mmap.PAGESIZE)
        finally:
            os.close(fd)
        self._cell = ctypes.c_int64.from_buffer(self._map)
        return True

    @property
    def available(self) -> bool:
        return self._map is not None

    def env(self) -> dict[str, str]:
        if not self.available:
            return {}
        return {"LD_PRELOAD": str(self.library), "CHAOS_CLOCK_FILE": str(self.offset_file)}

    def step(self, offset_s: float) -> None:
        """Set the agent's wall clock to real time + offset_s: one aligned 8-byte store into the shared page, so
        a reader sees the old offset or the new one."""
        assert self._cell is not None, "the clock library was not built"
        self._cell.value = int(offset_s * 1e9)
        self.offset_s = offset_s

    def close(self) -> None:
        if self._cell is not None:
            self.step(0.0)
            self._cell = None  # the mapping cannot close while a ctypes view holds it
        if self._map is not None:
            self._map.close()
            self._map = None
