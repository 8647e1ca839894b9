"""A simulated IP camera on loopback, for the recorder and clip tests.

ffmpeg encodes its own test picture (testsrc2) and a tone live (`-re`, libx264 with a fixed GOP, zerolatency)
to MPEG-TS on a loopback UDP port; GStreamer's RTSP server (tests/rtsp_server.py, run by Debian's
/usr/bin/python3 because `gi` is a Debian package) serves that as H.264 + AAC (or G.711) over RTSP, as a
camera does.

Every frame carries the wall time at which it was captured (the encoder's start plus the frame's time): a
barcode of 32 cells across the top left (the milliseconds since the epoch modulo 2**32, most significant bit
first, white = 1), and the time as text for a human. `burned_times()` reads the barcode back from any video,
so a test can tell which moment a clip really starts and ends on.

    async with SimulatedCamera(tmp_path / "camera") as camera:
        camera.url            # rtsp://127.0.0.1:<port>/cam
        await camera.kill()   # the camera dies: its RTSP server and encoder are gone
        await camera.restart()  # ... and comes back on the same port
        camera.freeze()       # the encoder stops (SIGSTOP): RTSP connection open, no frames
        camera.thaw()

Debian packages: ffmpeg, python3-gi, gir1.2-gst-rtsp-server-1.0, gstreamer1.0-plugins-good (udpsrc, rtp,
aacparse), gstreamer1.0-plugins-bad (tsdemux, h264parse); `make test-deps` installs them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Self

SYSTEM_PYTHON = Path("/usr/bin/python3")
SERVER_SCRIPT = Path(__file__).with_name("rtsp_server.py")
FONT = Path("/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf")
HOST = "127.0.0.1"
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
DECODE_TIMEOUT_S = 30.0

BITS = 32
CELL = 16  # barcode cell size in pixels: big enough to survive 2 Mbit/s H.264 untouched
BAR_W, BAR_H = BITS * CELL, CELL * 2


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def _filter_graph(fps: int) -> str:
    # The frame's pts becomes its capture time in ms since the epoch (the filter graph's start, RTCSTART, plus
    # the frame's own time) just long enough for geq to draw its bits into a 32x2 strip, scaled up to cells;
    # then the frames get their own timestamps back for the encoder. A capture time, not the time the filter
    # ran (RTCTIME): ffmpeg makes the first frames in a burst while x264 starts, as a camera never would.
    bit = "mod(floor(T*1000/pow(2\\,31-X))\\,2)"
    graph = (
        "[0:v]settb=1/1000,setpts=RTCSTART/1000+PTS,split[pic][strip];"
        f"[strip]crop=32:2:0:0,geq=lum='255*{bit}':cb=128:cr=128,scale={BAR_W}:{BAR_H}:flags=neighbor[bar];"
        f"[pic][bar]overlay=0:0,settb=1/{fps},setpts=N"
    )
    if FONT.exists():
        graph += (
            f",drawtext=fontfile={FONT}:text='%{{localtime\\:%T}} frame %{{n}}'"
            f":x=8:y={BAR_H + 8}:fontsize=32:fontcolor=white:box=1:boxcolor=black"
        )
    return graph + "[v]"


class SimulatedCamera:
    """An RTSP camera on loopback (see the module docstring). Ports stay the same across `restart()`."""

    def __init__(
        self,
        directory: Path,
        *,
        size: str = "1280x720",
        fps: int = 25,
        gop: int = 25,
        bitrate: str = "2M",
        path: str = "/cam",
        audio: str = "aac",
    ) -> None:
        self.directory = directory
        self.size = size
        self.fps = fps
        self.gop = gop
        self.bitrate = bitrate
        self.path = path
        self.audio = audio  # aac, pcma (G.711 A-law) or none
        self.rtsp_port = free_tcp_port()
        self.udp_port = free_udp_port()
        self._server: asyncio.subprocess.Process | None = None
        self._encoder: asyncio.subprocess.Process | None = None
        self._starts = 0

    @property
    def url(self) -> str:
        return f"rtsp://{HOST}:{self.rtsp_port}{self.path}"

    @property
    def encoder_pid(self) -> int | None:
        return self._encoder.pid if self._encoder else None

    def encoder_command(self) -> list[str]:
        return [
            "ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "warning",
            "-re", "-f", "lavfi", "-i", f"testsrc2=size={self.size}:rate={self.fps}",
            "-re", "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000",
            "-filter_complex", _filter_graph(self.fps),
            "-map", "[v]", *(["-map", "1:a"] if self.audio != "none" else []),
            "-c:v", "libx264", "-preset", "ultrafast", "-tune", "zerolatency", "-pix_fmt", "yuv420p",
            "-g", str(self.gop), "-keyint_min", str(self.gop), "-sc_threshold", "0",
            "-b:v", self.bitrate, "-maxrate", self.bitrate, "-bufsize", self.bitrate,
            "-c:a", "aac", "-b:a", "64k",
            "-muxdelay", "0", "-muxpreload", "0",
            "-f", "mpegts", f"udp://{HOST}:{self.udp_port}?pkt_size=1316",
        ]  # fmt: skip

    async def __aenter__(self) -> Self:
        self.directory.mkdir(parents=True, exist_ok=True)
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.kill()

    async def start(self) -> None:
        if self._server is not None or self._encoder is not None:
            raise RuntimeError("camera already running")
        self._starts += 1
        log = self.directory / f"server-{self._starts}.log"
        with log.open("wb") as stderr:
            self._server = await asyncio.create_subprocess_exec(
                str(SYSTEM_PYTHON), str(SERVER_SCRIPT),
                "--rtsp-port", str(self.rtsp_port), "--udp-port", str(self.udp_port), "--path", self.path,
                "--audio", self.audio,
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=stderr,
                start_new_session=True,
            )  # fmt: skip
        assert self._server.stdout is not None
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                line = await self._server.stdout.readline()
        except TimeoutError:
            line = b""
        if line.strip() != b"ready":
            await self.kill()
            raise RuntimeError(f"RTSP server did not start: {log.read_text()[-2000:]}")
        with (self.directory / f"encoder-{self._starts}.log").open("wb") as stderr:
            self._encoder = await asyncio.create_subprocess_exec(
                *self.encoder_command(),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,
            )

    async def kill(self) -> None:
        """The camera dies: both processes get SIGKILL (a stopped one too)."""
        procs = [p for p in (self._encoder, self._server) if p is not None]
        self._encoder = self._server = None
        for proc in procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
        for proc in procs:
            async with asyncio.timeout(STOP_TIMEOUT_S):
                await proc.wait()

    async def restart(self) -> None:
        await self.kill()
        await self.start()

    def freeze(self) -> None:
        """The picture freezes: the encoder stops, the RTSP server keeps the connection open."""
        assert self._encoder is not None
        os.killpg(self._encoder.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        assert self._encoder is not None
        os.killpg(self._encoder.pid, signal.SIGCONT)


def decode_barcode(gray: bytes, near: datetime) -> datetime:
    """The wall time in one BAR_W x BAR_H gray frame of the barcode, resolved to the 2**32 ms period
    nearest `near`."""
    assert len(gray) == BAR_W * BAR_H
    row = (CELL // 2) * BAR_W
    value = 0
    for k in range(BITS):
        value = (value << 1) | (gray[row + k * CELL + CELL // 2] >= 128)
    near_ms = int(near.timestamp() * 1000)
    period = 1 << BITS
    base = near_ms - near_ms % period + value
    ms = min((base - period, base, base + period), key=lambda c: abs(c - near_ms))
    return datetime.fromtimestamp(ms / 1000, UTC)


async def burned_times(
    video: Path, near: datetime, *, frames: int | None = None, last_s: float | None = None, skip_s: float = 0
) -> list[datetime]:
    """The wall times burned into the frames of `video`: the first `frames` (from `skip_s` seconds in), or
    those of its last `last_s` seconds; `near` is any time within 24 days of them."""
    window = ["-sseof", f"-{last_s}"] if last_s is not None else []
    count = ["-frames:v", str(frames)] if frames is not None else []
    proc = await asyncio.create_subprocess_exec(
        "ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "error", *window, "-i", str(video), "-ss", str(skip_s),
        "-map", "0:v:0", *count, "-vf", f"crop={BAR_W}:{BAR_H}:0:0", "-f", "rawvideo", "-pix_fmt", "gray", "-",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(DECODE_TIMEOUT_S):
        out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"ffmpeg could not read the barcode of {video}: {err.decode()[-1000:]}")
    size = BAR_W * BAR_H
    return [decode_barcode(out[i : i + size], near) for i in range(0, len(out) - size + 1, size)]
