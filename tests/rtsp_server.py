"""An RTSP server for the simulated camera: re-serves an MPEG-TS stream arriving on a loopback UDP port as
H.264 + AAC over RTSP, as an IP camera would serve them.

Run by Debian's /usr/bin/python3, not the project's virtual environment: `gi` and GstRtspServer are Debian
packages (python3-gi, gir1.2-gst-rtsp-server-1.0), not wheels. tests/cameras.py starts it; by hand:

    /usr/bin/python3 tests/rtsp_server.py --rtsp-port 8554 --udp-port 5004 --path /cam

It prints "ready" on stdout once the port is bound, and runs until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import signal
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402 - gi.require_version must come first

# tsdemux makes its pads when the first packets arrive; the payloaders are named pay0/pay1 so the RTSP server
# finds them before that. config-interval=-1 sends SPS/PPS with every keyframe, so a client that joins mid-stream
# (or after a camera restart) can decode from the next keyframe on.
VIDEO = (
    "udpsrc address=127.0.0.1 port={udp_port} buffer-size=4194304"
    ' caps="video/mpegts,systemstream=(boolean)true,packetsize=(int)188"'
    " ! tsdemux name=demux latency=0"
    " demux. ! queue ! h264parse config-interval=-1 ! rtph264pay name=pay0 pt=96"
)
AUDIO = {
    "aac": " demux. ! queue ! aacparse ! rtpmp4gpay name=pay1 pt=97",  # the encoder's AAC, from the stream
    # G.711 A-law, as many cameras send, transcoded from the encoder's AAC: MPEG-TS cannot carry G.711, and a
    # source of its own here (audiotestsrc) would make the media seekable, and tsdemux fail the PLAY's seek.
    "pcma": (
        " demux. ! queue ! aacparse ! faad ! audioconvert ! audioresample ! audio/x-raw,rate=8000,channels=1"
        " ! alawenc ! rtppcmapay name=pay1"
    ),
    "none": "",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rtsp-port", type=int, required=True)
    parser.add_argument("--udp-port", type=int, required=True)
    parser.add_argument("--path", default="/cam")
    parser.add_argument("--audio", choices=sorted(AUDIO), default="aac")
    args = parser.parse_args()

    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(args.rtsp_port))
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(f"( {VIDEO.format(udp_port=args.udp_port)}{AUDIO[args.audio]} )")
    # One pipeline for all clients: a second udpsrc on the same port would steal half the datagrams.
    factory.set_shared(True)
    server.get_mount_points().add_factory(args.path, factory)
    if server.attach(None) == 0:
        print(f"cannot listen on 127.0.0.1:{args.rtsp_port}", file=sys.stderr, flush=True)
        sys.exit(1)

    loop = GLib.MainLoop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        GLib.unix_signal_add(GLib.PRIORITY_HIGH, signum, loop.quit)
    print("ready", flush=True)
    loop.run()


if __name__ == "__main__":
    main()
