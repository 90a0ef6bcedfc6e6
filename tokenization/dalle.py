"""The DALL-E discrete-VAE encoder used by the VIMPAC paper as its video tokenizer (docs/reference.md §2.1).

Every frame becomes a grid of integers in [0, 8192): a 7×7 input conv, four groups of two residual bottleneck
blocks (widths 256, 512, 1024, 2048; a 2× max-pool after groups 1–3, so 8× downsampling), then ReLU and a 1×1
conv to 8192 logits whose argmax is the code. The logits are never materialised: the last 1×1 conv and the
argmax run together in `vimpac.kernels.argmax_scores` over the [N, 2048] features of the grid cells.

This is our own module with our own parameter names; `official_names` maps them from OpenAI's `encoder.pkl`,
which `vimpac convert-dalle` turns into a tokenizer directory (`config.json` + `model.safetensors`) once. Loading
that directory never unpickles anything. There is no decoder: the paper's system never used one.

Precision: fp32 by default (no TF32), which gives the CPU's codes on CUDA too, except at rare near-ties (cells
whose two best logits differ by rounding), so a database is best resumed on the kind of device that began it.
`load_tokenizer(dir, "cuda", fp16=True)` follows the original instead: the official package runs every conv but
the last in half on GPU; here the trunk runs under fp16 autocast. The final 1×1 conv + argmax is fp32 in either
case. On an H100, fp16 codes agreed with the package's own CUDA codes at 99.6% of cells (the rest near-ties: its
last conv may use TF32).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

from vimpac.errors import UsageError, first_line
from vimpac.kernels import argmax_scores
from vimpac.tokenization.tokenizer import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    Tokenizer,
    fingerprint,
    register_kind,
    save_tokenizer_dir,
)

KIND = "dalle"

# DALL-E's `map_pixels`: the dVAE models pixels in [ε, 1 − ε] (its logit-Laplace likelihood is undefined at 0, 1).
PIXEL_EPS = 0.1

# Frames per forward pass (`Tokenizer.encode` pads the last batch to this size, so codes never depend on how a
# caller batched its frames). 32 is what the original extraction used on GPU; smaller on CPU, where padding a
# short call to a big batch costs real time.
CUDA_BATCH = 32
CPU_BATCH = 4


@dataclass(frozen=True)
class DalleConfig:
    """Architecture hyper-parameters; the defaults are OpenAI's released encoder (the only one converted)."""

    n_hid: int = 256
    group_count: int = 4
    blocks_per_group: int = 2
    input_channels: int = 3
    vocab_size: int = 8192

    @property
    def downsample(self) -> int:
        return 2 ** (self.group_count - 1)

    def group_width(self, group: int) -> int:
        """Output channels of group `group` (0-based): n_hid · 2^group."""
        return self.n_hid * 2**group

    def block_widths(self) -> Iterator[tuple[int, int, int]]:
        """(group, block, input channels) for every residual block, in forward order."""
        for g in range(self.group_count):
            for b in range(self.blocks_per_group):
                n_in = self.group_width(g) if b > 0 else self.group_width(max(g - 1, 0))
                yield g, b, n_in

    def to_json(self) -> dict:
        return {"kind": KIND, "name": KIND, "downsample": self.downsample, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict) -> DalleConfig:
        if data.get("kind") != KIND:
            raise ValueError(f"config kind is {data.get('kind')!r}, expected {KIND!r}")
        return cls(**{f.name: int(data[f.name]) for f in fields(cls) if f.name in data})


class ResidualBlock(nn.Module):
    """x ↦ skip(x) + gain · conv4(relu(conv3(relu(conv2(relu(conv1(relu(x)))))))), a bottleneck of width n_out/4.

    gain = 1 / (number of blocks)² keeps the residual sum's scale independent of depth at initialisation.
    """

    def __init__(self, n_in: int, n_out: int, gain: float):
        super().__init__()
        hid = n_out // 4
        self.gain = gain
        # A 1×1 projection only where the width changes (the first block of groups 2–4).
        self.skip = nn.Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.conv1 = nn.Conv2d(n_in, hid, 3, padding=1)
        self.conv2 = nn.Conv2d(hid, hid, 3, padding=1)
        self.conv3 = nn.Conv2d(hid, hid, 3, padding=1)
        self.conv4 = nn.Conv2d(hid, n_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.relu(x))
        h = self.conv2(F.relu(h))
        h = self.conv3(F.relu(h))
        h = self.conv4(F.relu(h))
        return self.skip(x) + self.gain * h


class DalleEncoder(nn.Module):
    """Pixels [N, 3, H, W] in [0.1, 0.9] → codes int64 [N, H/8, W/8] (H, W multiples of 8).

    Parameters: `stem` (7×7 conv), `groups.{g}.{b}` (ResidualBlock), `head` (the final 1×1 conv as a matrix:
    weight [vocab, 8·n_hid], bias [vocab]).
    """

    def __init__(self, config: DalleConfig = DalleConfig()):
        super().__init__()
        self.config = config
        gain = 1.0 / (config.group_count * config.blocks_per_group) ** 2
        self.stem = nn.Conv2d(config.input_channels, config.n_hid, 7, padding=3)
        self.groups = nn.ModuleList(nn.ModuleList() for _ in range(config.group_count))
        for g, _, n_in in config.block_widths():
            self.groups[g].append(ResidualBlock(n_in, config.group_width(g), gain))
        self.head = nn.Linear(config.group_width(config.group_count - 1), config.vocab_size)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels [N, 3, H, W] → ReLU'd trunk features [N, H/8, W/8, 8·n_hid] fp32 (input to the final 1×1 conv)."""
        h = self.stem(x)
        for g, group in enumerate(self.groups):
            for block in group:
                h = block(h)
            if g < len(self.groups) - 1:
                h = F.max_pool2d(h, 2)
        return F.relu(h).float().permute(0, 2, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.features(x)
        # The last layer is fp32 in the original too: keep an enclosing autocast from lowering the matmul to fp16.
        with torch.autocast(feats.device.type, enabled=False):
            idx, _ = argmax_scores(feats.reshape(-1, feats.shape[-1]), self.head.weight, self.head.bias)
        return idx.view(feats.shape[:3])


def official_names(config: DalleConfig = DalleConfig()) -> dict[str, str]:
    """Our parameter name → the name in OpenAI's `dall_e.encoder.Encoder` (its `state_dict()`).

    stem.{weight,bias}                 ← blocks.input.{w,b}
    groups.{g}.{b}.skip.{weight,bias}  ← blocks.group_{g+1}.block_{b+1}.id_path.{w,b}      (width changes only)
    groups.{g}.{b}.conv{k}.{...}       ← blocks.group_{g+1}.block_{b+1}.res_path.conv_{k}.{w,b}   k = 1..4
    head.{weight,bias}                 ← blocks.output.conv.{w,b}   (weight [V, C, 1, 1] stored as [V, C])
    """
    names = {"stem.weight": "blocks.input.w", "stem.bias": "blocks.input.b"}
    for g, b, n_in in config.block_widths():
        ours, theirs = f"groups.{g}.{b}", f"blocks.group_{g + 1}.block_{b + 1}"
        convs = {f"conv{k}": f"res_path.conv_{k}" for k in range(1, 5)}
        if n_in != config.group_width(g):
            convs["skip"] = "id_path"
        for our_conv, their_conv in convs.items():
            names[f"{ours}.{our_conv}.weight"] = f"{theirs}.{their_conv}.w"
            names[f"{ours}.{our_conv}.bias"] = f"{theirs}.{their_conv}.b"
    names["head.weight"] = "blocks.output.conv.w"
    names["head.bias"] = "blocks.output.conv.b"
    return names


def parameter_shapes(config: DalleConfig = DalleConfig()) -> dict[str, tuple[int, ...]]:
    """Our parameter name → shape, in forward order (computed without allocating the weights)."""
    with torch.device("meta"):
        model = DalleEncoder(config)
    return {name: tuple(p.shape) for name, p in model.state_dict().items()}


def save_dalle(directory: str | Path, state: Mapping[str, torch.Tensor], config: DalleConfig | None = None) -> str:
    """Write a tokenizer directory (config.json + model.safetensors, fp32, our names); returns its fingerprint.

    Every parameter of `config` must be present with its exact shape (ValueError listing what is not).
    """
    config = config or DalleConfig()
    expected = parameter_shapes(config)
    problems = [f"{n}: missing" for n in expected if n not in state]
    problems += [f"{n}: unexpected" for n in state if n not in expected]
    problems += [
        f"{n}: shape {tuple(state[n].shape)}, expected {shape}"
        for n, shape in expected.items()
        if n in state and tuple(state[n].shape) != shape
    ]
    if problems:
        raise ValueError("weights do not fit the DALL-E encoder: " + "; ".join(problems))
    tensors = {n: state[n].detach().to(torch.float32) for n in expected}
    return save_tokenizer_dir(directory, config.to_json(), tensors)


def load_encoder(directory: str | Path, config: DalleConfig, device: str | torch.device = "cpu") -> DalleEncoder:
    """Build the fp32 encoder of `config` from directory's model.safetensors on `device`, in eval mode."""
    with torch.device("meta"):
        model = DalleEncoder(config)
    # fp32 whatever the file holds (assign=True would keep an fp16 file's dtype, and the first encode would fail)
    state = {k: v.float() for k, v in load_file(str(Path(directory) / WEIGHTS_FILE)).items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device).eval().requires_grad_(False)


class DalleTokenizer(Tokenizer):
    """Frames uint8 [N, H, W, 3] → DALL-E codes int64 [N, H/8, W/8]; no decoder.

    Batching, padding and input checks come from `Tokenizer.encode`. With `fp16` on CUDA the trunk runs under
    fp16 autocast (the official package's precision) with cuDNN off (see `_encode_batch`); the final 1×1 conv +
    argmax always runs in fp32.
    """

    def __init__(self, encoder: DalleEncoder, name: str, fingerprint: str, device: str | torch.device = "cpu"):
        device = torch.device(device)
        batch = CUDA_BATCH if device.type == "cuda" else CPU_BATCH
        super().__init__(name, encoder.config.vocab_size, fingerprint, device, batch_size=batch)
        self.downsample = encoder.config.downsample
        self.encoder = encoder

    def _encode_batch(self, frames: torch.Tensor) -> torch.Tensor:
        pixels = (1 - 2 * PIXEL_EPS) * (frames.permute(0, 3, 1, 2).float() / 255) + PIXEL_EPS
        # A frame's codes must not depend on its position in the batch (a resumed extraction batches differently).
        # Measured on an H100 (torch 2.11): fp32 cuDNN convs without TF32 are position-independent, TF32 ones are
        # not, and fp16 cuDNN convs are not at 64–96 px. PyTorch's own CUDA conv (cuDNN off) runs im2col + GEMM
        # frame by frame, so fp16 uses it: independent by construction; 128 px, batch 32: ~830 frames/s against
        # ~2700 with fp16 cuDNN and ~440 in fp32. No benchmark mode: it could pick another algorithm each run.
        fp16 = self.fp16 and self.device.type == "cuda"
        with torch.backends.cudnn.flags(enabled=not fp16, benchmark=False, deterministic=True, allow_tf32=False):
            return self.encoder(pixels)

    def decode(self, codes: np.ndarray | torch.Tensor) -> np.ndarray:
        raise UsageError(
            f"tokenizer {self.name!r} (DALL-E dVAE) has no decoder: VIMPAC only uses the encoder's codes, so "
            "`vimpac convert-dalle` converts only encoder.pkl; use a vqvae tokenizer to reconstruct frames"
        )


def _load(directory: Path, config: dict, device: torch.device) -> DalleTokenizer:
    try:
        arch = DalleConfig.from_json(config)
    except (TypeError, ValueError, KeyError) as err:
        raise UsageError(f"{directory / CONFIG_FILE}: not a valid dalle config ({err})") from err
    try:
        encoder = load_encoder(directory, arch, device)
    except (SafetensorError, RuntimeError, ValueError, TypeError) as err:
        raise UsageError(
            f"{directory}: weights do not match {CONFIG_FILE}, or cannot be read ({first_line(err)}); "
            "convert encoder.pkl again with `vimpac convert-dalle`"
        ) from err
    return DalleTokenizer(encoder, config.get("name", KIND), fingerprint(directory), device)


register_kind(KIND, _load)
