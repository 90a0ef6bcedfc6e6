"""Streaming video decoding with PyAV: probe, constant-rate resampling by timestamps, shorter-side resize, views.

The original decoded whole videos into memory through an ffmpeg `fps` filter (docs/reference.md §2.2). Here frames are
decoded one at a time and resampled by presentation timestamps, so a 10-minute video never sits in memory: at most
two full-resolution frames are held (the frame being shown and the one that ends it), plus the decoder's own
reference frames.

Resampling rule (same as the fps filter's "shown frame" semantics): with t_0 the first frame's time, target k is at
t_k = t_0 + k/fps for k = 0 .. floor((end - t_0)·fps + 1e-6) - 1, and shows the last source frame whose time is
<= t_k + 1e-6. `end` is when the last source frame stops being shown.

Frame selection "ffmpeg" instead reproduces the original release's extraction, libavfilter's `fps` filter (default
rounding "near", eof_action "round") followed by its `scale` filter: see `ffmpeg_fps_indices` for the rule, and
frames are resized by the `scale` filter itself (default flags: bicubic), not by swscale's area filter.

Frames are turned upright first, as players and the ffmpeg command line (autorotate) show them: a phone's
portrait video is stored landscape with a display matrix saying "rotate 90°", and decoding it as stored would give
the model sideways frames. See `Orientation`.

Every bad input raises `DecodeError(stage, reason)`; extraction records it and moves on to the next video.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from vimpac.tokenization.views import View, apply_view, resized_size, shorter_sides

STAGES = ("open", "probe", "decode", "resample")
# Tolerance for comparing float times: timestamps are rationals turned into floats, k/fps is inexact.
TIME_EPS = 1e-6
# A decode that ends this much before the declared duration is a truncated file, not a rounding difference.
TRUNCATION_SECONDS = 1.0
TRUNCATION_FRACTION = 0.1
# Use a declared stream end for the last frame's display time only if it is at most this far after that frame.
MAX_LAST_FRAME_SECONDS = 1.0
# swscale's area averaging: proper anti-aliasing when shrinking (the usual case here), bilinear-like when enlarging.
INTERPOLATION = "AREA"
# How target frames are picked and resized: "vimpac" (the rule above, area resize) or "ffmpeg" (the original
# release's fps + scale filters). A code database records both facts (FRAME_RESIZE gives the resize of each).
FRAME_SELECTIONS = ("vimpac", "ffmpeg")
DEFAULT_FRAME_SELECTION = "vimpac"
FRAME_RESIZE = {"vimpac": "area", "ffmpeg": "bicubic"}
# av_parse_video_rate reads a decimal rate with av_d2q(rate, 1001000): 29.97 -> 2997/100.
_MAX_RATE_TERM = 1001000
# Demuxers that accept almost any bytes without being video: ffmpeg renders text files as ANSI art ("tty").
_TEXT_FORMATS = frozenset({"tty"})
_MATROSKA_DURATION = re.compile(r"(\d+):(\d+):(\d+(?:\.\d*)?)")


class DecodeError(Exception):
    """A video that cannot be used: `stage` is one of STAGES, `reason` a readable one-line explanation."""

    def __init__(self, stage: str, reason: str) -> None:
        super().__init__(f"{stage}: {reason}")
        self.stage = stage
        self.reason = reason

    def __reduce__(self):
        # Default exception pickling would call __init__ with the formatted message only; workers pickle errors.
        return type(self), (self.stage, self.reason)


@dataclass(frozen=True)
class VideoInfo:
    """What the container declares about the first video stream.

    width, height: as stored (a display matrix may turn the frames by a quarter; decoding shows them upright);
    duration: seconds (0.0 when the container does not say); fps: average frame rate (0.0 when unknown);
    num_frames: frame count from the header, None when the container does not store one.
    """

    width: int
    height: int
    duration: float
    fps: float
    codec: str
    num_frames: int | None


# ---------------------------------------------------------------------------------------------------------------
# Timestamp arithmetic (pure functions)


def target_count(start: float, end: float, fps: float) -> int:
    """Number of target frames in [start, end) at `fps`: floor((end - start)·fps + 1e-6), never negative."""
    return max(0, math.floor((end - start) * fps + TIME_EPS))


def shown_until(next_time: float, start: float, fps: float, k: int, limit: int | None = None) -> int:
    """First target index >= k that is no longer shown by a frame the next source frame (at `next_time`) replaces.

    Targets k .. result-1 show the current frame. `limit` caps the result (the total target count, when known).
    Stepping k one at a time keeps t_k = start + k/fps computed exactly as in the rule, with no rounding surprises.
    """
    while (limit is None or k < limit) and start + k / fps + TIME_EPS < next_time:
        k += 1
    return k


def resample_indices(times: Sequence[float], end: float, fps: float) -> list[int]:
    """Index of the source frame shown at each target time (see the module docstring for the rule).

    times: source presentation times in seconds, ascending; end: when the last frame stops being shown (s).
    """
    if not times:
        return []
    start = times[0]
    count = target_count(start, end, fps)
    indices: list[int] = []
    k = 0
    for i in range(len(times)):
        k_next = count if i + 1 == len(times) else shown_until(times[i + 1], start, fps, k, count)
        indices.extend([i] * (k_next - k))
        k = k_next
    return indices


def fps_fraction(fps: float | Fraction) -> Fraction:
    """`fps` as the exact rational the fps filter would use for it (2 -> 2/1, 29.97 -> 2997/100)."""
    if isinstance(fps, (int, Fraction)):
        return Fraction(fps)
    return Fraction(fps).limit_denominator(_MAX_RATE_TERM)


def round_near_inf(x: Fraction) -> int:
    """x rounded to the nearest integer, halves away from zero: FFmpeg's AV_ROUND_NEAR_INF, exactly."""
    rounded = math.floor(abs(x) + Fraction(1, 2))
    return rounded if x >= 0 else -rounded


def ffmpeg_tick(time: float | Fraction, fps: float | Fraction) -> int:
    """The fps filter's output tick of a source frame at `time` s: time·fps rounded to the nearest integer, halves
    away from zero (av_rescale_q_rnd with AV_ROUND_NEAR_INF), in exact rational arithmetic."""
    return round_near_inf(Fraction(time) * fps_fraction(fps))


def ffmpeg_fps_indices(times: Sequence[float | Fraction], end: float | Fraction, fps: float | Fraction) -> list[int]:
    """Index of the source frame libavfilter's `fps` filter outputs at each tick, for source frames at `times`
    (s, presentation order; Fractions keep the filter's integer arithmetic exact) that end at `end` (s).

    Frame i falls on tick r_i = round(times[i]·fps) (`ffmpeg_tick`). Ticks run from r_0 up to, not including,
    round(end·fps); tick n shows frame j, the current frame, after advancing j while the next frame's r <= n. For
    monotonic times that is the last frame with times·fps < n + 1/2; on a constant-rate source faster than `fps`,
    the source frame nearest to the tick's time n/fps (of two equally near, the earlier). On a 30 fps source at
    2 fps: frames 7, 22, 37, 52, ... where the "vimpac" rule takes 0, 15, 30, 45, ...
    """
    if not times:
        return []
    ticks = [ffmpeg_tick(t, fps) for t in times]
    indices: list[int] = []
    j = 0
    for n in range(ticks[0], ffmpeg_tick(end, fps)):
        while j + 1 < len(ticks) and ticks[j + 1] <= n:
            j += 1
        indices.append(j)
    return indices


def frame_seconds(
    stamp: int | None,
    time_base: Fraction | None,
    previous_time: float | None,
    previous_duration: float,
    rate: float | None,
) -> float:
    """Presentation time (s) of a decoded frame.

    stamp: the frame's pts, or its dts when pts is missing (None when both are). Without a stamp the frame follows
    the previous one by that frame's duration, or by 1/rate; the first frame of such a stream is at 0.
    """
    if stamp is not None and time_base:
        return float(stamp * time_base)
    if previous_time is None:
        return 0.0
    if previous_duration > 0:
        return previous_time + previous_duration
    return previous_time + (1.0 / rate if rate else 0.0)


def stream_end(last_time: float, last_duration: float, declared_end: float | None, previous_gap: float | None) -> float:
    """When the last frame (at `last_time`, s) stops being shown.

    Prefer the frame's own duration; else the container's declared stream end if it is just after the frame (AVI
    stores no per-frame durations); else repeat the previous inter-frame gap; else the frame takes no time.
    """
    if last_duration > 0:
        return last_time + last_duration
    if declared_end is not None and last_time < declared_end <= last_time + MAX_LAST_FRAME_SECONDS:
        return declared_end
    return last_time + (previous_gap or 0.0)


def is_truncated(decoded: float, declared: float | None, frame_gap: float) -> bool:
    """Whether decoding `decoded` seconds of a stream that declares `declared` seconds means the file is cut short.

    Short by more than 1 s, or by more than 10% of the declared length; the 10% rule needs more than one frame gap
    too, because the last frame's display time is itself an estimate.
    """
    if declared is None:
        return False
    shortfall = declared - decoded
    return shortfall > TRUNCATION_SECONDS or (shortfall > TRUNCATION_FRACTION * declared and shortfall > frame_gap)


def parse_clock(text: str) -> float | None:
    """Seconds of a Matroska "HH:MM:SS.fffffffff" duration tag; None when it does not parse."""
    match = _MATROSKA_DURATION.fullmatch(text.strip())
    if match is None:
        return None
    return int(match[1]) * 3600 + int(match[2]) * 60 + float(match[3])


# ---------------------------------------------------------------------------------------------------------------
# Container access


def _ffmpeg_message(error: Exception) -> str:
    return getattr(error, "strerror", None) or str(error)


def _open(path: str | Path) -> av.container.InputContainer:
    """Open `path` for reading or raise DecodeError("open", ...) saying why it is not a readable video file."""
    path = Path(path)
    if not path.exists():
        raise DecodeError("open", f"file not found: {path}")
    if not path.is_file():
        raise DecodeError("open", f"not a regular file: {path}")
    if path.stat().st_size == 0:
        raise DecodeError("open", "file is empty (0 bytes)")
    try:
        container = _av_open(str(path))
    except av.error.PermissionError as error:
        raise DecodeError("open", f"cannot read file: {_ffmpeg_message(error)}") from error
    except av.FFmpegError as error:
        raise DecodeError("open", f"not a video file (or a damaged one): {_ffmpeg_message(error)}") from error
    if container.format.name in _TEXT_FORMATS:
        container.close()
        raise DecodeError("open", f"not a video file: ffmpeg reads it as text (format {container.format.name})")
    return container


# PyAV opens containers with FFmpeg's "genpts" flag, which makes up presentation stamps for packets that have none;
# the ffmpeg command line does not, and for AVI with B-frames the made-up ones come out of the decoder in the
# wrong order (each frame would carry another frame's time). Without it, such frames take FFmpeg's best-effort
# stamp, the decode-order dts, exactly as the command line (and so the original release's extraction) times them.
_OPEN_OPTIONS = {"fflags": "-genpts"}


def _av_open(path: str) -> av.container.InputContainer:
    """Undecodable metadata strings must not fail a video: PyAV < 19 needs `metadata_errors="ignore"` for that,
    PyAV 19 dropped the option (and ignores such errors itself)."""
    try:
        return av.open(path, metadata_errors="ignore", options=_OPEN_OPTIONS)
    except TypeError:
        return av.open(path, options=_OPEN_OPTIONS)


def _video_stream(container: av.container.InputContainer) -> av.video.stream.VideoStream:
    if not container.streams.video:
        kinds = sorted({stream.type for stream in container.streams}) or ["none"]
        raise DecodeError("probe", f"no video stream (streams: {', '.join(kinds)})")
    # FFmpeg's choice, as players make it: the stream with the most frames, not the first one, which in a Matroska
    # file can be a one-frame cover picture.
    stream = container.streams.best("video") or container.streams.video[0]
    if not stream.codec_context.width or not stream.codec_context.height:
        raise DecodeError("probe", f"video stream has no frame size (codec {stream.codec_context.name})")
    return stream


def _nominal_rate(stream: av.video.stream.VideoStream) -> float | None:
    """Frames per second the container claims: average rate, else FFmpeg's guess (IVF stores no average)."""
    for rate in (stream.average_rate, stream.guessed_rate):
        if rate:
            return float(rate)
    return None


def _stream_start(stream: av.video.stream.VideoStream) -> float:
    """Declared time (s) of the stream's first frame; 0 when the container has no clock (raw elementary streams)."""
    if stream.start_time is not None and stream.time_base:
        return float(stream.start_time * stream.time_base)
    return 0.0


def _declared_end(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream, whole_file: bool = False
) -> float | None:
    """Time (s, on the stream's clock) at which the file says the video ends; None when it does not say.

    Sources, best first: the stream header's duration (counted from the stream start); Matroska's per-stream
    DURATION tag (WebM/MKV store no stream duration, docs/design.md §11.3), which like Matroska's segment duration is
    counted from time 0; the container's duration, which also covers audio: only for a file of this one stream
    (audio that outlasts the video, common in FLV and in MKV without track durations, would otherwise make a whole
    file look truncated and stretch its last frame), or with `whole_file` (the file's length, for `probe`).
    """
    if stream.duration and stream.time_base:
        return _stream_start(stream) + float(stream.duration * stream.time_base)
    tag = stream.metadata.get("DURATION") or stream.metadata.get("duration")
    seconds = parse_clock(tag) if tag else None
    if seconds:
        return seconds
    if container.duration and (whole_file or len(container.streams) == 1):
        length = container.duration / av.time_base
        if "matroska" in container.format.name or container.start_time is None:
            return length
        return container.start_time / av.time_base + length
    return None


def probe(path: str | Path) -> VideoInfo:
    """Read the header of `path` (no decoding). Raises DecodeError for unreadable files or files without video."""
    with _open(path) as container:
        stream = _video_stream(container)
        return VideoInfo(
            width=stream.codec_context.width,
            height=stream.codec_context.height,
            duration=max(0.0, (_declared_end(container, stream, whole_file=True) or 0.0) - _stream_start(stream)),
            fps=_nominal_rate(stream) or 0.0,
            codec=stream.codec_context.name,
            num_frames=stream.frames or None,
        )


def _set_threads(stream: av.video.stream.VideoStream, threads: int) -> None:
    """threads=1: decode on the calling thread (extraction runs one process per core); >1 or 0 (= FFmpeg picks):
    frame- and slice-threaded decoding, which helps a single process on a big video."""
    stream.thread_count = threads
    if threads != 1:
        stream.thread_type = "AUTO"


@dataclass
class _Timed:
    """A decoded frame with its time and display duration in seconds (`exact`, `exact_duration`: the same as
    rationals, from the stamps and time base without rounding; for the fps filter's arithmetic)."""

    frame: av.VideoFrame
    time: float
    duration: float
    exact: Fraction
    exact_duration: Fraction


# The ffmpeg command line's default -max_error_rate: a file whose packets fail to decode more often than this fails.
MAX_ERROR_RATE = 2 / 3


def _timed_frames(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream, declared_end: float | None
) -> Iterator[_Timed]:
    """Decoded frames in presentation order with times. A packet the decoder rejects is skipped, as the ffmpeg
    command line skips it (crawled datasets hold files with a few damaged packets; the decoder conceals the loss
    in the frames after it); a demuxer failure, or more failed packets than MAX_ERROR_RATE of all, is
    DecodeError. A file of several streams whose video declares no end of its own (FLV, MKV without track
    durations) is read whole, its other streams' packets skipped, to tell a file cut short (every stream stops well
    before the container's length) from audio that outlasts the video."""
    rate = _nominal_rate(stream)
    file_end = None if declared_end is not None or len(container.streams) == 1 else _container_end(container)
    packets = container.demux() if file_end is not None else container.demux(stream)
    streams_end = float("-inf")  # where the packets of any stream end (s), with file_end
    previous: _Timed | None = None
    first_time: float | None = None
    decoded = failed = 0
    last_error: Exception | None = None

    def failure(error: Exception, what: str) -> DecodeError:
        done = 0.0 if previous is None or first_time is None else previous.time - first_time
        total = "unknown length" if declared_end is None else f"{declared_end - (first_time or 0.0):.1f} s"
        return DecodeError("decode", f"{what} after {done:.1f} s of {total}: {_ffmpeg_message(error)}")

    while True:
        try:
            packet = next(packets)
        except StopIteration:
            break
        except (av.FFmpegError, OSError) as error:
            raise failure(error, "decoding failed") from error
        if file_end is not None:
            streams_end = max(streams_end, _packet_end(packet))
            if packet.stream.index != stream.index:
                continue
        try:
            frames = packet.decode()
        except av.FFmpegError as error:
            failed, last_error = failed + 1, error
            continue
        decoded += bool(packet.size)
        for frame in frames:
            # FFmpeg's best guess (its decoder's pts when they run forward, else the dts), as the ffmpeg command
            # line takes it: containers without presentation stamps (AVI with B-frames) get made-up pts out of order.
            stamp = frame.best_effort_timestamp
            if stamp is None:
                stamp = frame.pts if frame.pts is not None else frame.dts
            time_base = frame.time_base or stream.time_base
            duration = float(frame.duration * time_base) if frame.duration and time_base else 0.0
            time = frame_seconds(
                stamp,
                time_base,
                None if previous is None else previous.time,
                0.0 if previous is None else previous.duration,
                rate,
            )
            if first_time is None:
                first_time = time
            exact = Fraction(stamp) * Fraction(time_base) if stamp is not None and time_base else Fraction(time)
            exact_duration = Fraction(frame.duration) * Fraction(time_base) if duration else Fraction(0)
            previous = _Timed(frame, time, duration, exact, exact_duration)
            yield previous
    if last_error is not None and failed > MAX_ERROR_RATE * (decoded + failed):
        raise failure(last_error, f"{failed} of {decoded + failed} packets failed to decode")
    if file_end is not None:
        start = (container.start_time or 0) / av.time_base
        gap = previous.duration if previous is not None else 0.0
        if is_truncated(streams_end - start, file_end - start, gap):
            raise DecodeError(
                "decode", f"truncated: every stream stops after {streams_end - start:.1f} s of {file_end - start:.1f} s"
            )


def _container_end(container: av.container.InputContainer) -> float | None:
    """The file's end (s) by its header: start + duration (over all streams); None when it does not say."""
    if not container.duration:
        return None
    return ((container.start_time or 0) + container.duration) / av.time_base


def _packet_end(packet: av.Packet) -> float:
    """Where a packet's data ends (s, its stream's clock); -inf for one without a time."""
    stamp = packet.pts if packet.pts is not None else packet.dts
    if stamp is None or not packet.time_base:
        return float("-inf")
    return float((stamp + (packet.duration or 0)) * packet.time_base)


# ---------------------------------------------------------------------------------------------------------------
# Display orientation


@dataclass(frozen=True)
class Orientation:
    """How a stored frame becomes the picture a player shows: transpose it (rows <-> columns) if `transpose`, then
    reverse its rows (upside down) if `flip_rows` and its columns (mirror) if `flip_cols`. These eight cases are all
    the rotations by multiples of 90° with or without a mirror."""

    transpose: bool = False
    flip_rows: bool = False
    flip_cols: bool = False

    @classmethod
    def from_matrix(cls, matrix: Sequence[int]) -> Orientation:
        """The orientation of a display matrix (9 int32, libavutil's layout: (x', y') = (a·x + c·y, b·x + d·y) with
        a, b, c, d = matrix[0], matrix[1], matrix[3], matrix[4]; x right, y down). Angles off a multiple of 90° snap
        to the nearest one (ffmpeg would rotate by the odd angle and fill the corners; such files are rare)."""
        a, b, c, d = (int(matrix[i]) for i in (0, 1, 3, 4))
        if abs(b) + abs(c) > abs(a) + abs(d):
            # x' = c·y and y' = b·x: rows of the result come from columns of the stored frame.
            return cls(transpose=True, flip_rows=b < 0, flip_cols=c < 0)
        return cls(flip_rows=d < 0, flip_cols=a < 0)

    @property
    def identity(self) -> bool:
        return not (self.transpose or self.flip_rows or self.flip_cols)

    def displayed_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) shown for a stored frame of `height` x `width`."""
        return (width, height) if self.transpose else (height, width)

    def apply(self, image: np.ndarray) -> np.ndarray:
        """[h, w, ...] as stored → [h', w', ...] as shown (contiguous)."""
        if self.transpose:
            image = image.swapaxes(0, 1)
        if self.flip_rows:
            image = image[::-1]
        if self.flip_cols:
            image = image[:, ::-1]
        return np.ascontiguousarray(image)

    def filters(self) -> list[tuple[str, str]]:
        """The same as libavfilter filters ("transpose=cclock_flip" is the plain transpose)."""
        named = [("transpose", "cclock_flip"), ("vflip", ""), ("hflip", "")]
        return [f for f, on in zip(named, (self.transpose, self.flip_rows, self.flip_cols)) if on]


def frame_orientation(frame: av.VideoFrame) -> Orientation:
    """The orientation of `frame`'s display matrix (decoders attach the stream's to every frame); identity without."""
    try:
        matrix = frame.side_data[av.sidedata.sidedata.Type.DISPLAYMATRIX]
    except KeyError:
        return Orientation()
    data = bytes(matrix)
    if len(data) != 36:  # not the 3x3 int32 matrix libavutil defines: nothing to go by
        return Orientation()
    return Orientation.from_matrix(np.frombuffer(data, dtype=np.int32))


class ScaleFilter:
    """libavfilter's `scale` filter as the original release ran it (`scale=W:H`, default flags: bicubic), with the
    conversion to rgb24 in the same swscale pass (the original's later crop and flip accept rgb24, so format
    negotiation puts rgb24 on the scaler's output). Not swscale through `VideoFrame.reformat`: the filter places
    chroma samples differently, so the two disagree on colour edges even with the same bicubic kernel.

    `orientation` filters go before the scale, where the ffmpeg command line's autorotate puts them (the original
    release computed the scale's size from the stored frame, which squashes rotated videos; the size here is the
    shown frame's). One graph per (input geometry and pixel format, orientation, output size), built on first use.
    """

    def __init__(self) -> None:
        self._graphs: dict[tuple, tuple] = {}

    def __call__(
        self, frame: av.VideoFrame, width: int, height: int, orientation: Orientation = Orientation()
    ) -> np.ndarray:
        key = (frame.width, frame.height, frame.format.name, orientation, width, height)
        ends = self._graphs.get(key)
        if ends is None:
            graph = av.filter.Graph()
            source = graph.add_buffer(
                width=frame.width, height=frame.height, format=frame.format.name, time_base=Fraction(1, 1000)
            )
            chain = [graph.add(name, args) for name, args in orientation.filters()]
            chain += [graph.add("scale", f"{width}:{height}"), graph.add("format", "rgb24"), graph.add("buffersink")]
            for upstream, downstream in zip([source, *chain], chain):
                upstream.link_to(downstream)
            sink = chain[-1]
            graph.configure()
            ends = self._graphs[key] = (graph, source, sink)
        _, source, sink = ends
        source.push(frame)
        return sink.pull().to_ndarray()


def resize_frame(
    frame: av.VideoFrame, shorter: int, selection: str = DEFAULT_FRAME_SELECTION, scaler: ScaleFilter | None = None
) -> np.ndarray:
    """uint8 [h, w, 3] RGB of `frame` turned upright (`frame_orientation`) with its shorter side scaled to `shorter`
    (resized_size rule): swscale's area filter for selection "vimpac", libavfilter's `scale` filter (bicubic) for
    "ffmpeg" (`scaler` reuses graphs)."""
    orientation = frame_orientation(frame)
    h, w = resized_size(*orientation.displayed_size(frame.height, frame.width), shorter)
    if selection == "ffmpeg":
        return (scaler or ScaleFilter())(frame, w, h, orientation)
    # Resize as stored, then turn the small result: the area filter treats rows and columns alike.
    stored_h, stored_w = orientation.displayed_size(h, w)
    rgb = frame.reformat(width=stored_w, height=stored_h, format="rgb24", interpolation=INTERPOLATION).to_ndarray()
    return rgb if orientation.identity else orientation.apply(rgb)


def _check_selection(selection: str) -> None:
    if selection not in FRAME_SELECTIONS:
        raise ValueError(f"frame selection must be one of {FRAME_SELECTIONS}, got {selection!r}")


def command_line_origin(container_start_us: int | None, time_base: Fraction | None) -> Fraction:
    """The stream time (s, exact) that the ffmpeg command line makes 0: it subtracts the file's start time (the
    container's, in microseconds) from every timestamp, rescaled to the stream's time base with rounding to the
    nearest (av_rescale_q), before any filter sees the frames. 0 when the file declares no start."""
    if not container_start_us or not time_base:
        return Fraction(0)
    ticks = Fraction(container_start_us, 1_000_000) / time_base
    return round_near_inf(ticks) * time_base


# AVFMT_TS_DISCONT: formats whose streams may start apart (MPEG-TS, MPEG-PS).
_TS_DISCONT = 0x200


def _cli_origin(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> Fraction:
    """command_line_origin of the file; for MPEG-TS/PS the command line first moves the file's start to that of the
    streams it uses (here the video alone) when that is later ("Correcting start time"), e.g. past audio that
    starts first."""
    start_us = container.start_time
    if start_us is not None and container.format.flags & _TS_DISCONT and stream.start_time is not None:
        ticks = Fraction(stream.start_time) * Fraction(stream.time_base) * 1_000_000
        start_us = max(start_us, round_near_inf(ticks))
    return command_line_origin(start_us, Fraction(stream.time_base) if stream.time_base else None)


def _pads_lead_in(container: av.container.InputContainer, selection: str) -> bool:
    """Whether the first frame also fills the target ticks from the file's zero to its own (`_shown_targets`). For
    "ffmpeg": the command line's raw output is constant-rate ("cfr": the first frame repeated back to 0), except
    for an input file of exactly one stream ("vscfr": from the first frame on). The "vimpac" rule counts from
    the first frame anyway."""
    return selection != "ffmpeg" or len(container.streams) > 1


def _rule(fps: float, selection: str, origin: Fraction = Fraction(0)) -> tuple[Callable, Callable, Callable]:
    """The tick functions of a frame selection for `_shown_targets`: (first, next, end). `origin`: for "ffmpeg",
    the stream time the command line shifts to 0 (`command_line_origin`), so ticks fall where the original's
    extraction put them on files that do not start at 0 (MPEG-TS, offset MKV/MP4)."""
    if selection == "ffmpeg":
        rate = fps_fraction(fps)

        def first_tick(timed: _Timed) -> int:
            return ffmpeg_tick(timed.exact - origin, rate)

        def next_tick(timed: _Timed, start: float, tick: int) -> int:
            return ffmpeg_tick(timed.exact - origin, rate)

        def end_tick(held: _Timed, start: float, end: float) -> int:
            # The frame's own duration keeps the end exact; the fallbacks of stream_end are floats anyway.
            stop = held.exact + held.exact_duration if held.duration > 0 else Fraction(end)
            return ffmpeg_tick(stop - origin, rate)

        return first_tick, next_tick, end_tick

    def first_tick(timed: _Timed) -> int:
        return 0

    def next_tick(timed: _Timed, start: float, tick: int) -> int:
        return shown_until(timed.time, start, fps, tick)

    def end_tick(held: _Timed, start: float, end: float) -> int:
        return target_count(start, end, fps)

    return first_tick, next_tick, end_tick


def iter_frames(
    path: str | Path,
    fps: float,
    shorter_sides: Sequence[int],
    threads: int = 1,
    selection: str = DEFAULT_FRAME_SELECTION,
) -> Iterator[dict[int, np.ndarray]]:
    """Stream `path` resampled to `fps`: one {shorter: uint8 [h, w, 3]} per target time, in time order.

    Each frame is resized so its shorter side equals `shorter` (long side truncated, `resized_size`), with swscale
    area interpolation straight from the decoder's pixel format. A source frame shown at several target times is
    resized once and its arrays are yielded again (do not modify them). Dropped frames are never converted.
    `threads`: decoder threads (see `_set_threads`); 1 suits one process per core. `selection` "ffmpeg" picks
    frames as the fps filter (`ffmpeg_fps_indices`) and resizes with the scale filter (module docstring).

    Raises DecodeError: "open"/"probe" before the first item; "decode" when the decoder fails mid-stream or the
    stream ends well before its declared duration (truncated file) — the error can come after some items were
    yielded, so callers must drop partial results; "resample" when the video is too short for one target frame.
    """
    for _, frames in _decoded_targets(path, fps, shorter_sides, threads, selection):
        yield frames


def _decoded_targets(
    path: str | Path,
    fps: float,
    shorter_sides: Sequence[int],
    threads: int,
    selection: str,
    keep: Collection[int] | None = None,
) -> Iterator[tuple[int, dict[int, np.ndarray] | None]]:
    """(k, frames) for every target k = 0, 1, ... of `path` (see iter_frames); frames is None, and the source frame
    is not converted, for a k outside `keep` (None keeps every k)."""
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    _check_selection(selection)
    sides = list(dict.fromkeys(shorter_sides))
    scaler = ScaleFilter() if selection == "ffmpeg" else None

    def resize(frame: av.VideoFrame) -> dict[int, np.ndarray]:
        return {shorter: resize_frame(frame, shorter, selection, scaler) for shorter in sides}

    with _open(path) as container:
        stream = _video_stream(container)
        _set_threads(stream, threads)
        declared_end = _declared_end(container, stream)
        timed = _timed_frames(container, stream, declared_end)
        rule = _rule(fps, selection, _cli_origin(container, stream))
        lead_in = _pads_lead_in(container, selection)
        yield from _shown_targets(timed, declared_end, _stream_start(stream), fps, rule, resize, keep, lead_in)


def _shown_targets(
    timed_frames: Iterable[_Timed],
    declared_end: float | None,
    stream_start: float,
    fps: float,
    rule: tuple[Callable, Callable, Callable],
    resize: Callable,
    keep: Collection[int] | None,
    lead_in: bool = True,
) -> Iterator[tuple[int, dict | None]]:
    """The streaming loop under iter_frames for either selection rule: each frame is held and shown at every target
    tick before the tick the next frame takes over. `rule` gives the first frame's tick (`first(timed)`), the tick
    a later frame takes over at (`next(timed, start, current tick)`) and the end (`end(last frame, start, end
    time)`: one past the last tick). Yields (k, resize(frame)) per target k counted from 0, or (k, None) for a k
    outside `keep` (None keeps all). `lead_in`: the first frame also fills the ticks from 0 to its own."""
    first_tick, next_tick, end_tick = rule
    held: _Timed | None = None
    first = tick = zero = 0
    start = 0.0
    gap: float | None = None

    def show(frame: av.VideoFrame | None, stop: int) -> Iterator[tuple[int, dict | None]]:
        resized = None
        # The first frame shown also fills the ticks from 0 to its own: a stream that starts after its file
        # (the ffmpeg command line's zero) is padded with it there, as that command line's constant-rate output is.
        begin = zero if tick == first else tick
        for k in range(begin - zero, stop - zero):
            if keep is not None and k not in keep:
                yield k, None
                continue
            if resized is None:
                resized = resize(frame)
            yield k, dict(resized)

    for timed in timed_frames:
        if held is None:
            start = timed.time
            first = tick = first_tick(timed)
            zero = min(first, 0) if lead_in else first
        else:
            took_over = next_tick(timed, start, tick)
            if took_over > tick:
                yield from show(held.frame, took_over)
                tick = took_over
            gap = timed.time - held.time
        held = timed
    if held is None:
        total = "unknown length" if declared_end is None else f"{declared_end - stream_start:.1f} s"
        raise DecodeError("decode", f"truncated or damaged: no frame could be decoded (declared {total})")
    end = stream_end(held.time, held.duration, declared_end, gap)
    declared = None if declared_end is None else declared_end - start
    if is_truncated(end - start, declared, gap or held.duration):
        raise DecodeError("decode", f"truncated: decoding stopped after {end - start:.1f} s of {declared:.1f} s")
    stop = end_tick(held, start, end)
    if stop <= first:
        raise DecodeError("resample", f"too short: {end - start:.2f} s gives no frame at {fps:g} fps")
    if stop > tick:
        yield from show(held.frame, stop)


def count_targets(path: str | Path, fps: float, selection: str = DEFAULT_FRAME_SELECTION) -> int | None:
    """How many frames iter_frames(path, fps) yields, from the packets' timestamps alone (no decoding, so a small
    fraction of a decode's time). Decoding normally gives each frame its packet's stamp and duration, so the count
    is the decode's; None when a packet carries no stamp at all. A file whose decoder drops or re-stamps frames
    (or, without presentation stamps, delays them) can still differ: `planned_view_frames` checks the count
    against its decode.

    Raises DecodeError like iter_frames for what the packets alone show (open, probe, truncated, too short)."""
    _check_selection(selection)
    with _open(path) as container:
        stream = _video_stream(container)
        declared_end = _declared_end(container, stream)
        time_base = stream.time_base
        stamps = []
        for packet in container.demux(stream):
            # size 0: the demuxer's end-of-stream marker; discard: outside an edit list, decoded but never output
            if packet.size == 0 or packet.is_discard:
                continue
            # No presentation stamp (AVI): the decoder's best effort is the dts, late only by its reordering delay
            stamp = packet.pts if packet.pts is not None else packet.dts
            if stamp is None or not time_base:
                return None
            stamps.append((stamp, packet.duration or 0))
        stamps.sort()
        timed = (
            _Timed(
                None, float(pts * time_base), float(d * time_base), pts * Fraction(time_base), d * Fraction(time_base)
            )
            for pts, d in stamps
        )
        rule = _rule(fps, selection, _cli_origin(container, stream))
        lead_in = _pads_lead_in(container, selection)
        targets = _shown_targets(timed, declared_end, _stream_start(stream), fps, rule, None, (), lead_in)
        return sum(1 for _ in targets)


def check_view_crops(views: Sequence[View], out: int) -> None:
    """ValueError when a view's resize leaves the shorter side below the `out` px square it crops."""
    too_small = [view.name for view in views if view.shorter < out]
    if too_small:
        raise ValueError(f"views {too_small} resize the shorter side below the crop size {out}")


def planned_view_frames(
    path: str | Path,
    fps: float,
    views: Sequence[View],
    out: int,
    plan: Callable[[int], Sequence[int]],
    threads: int = 1,
    selection: str = DEFAULT_FRAME_SELECTION,
) -> tuple[int, list[int], np.ndarray]:
    """Only the frames a consumer will read: (n, indices, frames uint8 [V, len(indices), out, out, 3]), where n is
    the number of frames iter_view_frames would yield, indices = plan(n) (sorted, each < n) and frames are those
    frames of it. Evaluation reads K clips of T frames of a video however long it is (the plan
    vimpac.clip_windows.EvaluationFrames), so a long video costs its decode but not the conversion and encoding of
    every frame.

    n comes from the packets (`count_targets`) before decoding; should the decode find another count, the video
    is decoded again for the plan of the true count, so the result is always exact. Raises DecodeError like
    iter_frames."""
    check_view_crops(views, out)
    estimate = count_targets(path, fps, selection)
    if estimate is None:  # no stamps to count: a decode without conversion counts
        estimate = sum(1 for _ in _decoded_targets(path, fps, [], threads, selection, keep=()))
    sides = shorter_sides(views)
    for _ in range(2):
        indices = [int(i) for i in plan(estimate)]
        rows = {k: row for row, k in enumerate(indices)}
        frames = np.empty((len(views), len(indices), out, out, 3), dtype=np.uint8)
        n = 0
        for k, resized in _decoded_targets(path, fps, sides, threads, selection, keep=rows):
            if resized is not None:
                for v, view in enumerate(views):
                    frames[v, rows[k]] = apply_view(resized[view.shorter], view, out)
            n = k + 1
        if n == estimate:
            return n, indices, frames
        estimate = n
    raise DecodeError("decode", "two decodes of the file gave different frame counts")


def iter_view_frames(
    path: str | Path,
    fps: float,
    views: Sequence[View],
    out: int,
    chunk: int = 64,
    threads: int = 1,
    selection: str = DEFAULT_FRAME_SELECTION,
) -> Iterator[np.ndarray]:
    """Chunks uint8 [V, n, out, out, 3] (n <= chunk; V = len(views), in `views` order) of every view, in time order.

    Each chunk is a fresh array. Raises DecodeError like `iter_frames`, possibly after some chunks were yielded.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    check_view_crops(views, out)
    buffer = np.empty((len(views), chunk, out, out, 3), dtype=np.uint8)
    n = 0
    for resized in iter_frames(path, fps, shorter_sides(views), threads=threads, selection=selection):
        for v, view in enumerate(views):
            buffer[v, n] = apply_view(resized[view.shorter], view, out)
        n += 1
        if n == chunk:
            yield buffer
            buffer = np.empty_like(buffer)
            n = 0
    if n:
        yield buffer[:, :n]
