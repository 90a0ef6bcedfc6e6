"""Model FLOPs of a pre-training step, and the peak used for MFU (model FLOPs utilisation).

Counted: every matrix multiply, 2 FLOPs per multiply-add; elementwise work (LayerNorm, GELU, softmax, dropout)
is ignored. With N = T·h·w tokens plus CLS, D = hidden, A = attention width, M = MLP width, per layer and clip:
  each attention block   QKV 2(N+1)·D·3A + output 2(N+1)·A·D
                         + per pattern p (width A/P, sequence length L = product of its axes, N/L sequences,
                           CLS prepended to every sequence as query and key):
                           scores and weighted sum 4·(A/P)·(L+1)·(N + N/L)
  MLP                    2·2(N+1)·D·M
MLM head per predicted position: 2·D·D + 2·D·rows (tied decoder over every embedding row). Contrastive head
per clip: 2·(D·hid + (layers-2)·hid² + hid·nce_dim), or 2·D·nce_dim with one layer.
Training = 3 × forward (backward costs two forwards). Recomputation by activation checkpointing is not model
work and is not counted (the usual MFU convention), so MFU does not rise when checkpointing is turned on.

MFU = achieved model FLOP/s ÷ peak. Peaks are the dense tensor-core figures of the card's datasheet for
16-bit runs, and its dense TF32 figure for fp32 runs. A CPU has no agreed peak: MFU is left out there unless
`--peak-tflops` states one.
"""

from __future__ import annotations

from vimpac.config import VimpacConfig

# Dense (no sparsity) peak TFLOP/s: (fp16/bf16 tensor core, tf32 tensor core or fp32 where no tf32).
GPU_PEAK_TFLOPS = {
    "H200": (989.4, 494.7),
    "H100": (989.4, 494.7),  # SXM; the PCIe card is lower (756 / 378), matched first below
    "A100": (312.0, 156.0),
    "A10G": (125.0, 62.5),
    "L40S": (362.0, 183.0),
    "V100": (125.0, 15.7),
}
PCIE_PEAK_TFLOPS = {"H100": (756.0, 378.0)}
# Peak memory bandwidth, bytes/s (datasheets; H100 SXM5 HBM3 3.35 TB/s, PCIe 2.0 TB/s, H200 HBM3e 4.8 TB/s).
GPU_PEAK_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.039e12}
PCIE_PEAK_BANDWIDTH = {"H100": 2.0e12}


def attention_block_flops(config: VimpacConfig, patterns: tuple[str, ...]) -> int:
    """Forward FLOPs of one attention block (projections + attention) for one clip."""
    t, h, w = config.shape
    n = t * h * w
    d, a = config.hidden_size, config.attention_width
    sizes = {"T": t, "H": h, "W": w}
    flops = 2 * (n + 1) * d * 3 * a + 2 * (n + 1) * a * d
    width = a // len(patterns)
    for pattern in patterns:
        length = 1
        for axis in pattern:
            length *= sizes[axis]
        flops += 4 * width * (length + 1) * (n + n // length)
    return flops


def backbone_flops(config: VimpacConfig) -> int:
    """Forward FLOPs of the backbone for one clip."""
    t, h, w = config.shape
    tokens = t * h * w + 1
    per_layer = sum(attention_block_flops(config, patterns) for patterns in config.blocks)
    per_layer += 2 * 2 * tokens * config.hidden_size * config.mlp_width
    return config.layers * per_layer


def mlm_head_flops(config: VimpacConfig) -> int:
    """Forward FLOPs of the MLM head for one predicted position."""
    d = config.hidden_size
    return 2 * d * d + 2 * d * config.embedding_rows


def contrastive_head_flops(config: VimpacConfig) -> int:
    """Forward FLOPs of the projection head for one clip."""
    d, hid, layers = config.hidden_size, config.nce_proj_hid_dim, config.nce_proj_layers
    if layers == 1:
        return 2 * d * config.nce_dim
    return 2 * (d * hid + (layers - 2) * hid * hid + hid * config.nce_dim)


def pretrain_forward_flops(config: VimpacConfig, clips: int, predicted: int, mlm: bool = True, nce: bool = True) -> int:
    """Forward FLOPs for `clips` clips with `predicted` MLM positions in total."""
    flops = clips * backbone_flops(config)
    if mlm:
        flops += predicted * mlm_head_flops(config)
    if nce:
        flops += clips * contrastive_head_flops(config)
    return flops


def pretrain_train_flops(config: VimpacConfig, clips: int, predicted: int, mlm: bool = True, nce: bool = True) -> int:
    """Training FLOPs (forward + backward = 3 × forward)."""
    return 3 * pretrain_forward_flops(config, clips, predicted, mlm, nce)


def _by_gpu_name(device_name: str, pcie: dict, sxm: dict):
    """The entry of a per-GPU table whose key is in `device_name` (PCIe cards first), None when unknown."""
    name = device_name.upper()
    for table in (pcie, sxm):
        for key, value in table.items():
            if key in name and (table is sxm or "PCIE" in name):
                return value
    return None


def peak_flops(device_name: str, precision: str) -> float | None:
    """Peak FLOP/s of a GPU by its name (e.g. torch.cuda.get_device_name()), None when unknown or a CPU."""
    peaks = _by_gpu_name(device_name, PCIE_PEAK_TFLOPS, GPU_PEAK_TFLOPS)
    if peaks is None:
        return None
    half, single = peaks
    return (single if precision == "fp32" else half) * 1e12


def peak_bandwidth(device_name: str) -> float | None:
    """Peak memory bandwidth in bytes/s of a GPU by its name, None when unknown or a CPU."""
    return _by_gpu_name(device_name, PCIE_PEAK_BANDWIDTH, GPU_PEAK_BANDWIDTH)
