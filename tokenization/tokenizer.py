"""Tokenizers: frames → VQ codes (and back, where a decoder exists), loaded from a tokenizer directory.

A tokenizer directory holds `config.json` ({"kind": ..., "vocab_size": ..., "downsample": 8, architecture
fields}) and `model.safetensors` (loaded without pickle). Its fingerprint — the first 16 hex digits of
sha256(config.json bytes + model.safetensors bytes) — identifies the exact model, so a code database can record
which tokenizer made it and refuse to mix codes from two.

Backends register a loader per kind with `register_kind(kind, loader)`. The built-in ones ("vqvae", "dalle")
are imported only when a directory of that kind is loaded, so importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from vimpac.atomic_write import atomic_path, write_json_atomic
from vimpac.devices import resolve_device
from vimpac.errors import UsageError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
HOW_TO_MAKE = (
    "make one with `vimpac train-tokenizer --videos DIR --out TOKDIR` (own VQ-VAE) or "
    "`vimpac convert-dalle` (the paper's DALL-E dVAE encoder)"
)

# kind → module that calls register_kind(kind, ...) when imported.
BUILTIN_KINDS = {"vqvae": "vimpac.tokenization.vqvae", "dalle": "vimpac.tokenization.dalle"}


class Tokenizer:
    """Base class: frames uint8 [N, H, W, 3] → codes int64 [N, H/d, W/d] (d = `downsample`).

    Subclasses implement `_encode_batch` (and `_decode_batch` when they have a decoder). `encode` always feeds
    the network batches of exactly `batch_size` frames, zero-padding the last one, so a frame's codes never
    depend on which other frames shared its batch (some backends pick algorithms by batch size) — extraction
    can be interrupted and resumed anywhere and still produce identical codes.
    """

    downsample: int = 8

    def __init__(
        self, name: str, vocab_size: int, fingerprint: str, device: str | torch.device = "cpu", batch_size: int = 32
    ) -> None:
        self.name = name
        self.vocab_size = vocab_size
        self.fingerprint = fingerprint
        self.device = torch.device(device)
        self.batch_size = batch_size
        # Mixed precision on CUDA: faster, but codes may differ from fp32 ones at near-ties; off by default.
        self.fp16 = False

    def _encode_batch(self, frames: torch.Tensor) -> torch.Tensor:
        """frames uint8 [B, H, W, 3] on `device` → codes int64 [B, H/d, W/d]."""
        raise NotImplementedError

    def _decode_batch(self, codes: torch.Tensor) -> torch.Tensor:
        """codes int64 [B, h, w] on `device` → frames uint8 [B, h·d, w·d, 3]."""
        raise UsageError(f"tokenizer {self.name!r} has no decoder: it can only encode frames into codes")

    @staticmethod
    @contextlib.contextmanager
    def _exact_cuda():
        """Full fp32 math and fixed cuDNN algorithms while encoding: TF32 (PyTorch's default for convolutions) and
        autotuned algorithms make a frame's codes depend on its position in the batch (measured on an H100), and
        resumed extraction must reproduce codes exactly. fp16 backends may override inside (see dalle)."""
        matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True, allow_tf32=False):
                yield
        finally:
            torch.backends.cuda.matmul.allow_tf32 = matmul_tf32

    def _autocast(self) -> contextlib.AbstractContextManager:
        enabled = self.fp16 and self.device.type == "cuda"
        return torch.autocast("cuda", dtype=torch.float16) if enabled else contextlib.nullcontext()

    def encode(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """frames uint8 [N, H, W, 3] (numpy or torch), H and W multiples of `downsample` → int64 [N, h, w] on CPU."""
        # a flipped view is a negative-stride numpy view, which torch cannot wrap
        frames = torch.as_tensor(np.ascontiguousarray(frames) if isinstance(frames, np.ndarray) else frames)
        if frames.dim() != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
            raise ValueError(f"expected uint8 frames [N, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
        n, h, w = frames.shape[:3]
        d = self.downsample
        if h % d or w % d:
            raise ValueError(f"frame size {h}x{w} is not a multiple of the tokenizer's downsampling {d}")
        out = torch.empty((n, h // d, w // d), dtype=torch.int64)
        with torch.inference_mode(), self._exact_cuda(), self._autocast():
            for start in range(0, n, self.batch_size):
                batch = _padded(frames[start : start + self.batch_size], self.batch_size).to(self.device)
                codes = self._encode_batch(batch)
                out[start : start + self.batch_size] = codes[: min(self.batch_size, n - start)].cpu()
        return out

    def decode(self, codes: np.ndarray | torch.Tensor) -> np.ndarray:
        """codes int [N, h, w] in [0, vocab_size) → frames uint8 [N, h·d, w·d, 3] numpy."""
        codes = torch.as_tensor(codes)
        if codes.dim() != 3 or codes.dtype.is_floating_point:
            raise ValueError(f"expected integer codes [N, h, w], got {codes.dtype} {tuple(codes.shape)}")
        codes = codes.long()
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.vocab_size):
            raise ValueError(f"codes must lie in [0, {self.vocab_size}), got [{int(codes.min())}, {int(codes.max())}]")
        n, h, w = codes.shape
        d = self.downsample
        out = torch.empty((n, h * d, w * d, 3), dtype=torch.uint8)
        with torch.inference_mode(), self._autocast():
            for start in range(0, n, self.batch_size):
                batch = _padded(codes[start : start + self.batch_size], self.batch_size).to(self.device)
                frames = self._decode_batch(batch)
                out[start : start + self.batch_size] = frames[: min(self.batch_size, n - start)].cpu()
        return out.numpy()


def _padded(batch: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad the first dimension of `batch` up to `size`."""
    missing = size - batch.shape[0]
    if missing == 0:
        return batch
    return torch.cat([batch, batch.new_zeros((missing, *batch.shape[1:]))])


Loader = Callable[[Path, dict, torch.device], Tokenizer]
_LOADERS: dict[str, Loader] = {}


def register_kind(kind: str, loader: Loader) -> None:
    """Make `load_tokenizer` build directories whose config says {"kind": kind} with `loader(dir, config, device)`."""
    _LOADERS[kind] = loader


def known_kinds() -> list[str]:
    return sorted(set(_LOADERS) | set(BUILTIN_KINDS))


def files_fingerprint(paths: Iterable[str | Path]) -> str:
    """First 16 hex digits of sha256 over the bytes of `paths`, one after the other."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def fingerprint(directory: str | Path) -> str:
    """files_fingerprint of config.json followed by model.safetensors: what names a tokenizer wherever it lies."""
    return files_fingerprint(Path(directory) / name for name in (CONFIG_FILE, WEIGHTS_FILE))


def read_config(directory: str | Path) -> dict:
    """The validated config.json of a tokenizer directory; UsageError if the directory is not one."""
    directory = Path(directory)
    if not directory.exists():
        raise UsageError(f"tokenizer directory {directory} does not exist; {HOW_TO_MAKE}")
    if not directory.is_dir():
        raise UsageError(f"tokenizer {directory} is not a directory (expected {CONFIG_FILE} + {WEIGHTS_FILE} in it)")
    missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if not (directory / name).is_file()]
    if missing:
        raise UsageError(f"{directory} is not a tokenizer directory: missing {', '.join(missing)}; {HOW_TO_MAKE}")
    try:
        config = json.loads((directory / CONFIG_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"{directory / CONFIG_FILE} is not valid JSON ({err}); {HOW_TO_MAKE}") from err
    if not isinstance(config, dict) or "kind" not in config:
        raise UsageError(f'{directory / CONFIG_FILE} has no "kind" field (one of {", ".join(known_kinds())})')
    return config


def load_tokenizer(spec: str | Path, device: str | torch.device = "cpu", fp16: bool = False) -> Tokenizer:
    """Load the tokenizer stored in directory `spec` onto `device`, in eval mode.

    `fp16=True` runs the network under fp16 autocast on CUDA (ignored elsewhere). Raises UsageError naming the
    path and how to make a tokenizer when `spec` is not a tokenizer directory or its kind is unknown.
    """
    directory = Path(spec)
    config = read_config(directory)
    kind = config["kind"]
    if kind not in _LOADERS and kind in BUILTIN_KINDS:
        importlib.import_module(BUILTIN_KINDS[kind])
    if kind not in _LOADERS:
        raise UsageError(
            f"{directory / CONFIG_FILE}: unknown tokenizer kind {kind!r} (known: {', '.join(known_kinds())}); "
            f"{HOW_TO_MAKE}"
        )
    tokenizer = _LOADERS[kind](directory, config, resolve_device(device))
    tokenizer.fp16 = fp16
    return tokenizer


def save_tokenizer_dir(directory: str | Path, config: Mapping, tensors: Mapping[str, torch.Tensor]) -> str:
    """Write config.json + model.safetensors into `directory` (created if needed); returns the fingerprint.

    Each file is written atomically (vimpac.atomic_write), so a reader (or a killed writer) never sees a
    half-written file. Tensors are saved contiguous, on CPU.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    write_json_atomic(directory / CONFIG_FILE, dict(config), sort_keys=True)
    return fingerprint(directory)
