"""Training the VQ-VAE tokenizer on frames sampled from a directory of videos.

Frames are decoded at `fps` with their shorter side resized to `frame_size` (the scale `vimpac tokenize` will
show the tokenizer), and a bounded, uniformly random subset of them (reservoir sampling) is kept in memory.
A few of those are held out to measure reconstruction PSNR; training draws random `crop_size` squares with
random horizontal flips — the network is fully convolutional, so small crops train it for full frames at a
fraction of the cost.

The output directory is a tokenizer directory (config.json + model.safetensors, usable by `load_tokenizer`)
plus `train_state.pt`, the exact training state (weights, EMA codebook, optimizer, step, RNG states). Both are
rewritten atomically every `checkpoint_every` steps; rerunning the same command resumes from the state and, with
the same videos, ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from vimpac.atomic_write import atomic_path
from vimpac.devices import resolve_device
from vimpac.errors import UsageError
from vimpac.tokenization.annotations import VIDEO_EXTENSIONS
from vimpac.tokenization.decode import DecodeError, iter_frames
from vimpac.tokenization.vqvae import VQVAE, VQVAEConfig, frames_to_input, output_to_frames, save_vqvae

STATE_FILE = "train_state.pt"
# Settings that may change between a run and its resumption; every other setting must match the saved state.
RESUMABLE_CHANGES = frozenset({"steps", "device", "log_every", "checkpoint_every"})


@dataclass(frozen=True)
class TrainSettings:
    """Everything that determines a training run (recorded in train_state.pt and config.json)."""

    model: VQVAEConfig = field(default_factory=VQVAEConfig)
    steps: int = 600
    batch_size: int = 32
    lr: float = 1e-3
    frame_size: int = 128  # frames are resized to this shorter side; held-out PSNR uses centre squares of it
    crop_size: int = 64  # training crop side
    fps: float = 4.0
    seed: int = 0
    device: str = "cpu"
    max_videos: int | None = None
    pool_size: int = 2048  # frames kept in memory
    holdout: int = 32  # frames kept out of training to measure PSNR
    log_every: int = 100
    checkpoint_every: int = 200

    def validate(self) -> None:
        for name in ("frame_size", "crop_size"):
            size = getattr(self, name)
            if size < 8 or size % 8:
                raise UsageError(
                    f"--{name.replace('_', '-')} {size} must be a positive multiple of 8 (8× downsampling)"
                )
        if self.crop_size > self.frame_size:
            raise UsageError(f"--crop-size {self.crop_size} is larger than --frame-size {self.frame_size}")
        if self.steps < 0 or self.batch_size < 1 or not 0 < self.lr < math.inf or not 0 < self.fps < math.inf:
            raise UsageError("--steps must be >= 0, --batch-size >= 1, and --lr and --fps finite and > 0")
        if self.pool_size < 2 or not 1 <= self.holdout < self.pool_size:
            raise UsageError(
                f"--pool-size {self.pool_size} is too small: it must exceed the {self.holdout} frames held out to "
                "measure the tokenizer"
            )
        if self.max_videos is not None and self.max_videos < 1:
            raise UsageError(f"--max-videos {self.max_videos} must be at least 1")
        resolve_device(self.device)

    def resume_key(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in RESUMABLE_CHANGES}


@dataclass
class TrainResult:
    step: int
    psnr: float  # held-out reconstruction PSNR, dB
    baseline_psnr: float  # the same frames replaced by their mean colour, dB
    perplexity: float  # exp(entropy) of held-out code usage
    used_fraction: float  # fraction of the codebook used on the held-out frames
    fingerprint: str


def dead_after_steps(vocab_size: int, batch_size: int, crop_size: int, expected_uses: float = 10.0) -> int:
    """Steps without use after which a code counts as dead: long enough for a code used at the uniform rate to
    expect `expected_uses` assignments (P(no use) ≈ e^-10), and at least 10 steps. Codes per step: B·(crop/8)²."""
    per_step = batch_size * (crop_size // 8) ** 2
    return max(10, math.ceil(expected_uses * vocab_size / per_step))


# ---------------------------------------------------------------------------------------------------------------
# Frames


def find_videos(root: str | Path) -> list[Path]:
    """Video files under `root` (recursive, by extension), sorted; UsageError if there are none."""
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"--videos {root} is not a directory")
    videos = sorted(p for p in root.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file())
    if not videos:
        raise UsageError(
            f"no video files found under {root} (looked for {', '.join(sorted(VIDEO_EXTENSIONS))}); "
            "make synthetic ones with `vimpac synth` or point --videos at your own"
        )
    return videos


def reservoir_sample(items: Iterable, size: int, rng: np.random.Generator) -> list:
    """A uniform random subset of `size` items (all of them if fewer) from a stream, in one pass (Algorithm R)."""
    pool: list = []
    for seen, item in enumerate(items):
        if seen < size:
            pool.append(item)
        else:
            j = int(rng.integers(seen + 1))
            if j < size:
                pool[j] = item
    return pool


def _video_frames(videos: Sequence[Path], fps: float, shorter: int, warn: Callable[[str], None]):
    for path in tqdm(videos, desc="decoding videos", unit="video", file=sys.stderr, leave=False):
        try:
            for frames in iter_frames(path, fps, [shorter]):
                yield frames[shorter]
        except DecodeError as err:
            # Frames decoded before the error are kept: they are valid pictures.
            warn(f"skipping (part of) {path}: {err.stage}: {err.reason}")


def sample_frames(
    videos: Sequence[Path], settings: TrainSettings, warn: Callable[[str], None] = tqdm.write
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(training frames, held-out frames): uint8 [h, w, 3] each, shorter side `frame_size`, deterministic in seed."""
    rng = np.random.default_rng([settings.seed, 1])
    if settings.max_videos is not None and len(videos) > settings.max_videos:
        videos = [videos[i] for i in sorted(rng.choice(len(videos), settings.max_videos, replace=False))]
    frames = reservoir_sample(_video_frames(videos, settings.fps, settings.frame_size, warn), settings.pool_size, rng)
    if len(frames) < 2:
        raise UsageError(
            f"only {len(frames)} frame(s) could be decoded from {len(videos)} video(s) at {settings.fps} fps; "
            "need at least 2 (try a higher --fps or more videos)"
        )
    order = rng.permutation(len(frames))
    holdout = min(settings.holdout, len(frames) // 4) or 1
    return [frames[i] for i in order[holdout:]], [frames[i] for i in order[:holdout]]


def random_crops(frames: Sequence[np.ndarray], count: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """`count` random size×size squares from random frames, each flipped left-right with p = ½.

    Returns uint8 [count, size, size, 3].
    """
    out = np.empty((count, size, size, 3), dtype=np.uint8)
    for i in range(count):
        frame = frames[int(rng.integers(len(frames)))]
        y = int(rng.integers(frame.shape[0] - size + 1))
        x = int(rng.integers(frame.shape[1] - size + 1))
        crop = frame[y : y + size, x : x + size]
        out[i] = crop[:, ::-1] if rng.random() < 0.5 else crop
    return out


def center_squares(frames: Sequence[np.ndarray], size: int) -> np.ndarray:
    """The centre size×size square of every frame: uint8 [N, size, size, 3]."""
    out = np.empty((len(frames), size, size, 3), dtype=np.uint8)
    for i, frame in enumerate(frames):
        y, x = (frame.shape[0] - size) // 2, (frame.shape[1] - size) // 2
        out[i] = frame[y : y + size, x : x + size]
    return out


# ---------------------------------------------------------------------------------------------------------------
# Metrics (pure)


def psnr(mse_uint8: float) -> float:
    """Peak signal-to-noise ratio in dB for a mean squared error measured on the 0..255 scale."""
    return 10.0 * math.log10(255.0**2 / max(mse_uint8, 1e-10))


def mean_colour_mse(frames: np.ndarray) -> float:
    """MSE (0..255 scale) of replacing every frame [N, H, W, 3] by its own mean colour: the trivial baseline."""
    x = frames.astype(np.float64)
    return float(((x - x.mean(axis=(1, 2), keepdims=True)) ** 2).mean())


def code_usage(codes: torch.Tensor, vocab_size: int) -> tuple[float, float]:
    """(perplexity = exp(entropy of the code histogram), fraction of the vocabulary used) for codes of any shape."""
    counts = torch.bincount(codes.reshape(-1), minlength=vocab_size).double()
    p = counts[counts > 0] / counts.sum()
    return float(torch.exp(-(p * p.log()).sum())), float((counts > 0).double().mean())


@torch.no_grad()
def evaluate(model: VQVAE, frames: np.ndarray, device: torch.device, batch: int = 16) -> tuple[float, float, float]:
    """Held-out (PSNR dB, perplexity, used fraction) of `model` on frames uint8 [N, H, W, 3], in eval mode."""
    was_training = model.training
    model.eval()
    squared_error, all_codes = 0.0, []
    for start in range(0, len(frames), batch):
        x = torch.from_numpy(frames[start : start + batch]).to(device)
        codes = model.encode(frames_to_input(x))
        rec = output_to_frames(model.decode(codes))
        squared_error += float(((rec.double() - x.double()) ** 2).sum())
        all_codes.append(codes.cpu())
    model.train(was_training)
    perplexity, used = code_usage(torch.cat(all_codes), model.config.vocab_size)
    return psnr(squared_error / frames.size), perplexity, used


# ---------------------------------------------------------------------------------------------------------------
# Training loop


def _atomic_torch_save(obj: dict, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _load_state(out: Path, settings: TrainSettings) -> dict | None:
    path = out / STATE_FILE
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    differing = {
        k: (state["settings"].get(k), v) for k, v in settings.resume_key().items() if state["settings"].get(k) != v
    }
    if differing:
        listed = "; ".join(f"{k}: saved {old!r}, now {new!r}" for k, (old, new) in sorted(differing.items()))
        raise UsageError(
            f"{out} holds a training run with different settings ({listed}). Rerun with the same settings to "
            "resume (only --steps and --device may change), or choose a new --out"
        )
    return state


def train(
    settings: TrainSettings,
    train_frames: Sequence[np.ndarray],
    holdout_frames: Sequence[np.ndarray],
    out: str | Path,
    log: Callable[[str], None] = tqdm.write,
    progress: bool = True,
) -> TrainResult:
    """Train (or resume) a VQ-VAE on in-memory frames and export it into `out`; returns the final metrics.

    train_frames / holdout_frames: uint8 [h, w, 3] with both sides >= crop_size / frame_size respectively.
    """
    settings.validate()
    device = torch.device(settings.device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    holdout = center_squares(holdout_frames, settings.frame_size)
    baseline = psnr(mean_colour_mse(holdout))

    torch.manual_seed(settings.seed)
    rng = np.random.default_rng([settings.seed, 2])
    model = VQVAE(settings.model).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    step = 0
    state = _load_state(out, settings)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        rng.bit_generator.state = state["numpy_rng"]
        step = state["step"]
        log(f"resuming from {out / STATE_FILE} at step {step}")

    def checkpoint() -> tuple[str, tuple[float, float, float]]:
        metrics = evaluate(model, holdout, device)
        extra = {"train_steps": step, "heldout_psnr_db": round(metrics[0], 3)}
        _atomic_torch_save(
            {
                "settings": asdict(settings),
                "step": step,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "numpy_rng": rng.bit_generator.state,
            },
            out / STATE_FILE,
        )
        return save_vqvae(model, out, extra=extra), metrics

    bar = tqdm(total=settings.steps, initial=step, desc="training VQ-VAE", file=sys.stderr, disable=not progress)
    while step < settings.steps:
        batch = torch.from_numpy(random_crops(train_frames, settings.batch_size, settings.crop_size, rng))
        output = model(frames_to_input(batch.to(device)))
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        optimizer.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{output.loss.item():.4f}")
        if step % settings.log_every == 0 or step == settings.steps:
            value, perplexity, used = evaluate(model, holdout, device)
            log(
                f"step {step}: loss {output.loss.item():.4f}, held-out PSNR {value:.2f} dB "
                f"(mean-colour baseline {baseline:.2f} dB), code perplexity {perplexity:.0f}, used {used:.0%}"
            )
        if step % settings.checkpoint_every == 0:
            checkpoint()
    bar.close()
    fingerprint, (value, perplexity, used) = checkpoint()
    return TrainResult(step, value, baseline, perplexity, used, fingerprint)


def train_from_videos(
    videos_dir: str | Path,
    out: str | Path,
    settings: TrainSettings,
    log: Callable[[str], None] = tqdm.write,
    exclude: Collection[Path] = (),
) -> TrainResult:
    """Sample frames from the videos under `videos_dir` except those in `exclude` (kept unseen, e.g. to measure the
    tokenizer on them afterwards), then `train` into `out`."""
    settings.validate()
    excluded = {Path(p).resolve() for p in exclude}
    videos = [v for v in find_videos(videos_dir) if v.resolve() not in excluded]
    if not videos:
        raise UsageError(f"every video under {videos_dir} is held out; nothing is left to train the tokenizer on")
    log(f"sampling up to {settings.pool_size} frames at {settings.fps} fps from {len(videos)} video(s)")
    train_frames, holdout_frames = sample_frames(videos, settings, warn=log)
    log(f"{len(train_frames)} training frames, {len(holdout_frames)} held out")
    return train(settings, train_frames, holdout_frames, out, log=log)
