"""Writing small real video files for tests, including ones with chosen frame timestamps."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

CODECS = {
    ".mp4": ("libx264", "yuv420p"),
    ".webm": ("libvpx-vp9", "yuv420p"),
    ".avi": ("mpeg4", "yuv420p"),
    ".mkv": ("ffv1", "yuv444p"),
}


def gradient_frames(num: int, height: int = 64, width: int = 80, seed: int = 0) -> np.ndarray:
    """Frames whose index can be read back from pixels despite lossy coding: uint8 [num, height, width, 3].

    Frame i is a flat grey field of brightness 10 + 8·i (mod 240) in its top half; the bottom half carries a
    fixed random texture so encoders do not degenerate.
    """
    rng = np.random.default_rng(seed)
    texture = rng.integers(0, 255, size=(height - height // 2, width, 3), dtype=np.uint8)
    frames = np.empty((num, height, width, 3), dtype=np.uint8)
    for i in range(num):
        frames[i, : height // 2] = 10 + (8 * i) % 240
        frames[i, height // 2 :] = texture
    return frames


def frame_index(frame: np.ndarray) -> int:
    """Inverse of `gradient_frames`' brightness code (frame indices < 30), read from the top half's centre."""
    h, w = frame.shape[:2]
    return round((float(frame[h // 8 : h // 2 - h // 8, w // 4 : w - w // 4].mean()) - 10) / 8)


def write_video(
    path: Path | str,
    frames: np.ndarray | None = None,
    fps: int = 8,
    num_frames: int = 16,
    size: tuple[int, int] = (64, 80),
    pts_seconds: list[float] | None = None,
    display: tuple[int, bool, bool] | None = None,
) -> Path:
    """Encode `frames` (uint8 [N, H, W, 3]; default `gradient_frames`) into `path`; codec from the extension.

    `pts_seconds` gives each frame's presentation time (variable frame rate); by default frame i is at i / fps.
    `display` = (degrees, hflip, vflip) stores a display matrix: shown = the stored frame turned `degrees`
    counter-clockwise, then mirrored (PyAV's `set_display_rotation`).
    """
    path = Path(path)
    if frames is None:
        frames = gradient_frames(num_frames, *size)
    codec, pix_fmt = CODECS[path.suffix]
    time_base = Fraction(1, 1000)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = pix_fmt
        stream.time_base = time_base
        stream.codec_context.time_base = time_base
        if display is not None:
            degrees, hflip, vflip = display
            stream.set_display_rotation(degrees, hflip=hflip, vflip=vflip)
        if codec == "libx264":
            stream.options = {"crf": "10", "preset": "ultrafast"}
        elif codec == "mpeg4":
            stream.options = {"qscale": "2"}
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            seconds = pts_seconds[i] if pts_seconds is not None else i / fps
            frame.pts = round(seconds / time_base)
            frame.time_base = time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
