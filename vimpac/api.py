"""The Python API: `vimpac.load_model(path)` → a `VimpacModel` that maps token clips to features and predictions.

    import vimpac
    model = vimpac.load_model("runs/pt/export")          # or a run directory, or an original checkpoint folder
    tokens = ...                                         # int64 [B, T, h, w]: codes, PAD (model.config.pad_id), MASK
    cls = model.cls(tokens)                              # [B, D]
    hidden = model.hidden_states(tokens)                 # [B, T, h, w, D]
    ft = vimpac.load_model("runs/ft", tokenizer="runs/tok")  # tokenizer: default the one the run's database names
    ft.predict("clip.mp4")                               # [(label, probability)] × 5, as the evaluation scores it
    ft.embed("clip.mp4")                                 # float32 [D]: the video's mean CLS over its test clips

What `path` may be: an export folder (config.json + model.safetensors, read without pickle), a run directory
holding export/, or a checkpoint folder of the original release (classifier.pt + args.pickle, or an output folder
holding last/), which is converted in memory as `vimpac convert-original` converts it (vimpac.original).

The model runs in eval mode (dropout off, BatchNorm on its running statistics), in float32, without gradients, on
the `device` given. Inputs are token ids [B, T, h, w] with (T, h, w) = `config.shape`; PAD frames are allowed
(PAD keys are never attended to). Which methods work depends on the heads the weights hold: `mlm_logits` needs
the MLM head and `projection` the contrastive head (pre-training exports), `class_logits` the classifier
(fine-tuning exports); calling one whose head is absent raises MissingHeadError saying which export has it.

`predict(video)` and `embed(video)` take a video file or a uint8 array [T, H, W, 3] (frames at the database's fps)
and run vimpac.inference.VideoPipeline: decoding, views, tokenizer and clips as the model's evaluation database
and fine-tuning evaluation (settings from export/inference.json, vimpac.export_info).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vimpac.config import VimpacConfig
from vimpac.errors import UsageError
from vimpac.modeling import ClassifierHead, ContrastiveHead, MLMHead, VimpacBackbone


class MissingHeadError(UsageError):
    """A method needs a head the loaded weights do not hold (e.g. class_logits on a pre-training export)."""


class _Model(nn.Module):
    """Backbone plus whichever heads the weights hold, under the names vimpac's exports use."""

    def __init__(self, config: VimpacConfig, mlm: bool, nce: bool, num_classes: int | None) -> None:
        super().__init__()
        self.backbone = VimpacBackbone(config)
        self.mlm_head = MLMHead(config) if mlm else None
        self.nce_head = ContrastiveHead(config) if nce else None
        self.classifier = ClassifierHead(config.hidden_size, num_classes) if num_classes else None


def _read(path: str | Path) -> tuple[VimpacConfig, dict[str, torch.Tensor], dict[str, str], Path]:
    """(config, state dict, metadata, folder) of an export, a run directory or an original checkpoint folder."""
    from vimpac.checkpoint import EXPORT_FILES, find_export, read_export

    path = Path(path)
    folder = find_export(path)
    if folder is not None:
        config, state, metadata = read_export(folder)
        return config, state, metadata, folder
    from vimpac import original

    if any((p / original.CHECKPOINT_FILE).is_file() for p in (path, path / "last")):
        converted = original.convert_checkpoint(path)
        return converted.config, converted.state, {"producer": original.PRODUCER}, converted.source
    raise UsageError(
        f"{path}: no {' + '.join(EXPORT_FILES)} there or in {path / 'export'}, and no original checkpoint "
        f"({original.CHECKPOINT_FILE} + {original.ARGS_FILE}); give the export/ folder of a vimpac run, the run "
        "directory, or an original release checkpoint folder"
    )


class VimpacModel:
    """A loaded VIMPAC model for inference. Build it with `vimpac.load_model(path, device)`.

    Attributes: `config` (VimpacConfig: shape, special ids, sizes), `device`, `source` (the folder it was read from),
    `producer` (who wrote the weights), `num_classes` (None without a classifier), and `has_mlm_head`,
    `has_projection_head`, `has_classifier`. Every method takes token ids [B, T, h, w] (a torch tensor, numpy array
    or nested list of integers) and returns float32 tensors on `device`.
    """

    def __init__(
        self,
        config: VimpacConfig,
        state: dict[str, torch.Tensor],
        device: str | torch.device = "cpu",
        source: str | Path | None = None,
        producer: str | None = None,
    ) -> None:
        heads = {name.split(".", 1)[0] for name in state}
        classifier = state.get("classifier.fc.weight")
        self.config = config
        self.source = None if source is None else Path(source)
        self.producer = producer
        self.num_classes = None if classifier is None else int(classifier.shape[0])
        self._model = _Model(config, "mlm_head" in heads, "nce_head" in heads, self.num_classes)
        try:
            self._model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise UsageError(f"the weights of {source} do not fit the model of their config.json: {err}") from None
        self.device = torch.device(device)
        self._model.to(self.device).eval().requires_grad_(False)
        self.tokenizer_spec: Any = None  # load_model's tokenizer=; None: the one the inference settings name
        self._pipeline = None

    # ------------------------------------------------------------------------------------------- heads
    @property
    def has_mlm_head(self) -> bool:
        return self._model.mlm_head is not None

    @property
    def has_projection_head(self) -> bool:
        return self._model.nce_head is not None

    @property
    def has_classifier(self) -> bool:
        return self._model.classifier is not None

    def to(self, device: str | torch.device) -> VimpacModel:
        """Move the model to `device` (in place); returns self."""
        self.device = torch.device(device)
        self._model.to(self.device)
        return self

    def __repr__(self) -> str:
        c = self.config
        heads = [n for n, ok in (("mlm", self.has_mlm_head), ("projection", self.has_projection_head)) if ok]
        if self.has_classifier:
            heads.append(f"classifier({self.num_classes})")
        return (
            f"VimpacModel({c.layers}×{c.hidden_size} {c.layout}, shape (T, h, w) = {c.shape}, "
            f"heads [{', '.join(heads)}], device {self.device}, from {self.source})"
        )

    # ------------------------------------------------------------------------------------------- inputs
    def tokens(self, tokens: Any) -> torch.Tensor:
        """`tokens` as int64 [B, T, h, w] on the model's device, checked against the config (ValueError)."""
        t = tokens if isinstance(tokens, torch.Tensor) else torch.as_tensor(np.asarray(tokens))
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"tokens must be integer ids; got dtype {t.dtype}")
        t = t.to(device=self.device, dtype=torch.long)
        if t.dim() != 4 or tuple(t.shape[1:]) != self.config.shape:
            raise ValueError(
                f"tokens must be [B, T, h, w] with (T, h, w) = {self.config.shape}; got shape {tuple(t.shape)}"
            )
        if t.numel():
            low, high = int(t.min()), int(t.max())
            if low < 0 or high >= self.config.embedding_rows:
                c = self.config
                raise ValueError(
                    f"token ids must lie in [0, {c.embedding_rows}): codes 0..{c.vocab_size - 1}, PAD {c.pad_id}, "
                    f"MASK {c.mask_id} ({c.special_ids} special ids); got [{low}, {high}]"
                )
        return t

    def _need(self, present: bool, what: str, where: str) -> None:
        if not present:
            raise MissingHeadError(f"{what} needs {where}, which the weights of {self.source} do not hold")

    # ------------------------------------------------------------------------------------------- outputs
    @torch.no_grad()
    def encode(self, tokens: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(CLS [B, D], hidden states [B, T, h, w, D]) of the last layer, from one forward pass."""
        return self._model.backbone(self.tokens(tokens))

    def cls(self, tokens: Any) -> torch.Tensor:
        """The last layer's CLS vector [B, D] (what the classifier and the projection head read)."""
        return self.encode(tokens)[0]

    def hidden_states(self, tokens: Any) -> torch.Tensor:
        """The last layer's token vectors [B, T, h, w, D] (what the MLM head reads)."""
        return self.encode(tokens)[1]

    @torch.no_grad()
    def mlm_logits(self, tokens: Any, positions: Any = None) -> torch.Tensor:
        """Masked-token logits over all `config.embedding_rows` ids.

        positions None: at every position, [B, T, h, w, rows]. Otherwise [N, rows] at the N given positions: flat
        indices [N] into B·T·h·w (b·T·h·w + t·h·w + i·w + j, as the pre-training loss numbers them) or
        coordinates [N, 4] (b, t, i, j)."""
        self._need(self.has_mlm_head, "mlm_logits", "the MLM head (a pre-training export)")
        t = self.tokens(tokens)
        _, hidden = self._model.backbone(t)
        flat = hidden.flatten(0, 3)
        if positions is not None:
            flat = flat[self._flat_positions(positions, t.shape)]
        logits = self._model.mlm_head(flat, self._model.backbone.token_embedding.weight)
        return logits.unflatten(0, tuple(t.shape)) if positions is None else logits

    def _flat_positions(self, positions: Any, shape: torch.Size) -> torch.Tensor:
        p = positions if isinstance(positions, torch.Tensor) else torch.as_tensor(np.asarray(positions))
        if p.is_floating_point() or p.dtype == torch.bool:
            raise ValueError(f"positions must be integer indices; got dtype {p.dtype}")
        p = p.to(device=self.device, dtype=torch.long)
        if p.dim() == 2 and p.shape[1] == 4:
            for axis, size in enumerate(shape):
                column = p[:, axis]
                if p.numel() and (int(column.min()) < 0 or int(column.max()) >= size):
                    raise ValueError(f"positions column {axis} must lie in [0, {size}) for tokens {tuple(shape)}")
            b, t, i, j = p.unbind(1)
            _, big_t, h, w = shape
            return ((b * big_t + t) * h + i) * w + j
        if p.dim() != 1:
            raise ValueError(f"positions must be flat indices [N] or coordinates [N, 4]; got {tuple(p.shape)}")
        total = int(np.prod(shape))
        if p.numel() and (int(p.min()) < 0 or int(p.max()) >= total):
            raise ValueError(f"flat positions must lie in [0, {total}) for tokens {tuple(shape)}")
        return p

    @torch.no_grad()
    def projection(self, tokens: Any) -> torch.Tensor:
        """The contrastive projection of CLS [B, nce_dim], before the loss's L2 normalisation."""
        self._need(self.has_projection_head, "projection", "the contrastive projection head (a pre-training export)")
        cls, _ = self._model.backbone(self.tokens(tokens))
        return self._model.nce_head(cls)

    # ------------------------------------------------------------------------------------------- videos
    def pipeline(self, **overrides: Any):
        """The vimpac.inference.VideoPipeline of this model (settings: vimpac.export_info; `overrides` such as
        num_clips=, views= replace them). Cached when called without overrides."""
        from vimpac.export_info import inference_info
        from vimpac.inference import VideoPipeline

        if self.source is None:
            raise UsageError("predict / embed need a model loaded from an export (vimpac.load_model(path))")
        if overrides:
            return VideoPipeline(self, inference_info(self.source, overrides=overrides), self.tokenizer_spec)
        if self._pipeline is None:
            self._pipeline = VideoPipeline(self, inference_info(self.source), self.tokenizer_spec)
        return self._pipeline

    def predict(self, video: Any, top_k: int = 5) -> list[tuple[str, float]]:
        """The `top_k` (class name, probability) of a video file or uint8 array [T, H, W, 3]: softmax per view ×
        clip, probabilities averaged, as fine-tuning's evaluation. Raises DecodeError for an unusable file."""
        self._need(self.has_classifier, "predict", "a classifier (the export of a fine-tuning run)")
        pipeline = self.pipeline()
        return pipeline.top_k(pipeline.probabilities(video), top_k)

    def embed(self, video: Any, feature: str = "cls", per_clip: bool = False) -> np.ndarray:
        """float32 [D] embedding of a video file or uint8 array [T, H, W, 3]: the mean over the test views × K clips
        of the CLS vector ("cls"), the non-PAD token mean ("mean") or both concatenated ("both", [2D]);
        `per_clip`: [V·K, D] without the mean."""
        pipeline = self.pipeline()
        return pipeline.features_of(pipeline.tokens(video), feature, per_clip)

    @torch.no_grad()
    def class_logits(self, tokens: Any) -> torch.Tensor:
        """Classifier logits [B, num_classes] of one clip each (no softmax, no view averaging)."""
        self._need(self.has_classifier, "class_logits", "a classifier (the export of a fine-tuning run)")
        cls, _ = self._model.backbone(self.tokens(tokens))
        return self._model.classifier(cls)


def load_model(path: str | Path, device: str | torch.device = "cpu", tokenizer: Any = None) -> VimpacModel:
    """Load the model in `path` (an export folder, a run directory holding export/, or an original release checkpoint
    folder) onto `device`, in eval mode. UsageError when there is nothing loadable there. `tokenizer` (a tokenizer
    directory or a loaded Tokenizer) is what `predict` / `embed` encode videos with; by default the tokenizer the
    export's inference settings name."""
    config, state, metadata, folder = _read(path)
    model = VimpacModel(config, state, device=device, source=folder, producer=metadata.get("producer"))
    model.tokenizer_spec = tokenizer
    return model
