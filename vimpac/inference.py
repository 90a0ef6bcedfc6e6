"""Video files (or frame arrays) → tokens → class probabilities or embeddings, exactly as the evaluation sees them.

`VideoPipeline(model, info, tokenizer)` runs the steps of `vimpac tokenize` + fine-tuning's evaluation on one
video at a time, with the same functions (vimpac.inference_stream runs many videos at once, batched):
  decode     vimpac.tokenization.decode.iter_view_frames: PyAV decoding, resampled to the database's fps with its
             frame selection, each test view (shorter-side resize, square crop) at the frame size
  encode     the tokenizer of the database (fingerprint checked), at its fixed network batch
  clips      K clips per view at vimpac.clip_windows.evaluation_starts (K = 1: frame 0 with single_clip "start"), frame
             stride fps / frame_rate, PAD-padded
             (vimpac.clip_windows.take_clip), view-major as vimpac.finetune_data.FinetuneTestClips
  predict    classifier logits per clip, softmax per clip, mean (vimpac.finetune_data.average_view_probabilities)
  embed      per clip the CLS vector and the non-PAD token mean (vimpac.probe.clip_features), mean over the clips
so a video's probabilities equal those of `finetune.py --eval-only` on a code database of the same file made with
the same tokenizer and settings. The tokenizer runs on the model's device; the model in `precision` (autocast:
fp16 by default on CUDA, fp32 on the CPU). A frame array [T, H, W, 3] uint8 is taken as already at the database's
fps; its frames are resized (by the database's rule) and cropped like decoded frames, from RGB instead of the
file's YUV.

Bad videos raise vimpac.tokenization.decode.DecodeError(stage, reason): the failure kinds of `vimpac tokenize`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vimpac.clip_windows import EvaluationFrames, evaluation_clip_starts, frame_stride, take_clip
from vimpac.devices import resolve_device
from vimpac.errors import UsageError
from vimpac.finetune_data import average_view_probabilities
from vimpac.tokenization.annotations import VIDEO_EXTENSIONS
from vimpac.tokenization.code_stream import full_codes
from vimpac.tokenization.decode import (
    DEFAULT_FRAME_SELECTION,
    DecodeError,
    check_view_crops,
    iter_view_frames,
    planned_view_frames,
    resize_frame,
)
from vimpac.tokenization.views import View, apply_view, shorter_sides

FEATURES = ("cls", "mean", "both")
# The settings a video's outputs depend on (besides the model): what `embed` and `predict` record with their
# results and compare when they resume into an output.
RESULT_SETTINGS = (
    "fps",
    "frame_rate",
    "frame_size",
    "frame_selection",
    "views",
    "num_clips",
    "single_clip",
    "clip_len",
)
PRECISIONS = ("auto", "fp32", "fp16", "bf16")  # of the model; the tokenizer keeps the database's (its identity)
DEFAULT_ENCODE_BATCH = 64  # `vimpac tokenize --encode-batch`'s default


def _load_tokenizer(spec: Any, info: dict[str, Any], model_vocab: int, device: Any, trained_on: str | None = None):
    """The tokenizer `spec` (a Tokenizer, a folder, or None: the one the inference settings name), checked against
    the model's vocabulary, the database's fingerprint and `trained_on` (the export's: a `--data` database or a
    `--tokenizer` made by another tokenizer would feed the model codes that mean other things)."""
    from vimpac.tokenization.tokenizer import Tokenizer, load_tokenizer

    wanted = info.get("tokenizer") or {}
    if isinstance(spec, Tokenizer):
        tokenizer = spec
    else:
        spec = spec or wanted.get("path")
        if not spec:
            raise UsageError("the export does not name its tokenizer; pass --tokenizer DIR (the one its database used)")
        if not Path(spec).is_dir():
            raise UsageError(
                f"tokenizer {spec} not found (named by the model's inference settings); pass --tokenizer DIR with "
                "the tokenizer the model's code database was made with"
            )
        tokenizer = load_tokenizer(spec, device=device, fp16=bool(wanted.get("fp16", False)))
    if tokenizer.vocab_size != model_vocab:
        raise UsageError(
            f"tokenizer {getattr(spec, 'name', spec)} has {tokenizer.vocab_size} codes but the model was trained on "
            f"a vocabulary of {model_vocab}; pass --tokenizer with the tokenizer of the model's code database"
        )
    expected = wanted.get("fingerprint")
    if expected and tokenizer.fingerprint != expected:
        raise UsageError(
            f"tokenizer {spec} (fingerprint {tokenizer.fingerprint}) is not the one the model's code database was "
            f"made with (fingerprint {expected}); pass --tokenizer with that tokenizer"
        )
    if trained_on and tokenizer.fingerprint != trained_on:
        source = f"tokenizer {spec}" if not isinstance(spec, Tokenizer) else "the given tokenizer"
        raise UsageError(
            f"{source} (fingerprint {tokenizer.fingerprint}) is not the one the model was trained on (fingerprint "
            f"{trained_on}): its codes mean other things to the model; pass --data/--tokenizer made with that one"
        )
    tokenizer.batch_size = DEFAULT_ENCODE_BATCH
    return tokenizer


class VideoPipeline:
    """A loaded model (vimpac.api.VimpacModel) with its inference settings (vimpac.export_info) and tokenizer."""

    def __init__(
        self, model, info: dict[str, Any], tokenizer: Any = None, clips_per_forward: int = 32, precision: str = "auto"
    ) -> None:
        self.model, self.info = model, dict(info)
        if int(info["clip_len"]) != model.config.clip_len:
            raise UsageError(
                f"inference settings say clip length {info['clip_len']}, the model {model.config.clip_len}"
            )
        self._tokenizer_spec, self._tokenizer = tokenizer, None
        self.views = [View.parse(v) for v in info["views"]]
        self.frame_size = int(info["frame_size"])
        try:
            check_view_crops(self.views, self.frame_size)
        except ValueError as err:
            raise UsageError(
                f"{err} of the model's frames; --views takes r<N>_… views with N >= {self.frame_size}"
            ) from None
        self.fps = float(info["fps"])
        # how the database picked and resized frames (settings written before it was recorded: the default)
        self.frame_selection = self.info["frame_selection"] = info.get("frame_selection") or DEFAULT_FRAME_SELECTION
        try:
            self.stride = frame_stride(self.fps, info.get("frame_rate"))
        except UsageError as err:
            raise UsageError(
                f"the model takes clips at {info['frame_rate']:g} fps (its fine-tuning's clip rate, or --frame-rate), "
                f"the frames come at {self.fps:g} fps: {err}"
            ) from None
        self.num_clips = int(info["num_clips"])
        self.single_clip = info.get("single_clip") or "centre"
        self.classes = list(info.get("classes") or [])
        if clips_per_forward < 1:
            raise UsageError(f"clips per forward pass must be at least 1; got {clips_per_forward}")
        self.clips_per_forward = clips_per_forward
        self.dtype = model_dtype(precision, model.device)

    @property
    def tokenizer(self):
        """The tokenizer (loaded when first needed: embedding from a code database never needs it)."""
        if self._tokenizer is None:
            from vimpac.checkpoint import export_tokenizer

            spec, vocab = self._tokenizer_spec, self.model.config.vocab_size
            trained_on = export_tokenizer(self.model.source)
            self._tokenizer = _load_tokenizer(spec, self.info, vocab, self.model.device, trained_on)
        return self._tokenizer

    def settings(self) -> dict[str, Any]:
        """The model's folder, the fingerprint of its weights and the inference settings a video's outputs depend
        on (RESULT_SETTINGS)."""
        from vimpac.checkpoint import weights_fingerprint

        precision = str(self.dtype).removeprefix("torch.")  # the model's compute dtype ("auto" resolved)
        return {
            "model": str(self.model.source),
            "weights": weights_fingerprint(self.model.source),
            **{k: self.info.get(k) for k in RESULT_SETTINGS},
            "precision": precision,
        }

    # --------------------------------------------------------------------------------------------- tokens
    def _view_frames(self, frames: np.ndarray) -> np.ndarray:
        """uint8 [T, H, W, 3] (at the database's fps) → [V, T, S, S, 3] as decoding makes them."""
        import av

        frames = np.asarray(frames)
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or not len(frames):
            raise ValueError(f"a video array must be uint8 [T, H, W, 3] with T >= 1; got {frames.dtype} {frames.shape}")
        out = np.empty((len(self.views), len(frames), self.frame_size, self.frame_size, 3), dtype=np.uint8)
        sides = shorter_sides(self.views)
        for t, frame in enumerate(frames):
            picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            resized = {side: resize_frame(picture, side, self.frame_selection) for side in sides}
            for v, view in enumerate(self.views):
                out[v, t] = apply_view(resized[view.shorter], view, self.frame_size)
        return out

    @property
    def evaluation_frames(self) -> EvaluationFrames:
        """The frames of a video its evaluation clips read, as a function of the video's frame count."""
        return EvaluationFrames(self.model.config.clip_len, self.stride, self.num_clips, self.single_clip)

    def codes(self, video: str | Path | np.ndarray, every_frame: bool = True) -> list[np.ndarray]:
        """Codes int64 [n, h, w] per test view of a video file (DecodeError when it cannot be used) or array. With
        `every_frame` False a file's frames that no evaluation clip reads are neither converted nor encoded, and
        hold -1 (planned_view_frames): what `tokens` needs, at a fraction of the cost on long videos."""
        num_frames, indices = 0, None  # every frame, unless planned
        if isinstance(video, (str, Path)) and not every_frame:
            num_frames, indices, frames = planned_view_frames(
                video, self.fps, self.views, self.frame_size, self.evaluation_frames, selection=self.frame_selection
            )
            chunks = [frames]  # the tokenizer batches them itself
        elif isinstance(video, (str, Path)):
            chunks = iter_view_frames(
                video, self.fps, self.views, self.frame_size, chunk=DEFAULT_ENCODE_BATCH, selection=self.frame_selection
            )
        else:
            chunks = [self._view_frames(video)]
        per_view: list[list[np.ndarray]] = [[] for _ in self.views]
        for chunk in chunks:
            for v in range(len(self.views)):
                per_view[v].append(self.tokenizer.encode(chunk[v]).cpu().numpy())
        if not per_view[0]:
            raise DecodeError("resample", f"too short: no frame at {self.fps:g} fps")
        return full_codes([np.concatenate(parts) for parts in per_view], num_frames, indices)

    def starts(self, num_frames: int) -> list[int]:
        """Clip starts of a video of `num_frames` codes: FinetuneTestClips.starts."""
        return evaluation_clip_starts(
            num_frames, self.model.config.clip_len, self.stride, self.num_clips, self.single_clip
        )

    def clips(self, codes: Sequence[np.ndarray]) -> torch.Tensor:
        """int64 [V·K, T, h, w]: K evaluation clips of each view's codes, view-major (FinetuneTestClips' order)."""
        t, pad = self.model.config.clip_len, self.model.config.pad_id
        rows = []
        for view_codes in codes:
            rows += [take_clip(view_codes, s, t, self.stride, pad) for s in self.starts(view_codes.shape[0])]
        return torch.from_numpy(np.stack(rows))

    def tokens(self, video: str | Path | np.ndarray) -> torch.Tensor:
        return self.clips(self.codes(video, every_frame=False))

    # --------------------------------------------------------------------------------------------- outputs
    def _chunks(self, tokens: torch.Tensor):
        return tokens.split(self.clips_per_forward)

    def _autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.model.device.type, dtype=self.dtype)

    def probabilities_many(self, tokens: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Class probabilities [C] (float32, CPU) of each video's clips [V·K, T, h, w]: softmax per clip, mean. The
        clips of all the videos share forward passes of up to `clips_per_forward` clips."""
        with self._autocast():
            logits = torch.cat([self.model.class_logits(part) for part in self._chunks(torch.cat(list(tokens)))])
        parts = logits.float().cpu().split([t.shape[0] for t in tokens])
        return [average_view_probabilities(part[None]).squeeze(0) for part in parts]

    def probabilities_of(self, tokens: torch.Tensor) -> torch.Tensor:
        """Class probabilities [C] of one video's clips [V·K, T, h, w]: softmax per clip, mean."""
        return self.probabilities_many([tokens])[0]

    def probabilities(self, video: str | Path | np.ndarray) -> torch.Tensor:
        return self.probabilities_of(self.tokens(video))

    def class_names(self) -> list[str]:
        """The classifier's class names in label order (their numbers when the settings name none); UsageError when
        the settings list another number of classes than the classifier has (a --data of another dataset)."""
        count = self.model.num_classes
        if not self.classes:
            return [str(i) for i in range(count)]
        if len(self.classes) != count:
            raise UsageError(
                f"the inference settings ({self.info.get('database') or 'inference.json'}) name {len(self.classes)} "
                f"classes but the model's classifier has {count}: pass --data with the code database the model was "
                "fine-tuned on"
            )
        return self.classes

    def top_k(self, probs: torch.Tensor, k: int = 5) -> list[tuple[str, float]]:
        values, indices = probs.topk(min(k, probs.numel()))
        names = self.class_names()
        return [(names[i], float(p)) for p, i in zip(values.tolist(), indices.tolist())]

    @torch.no_grad()
    def features_many(
        self, tokens: Sequence[torch.Tensor], feature: str = "cls", per_clip: bool = False
    ) -> list[np.ndarray]:
        """Per video: float32 [D] (mean over its clips), [V·K, D] with `per_clip`, [2D] / [V·K, 2D] for "both"
        (cls, mean). The clips of all the videos share forward passes of up to `clips_per_forward` clips."""
        from vimpac.probe import clip_features

        if feature not in FEATURES:
            raise UsageError(f"--feature must be one of {', '.join(FEATURES)}; got {feature!r}")
        backbone, pad = self.model._model.backbone, self.model.config.pad_id
        with self._autocast():
            parts = [clip_features(backbone, self.model.tokens(p), pad) for p in self._chunks(torch.cat(list(tokens)))]
        cls = torch.cat([c for c, _ in parts]).float().cpu()
        mean = torch.cat([m for _, m in parts]).float().cpu()
        rows = {"cls": cls, "mean": mean, "both": torch.cat([cls, mean], dim=1)}[feature]
        per_video = rows.split([t.shape[0] for t in tokens])
        return [(r if per_clip else r.mean(dim=0)).numpy().astype(np.float32) for r in per_video]

    def features_of(self, tokens: torch.Tensor, feature: str = "cls", per_clip: bool = False) -> np.ndarray:
        """float32 [D] (mean over the clips), [V·K, D] with `per_clip`, [2D] / [V·K, 2D] for "both" (cls, mean)."""
        return self.features_many([tokens], feature, per_clip)[0]


def model_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The model's compute dtype for `precision` on `device` ("auto": fp16 on CUDA, as the shipped fine-tuning
    configs evaluate, fp32 elsewhere); UsageError for a precision the device cannot run."""
    if precision not in PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if precision == "auto":
        precision = "fp16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise UsageError(f"--precision fp16 needs a CUDA device (here: {device}); use fp32 or bf16")
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def load_pipeline(
    model_path: str | Path,
    tokenizer: Any = None,
    device: str | torch.device | None = None,
    data: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    need_classifier: bool = False,
    precision: str = "auto",
    clips_per_forward: int = 32,
) -> VideoPipeline:
    """VideoPipeline of the export (or run directory) `model_path`: vimpac.load_model + vimpac.export_info.
    `device` None: CUDA when available. `precision`: the model's (PRECISIONS, model_dtype)."""
    from vimpac.api import MissingHeadError, load_model
    from vimpac.export_info import inference_info

    device = resolve_device(device)
    model = load_model(model_path, device=device)
    if need_classifier and not model.has_classifier:
        raise MissingHeadError(
            f"{model.source} holds no classifier (a pre-training export?); predict needs the export of a fine-tuning "
            "run (runs/ft/export); use `vimpac embed` for features of a pre-trained model"
        )
    info = inference_info(model.source, data=data, overrides=overrides)
    # its tokenizer loads (and is checked) on first use
    return VideoPipeline(model, info, tokenizer, clips_per_forward, precision)


def video_files(inputs: Sequence[str | Path]) -> list[Path]:
    """Video paths from files, directories (their video files, recursively, sorted) and list files (.txt/.lst: one
    path per line, relative to the list's folder, ending in a video extension; # comments). A missing path is
    kept: it fails as a video. A file named twice (a folder and a file in it, a repeated line) is kept once, where
    it first comes. UsageError when the inputs name no video at all."""
    found: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found += sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS)
        elif item.suffix.lower() in (".txt", ".lst") and item.is_file():
            found += _listed_videos(item)
        else:
            found.append(item)
    if not found:
        raise UsageError(
            f"no video files in {' '.join(map(str, inputs))} (folders are searched for {' '.join(VIDEO_EXTENSIONS)}; "
            "a .txt or .lst list names one video per line)"
        )
    first: dict[Path, Path] = {}
    for path in found:
        first.setdefault(path.resolve(), path)
    return list(first.values())


def _listed_path(line: str) -> Path:
    """The video path of one list line: the whole line when it ends in a video extension (spaces allowed), else
    the line without a trailing label ("air drumming/x.mp4 1"), else its first field ("x.avi 1 extra")."""
    for candidate in (line, line.rsplit(None, 1)[0], line.split()[0]):
        if Path(candidate).suffix.lower() in VIDEO_EXTENSIONS:
            return Path(candidate)
    return Path(line.split()[0])


def _listed_videos(listing: Path) -> list[Path]:
    """The videos a list file names, one per line (a label or other fields may follow the path, as in UCF101's
    trainlist). UsageError at the first entry without a video extension: a README or classInd.txt passed by
    mistake would otherwise turn every line into a failed video."""
    found = []
    for number, line in enumerate(listing.read_text(encoding="utf-8-sig", errors="replace").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        path = _listed_path(line)
        if path.suffix.lower() not in VIDEO_EXTENSIONS:
            raise UsageError(
                f"{listing} line {number}: {line[:80]!r} does not name a video file (a .txt or .lst list names one "
                f"video per line, ending in one of {' '.join(VIDEO_EXTENSIONS)}; # starts a comment)"
            )
        found.append(path if path.is_absolute() else listing.parent / path)
    return found


def failure(video: str | Path, err: Exception) -> dict[str, str]:
    """{video, stage, reason} of a video that could not be used (the kinds of `vimpac tokenize`'s failures.jsonl)."""
    if isinstance(err, DecodeError):
        return {"video": str(video), "stage": err.stage, "reason": err.reason}
    return {"video": str(video), "stage": "decode", "reason": f"unexpected {type(err).__name__}: {err}"}
