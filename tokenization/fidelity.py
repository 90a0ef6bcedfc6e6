"""How much of a synthetic video's subject survives a tokenizer: PSNR inside the object masks, not just overall.

A tokenizer can score well on whole frames by reproducing the background while the moving object — the only
thing the action classes depend on — turns into a smudge. `vimpac synth` knows every frame's scene, so for its
videos we can measure the object itself: the synthesizer renders, at each decoded frame's time, how much of every
pixel the subjects cover, their colour, and the frame without them (`synth.render_subjects`). Those pictures go
through the same swscale resize and centre crop as the video frames, and the tokenizer's reconstruction is scored

  psnr              over the whole frame,
  subject_psnr      over pixels at least half covered by a subject,
  flat_*            the same for the frame replaced by its own mean colour (the trivial baseline),
  subject_kept      the share of fully covered pixels whose reconstruction is nearer (RGB distance) to the
                    subject's colour than to what the frame shows there without the subject.

Only corpora written by `vimpac synth` (a folder with synth.json) can be measured, with a tokenizer that decodes.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import av
import numpy as np

from vimpac.errors import UsageError
from vimpac.tokenization.decode import iter_frames, resize_frame
from vimpac.tokenization.synth import MANIFEST_FILE, PlannedVideo, SynthConfig, plan_labeled, render_subjects
from vimpac.tokenization.tokenizer import Tokenizer
from vimpac.tokenization.views import crop_offsets

FIDELITY_FILE = "fidelity.json"  # written into the tokenizer directory by `vimpac train-tokenizer`
HALF, FULL = 0.5, 0.95  # coverage of a "subject pixel" and of a "fully covered" one


@dataclass(frozen=True)
class SubjectFidelity:
    """Reconstruction quality of `frames` frames of `videos` held-out videos (PSNR in dB, subject_kept in 0..1)."""

    videos: int
    frames: int
    psnr: float
    flat_psnr: float
    subject_psnr: float
    flat_subject_psnr: float
    subject_kept: float
    subject_pixels: int  # pixels (over all frames) at least half covered by a subject; the subject_* need some

    def to_dict(self) -> dict:
        """The fields, rounded, with unmeasurable ones (NaN) as None so the dict is valid JSON."""
        return {k: (None if v != v else round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}

    def summary(self) -> str:
        if self.subject_pixels == 0:
            return f"PSNR {self.psnr:.1f} dB (flat mean colour {self.flat_psnr:.1f} dB); no object pixels to measure"
        return (
            f"PSNR {self.psnr:.1f} dB (flat mean colour {self.flat_psnr:.1f} dB); inside the objects "
            f"{self.subject_psnr:.1f} dB (flat {self.flat_subject_psnr:.1f} dB, {self.subject_gain:+.1f} dB), "
            f"{self.subject_kept:.0%} of object pixels nearer the object's colour than the background's "
            f"({self.videos} held-out videos, {self.frames} frames)"
        )

    @property
    def subject_gain(self) -> float:
        """How far the tokenizer beats a flat picture inside the objects, dB."""
        return self.subject_psnr - self.flat_subject_psnr


def find_corpus(path: str | Path) -> Path | None:
    """The `vimpac synth` output folder that holds `path` (itself or up to two levels above), or None."""
    path = Path(path).resolve()
    for folder in (path, *list(path.parents)[:2]):
        if (folder / MANIFEST_FILE).is_file():
            return folder
    return None


def corpus_config(corpus: str | Path) -> SynthConfig:
    """The SynthConfig that wrote `corpus`, from its synth.json (so its scenes can be planned again)."""
    corpus = Path(corpus)
    try:
        args = json.loads((corpus / MANIFEST_FILE).read_text())["args"]
    except (OSError, ValueError, KeyError) as err:
        raise UsageError(f"{corpus / MANIFEST_FILE} is not a readable `vimpac synth` manifest ({err})") from None
    fields = {name: value for name, value in args.items() if name in SynthConfig.__dataclass_fields__}
    for name in ("size", "clip_seconds", "classes"):
        if fields.get(name) is not None:
            fields[name] = tuple(fields[name])
    return SynthConfig(**{**fields, "out": corpus})


def heldout_videos(corpus: str | Path, split: str = "validation") -> list[PlannedVideo]:
    """The labeled videos of `split` in `corpus`, with their scenes, in id order."""
    planned = [p for p in plan_labeled(corpus_config(corpus)) if p.split == split]
    return sorted(planned, key=lambda p: int(p.id))


@dataclass(frozen=True)
class Holdout:
    """The validation videos of the `vimpac synth` corpus holding a video folder: their scenes and their files."""

    corpus: Path
    videos: list[PlannedVideo]

    @property
    def files(self) -> list[Path]:
        ext = corpus_config(self.corpus).ext
        return [self.corpus / "videos" / f"{video.id}.{ext}" for video in self.videos]


def synth_holdout(videos_dir: str | Path) -> Holdout | None:
    """The held-out videos to keep from a tokenizer trained on `videos_dir`, or None if it is not (in) a synth
    corpus with validation videos."""
    corpus = find_corpus(videos_dir)
    videos = heldout_videos(corpus) if corpus is not None else []
    return Holdout(corpus, videos) if videos else None


def _flat_sq_error(frames: np.ndarray) -> np.ndarray:
    """Squared error [N, H, W] (summed over RGB) of replacing each frame [N, H, W, 3] by its mean colour."""
    x = frames.astype(np.float64)
    return ((x - x.mean(axis=(1, 2), keepdims=True)) ** 2).sum(-1)


def _to_psnr(sq_error: float, count: float) -> float:
    """PSNR (dB, 0..255 scale) of a summed squared error over `count` pixels × 3 channels."""
    return 10.0 * math.log10(255.0**2 / max(sq_error / max(3 * count, 1), 1e-10))


def _centre(frame: np.ndarray, size: int) -> np.ndarray:
    """The centre size×size square of a frame [H, W, C]."""
    y, x = crop_offsets(*frame.shape[:2], size, "center")
    return frame[y : y + size, x : x + size]


def _as_decoded(image: np.ndarray, frame_size: int) -> np.ndarray:
    """A rendered float picture [H, W, 3] (0..255) resized and centre-cropped exactly as decoded frames are."""
    frame = av.VideoFrame.from_ndarray(np.clip(image + 0.5, 0, 255).astype(np.uint8), format="rgb24")
    return _centre(resize_frame(frame, frame_size), frame_size).astype(np.float64)


def measure_subject_fidelity(
    tokenizer: Tokenizer,
    corpus: str | Path,
    frame_size: int,
    fps: float,
    videos: list[PlannedVideo] | None = None,
    max_videos: int | None = 24,
) -> SubjectFidelity:
    """Score `tokenizer` on the held-out videos of a `vimpac synth` corpus (module docstring), decoded at `fps`
    with the shorter side `frame_size` and the centre frame_size square. videos: default `heldout_videos(corpus)`,
    the first `max_videos` of them."""
    corpus = Path(corpus)
    config = corpus_config(corpus)
    videos = heldout_videos(corpus) if videos is None else videos
    videos = videos[:max_videos] if max_videos is not None else videos
    if not videos:
        raise UsageError(f"{corpus} has no held-out labeled videos to measure the tokenizer on")
    sums = dict.fromkeys(("all", "flat", "subject", "flat_subject", "pixels", "subject_pixels", "kept", "full"), 0.0)
    frames_seen = 0
    for video in videos:
        path = corpus / "videos" / f"{video.id}.{config.ext}"
        frames = np.stack([_centre(f[frame_size], frame_size) for f in iter_frames(path, fps, [frame_size])])
        rebuilt = tokenizer.decode(tokenizer.encode(frames)).astype(np.float64)
        for k, (frame, rec) in enumerate(zip(frames, rebuilt)):
            # The decoder shows, at target time k / fps, the last source frame at or before it.
            t = math.floor(k * config.fps / fps + 1e-6) / config.fps
            coverage, colour, scenery = render_subjects(video.scene, min(t, video.scene.t_last))
            cover = _as_decoded(np.repeat(coverage[..., None] * 255.0, 3, axis=-1), frame_size)[..., 0] / 255.0
            colour, scenery = _as_decoded(colour, frame_size), _as_decoded(scenery, frame_size)
            error = ((rec - frame) ** 2).sum(-1)
            flat = _flat_sq_error(frame[None])[0]
            subject, full = cover >= HALF, cover >= FULL
            sums["all"] += error.sum()
            sums["flat"] += flat.sum()
            sums["subject"] += error[subject].sum()
            sums["flat_subject"] += flat[subject].sum()
            sums["pixels"] += error.size
            sums["subject_pixels"] += subject.sum()
            near_subject = ((rec - colour) ** 2).sum(-1) < ((rec - scenery) ** 2).sum(-1)
            sums["kept"] += near_subject[full].sum()
            sums["full"] += full.sum()
        frames_seen += len(frames)
    covered = sums["subject_pixels"]
    return SubjectFidelity(
        videos=len(videos),
        frames=frames_seen,
        psnr=_to_psnr(sums["all"], sums["pixels"]),
        flat_psnr=_to_psnr(sums["flat"], sums["pixels"]),
        subject_psnr=_to_psnr(sums["subject"], covered) if covered else math.nan,
        flat_subject_psnr=_to_psnr(sums["flat_subject"], covered) if covered else math.nan,
        subject_kept=float(sums["kept"] / sums["full"]) if sums["full"] else math.nan,
        subject_pixels=int(sums["subject_pixels"]),
    )


def write_fidelity(tokenizer_dir: str | Path, fidelity: SubjectFidelity) -> Path:
    """Save `fidelity` as tokenizer_dir/fidelity.json (beside the weights it describes); returns the path."""
    path = Path(tokenizer_dir) / FIDELITY_FILE
    path.write_text(json.dumps(fidelity.to_dict(), indent=2) + "\n")
    return path
