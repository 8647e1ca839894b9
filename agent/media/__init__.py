"""Camera footage for highlights: a ring recorder per IP camera and the clip cutter.

- `recorder.RingRecorder` supervises one ffmpeg per camera that copies the camera's RTSP stream, without decoding
  it, into short MPEG-TS segments under a ring directory (tmpfs), and keeps a wall-clock index of them.
- `clips.cut_clip` joins the segments that cover a highlight into one MP4 (stream copy, or a frame-exact
  re-encode on request), written atomically, with its SHA-256 and its ffprobe'd duration.

Flow for a press at P (DESIGN.md section 5): wait until a segment ending at or after P + 20 s has closed
(`wait_closed_after`), take `covering(P - 10 s, P + 20 s)`, `pin` those segments (hard links, so the ring's
pruning cannot delete them mid-cut), `cut_clip` the pinned ones, then delete the pins.

Both run ffmpeg as a subprocess in its own process group; nothing is decoded in the agent's process.
"""

from .clips import Clip, ClipError, cut_clip, probe
from .recorder import RecorderError, RingRecorder, Segment

__all__ = ["Clip", "ClipError", "RecorderError", "RingRecorder", "Segment", "cut_clip", "probe"]
