"""Helpers shared by several test files: paths, launching the trainers as subprocesses, the small pre-training run
of tests/test_pretrain_runs.py, and small model references. Test files import from here (or from
tests/synthetic_codes.py, tests/videos.py, tests/tokenizers.py), never from another test_*.py file.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.synthetic_codes import FRAME_SIZE, VOCAB
from vimpac.config import VimpacConfig
from vimpac.dist_setup import free_port
from vimpac.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
DEEPSPEED = Path(sys.executable).parent / "deepspeed"

# ------------------------------------------------------------------------------------------ launching trainers


def loaded_script(path: Path, name: str) -> Iterator:
    """Import a script (scripts/bench/*.py) as module `name` for a pytest fixture to yield; registered in sys.modules
    while in use because dataclasses look their module up there."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[name]


def environment() -> dict[str, str]:
    """The environment of a trainer subprocess: CPU accelerator, one thread per rank, no inherited rank variables."""
    env = dict(os.environ)
    # One build of DeepSpeed's shm op per venv (docs/design.md §11.2), one thread per rank on the 2-core machine.
    env["TORCH_EXTENSIONS_DIR"] = str(Path(sys.prefix) / "torch_extensions")
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def launcher(entry: str, ranks: int) -> list[str]:
    """The start of a command line that runs `entry` in one plain process (ranks == 1) or under the DeepSpeed
    launcher with `ranks` processes. `entry` is a module (vimpac.pretrain, vimpac.finetune: run with -m / --module,
    as from an installed package) or the path of a script ending in .py (a test wrapper)."""
    module = not entry.endswith(".py")
    if ranks == 1:
        return [sys.executable, *(["-m"] if module else []), entry]
    ports = ["--num_gpus", str(ranks), "--master_port", str(free_port())]
    return [str(DEEPSPEED), *ports, *(["--module"] if module else []), entry]


# ------------------------------------------------------------------- the small pre-training run (2-layer model)

MODEL = ["--layers", "2", "--hid-dim", "64", "--heads", "2", "--clip-len", "4", "--nce-proj-hid-dim", "64"]
MODEL += ["--vocab-size", str(VOCAB), "--frame-size", str(FRAME_SIZE), "--mask-blocks", "2"]
RUN = ["--deepspeed_config", "ds_configs/cpu.json", "--batch-size", "16", "--bs-per-gpu", "4", "--num-workers", "0"]
RUN += ["--lr", "1e-2", "--warm-up", "0.1"]
LOSSES = ("loss/total", "loss/mlm", "loss/nce", "accuracy/mlm", "accuracy/nce")


def command(db: Path, output: Path, ranks: int, *flags: str, entry: str = "vimpac.pretrain") -> list[str]:
    """`entry` (vimpac.pretrain, or a test wrapper taking its flags) with MODEL and RUN on `db`, writing to
    `output`, in one process or over `ranks` ranks."""
    return [*launcher(entry, ranks), "--data", str(db), "--output", str(output), *MODEL, *RUN, *flags]


@contextlib.contextmanager
def one_rank_process_group(backend: str, folder: Path) -> Iterator[None]:
    """torch.distributed's default group over this process alone (store file in `folder`), destroyed on exit."""
    init = f"file://{folder / 'process_group_store'}"
    torch.distributed.init_process_group(backend, init_method=init, rank=0, world_size=1)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


def shm_segments() -> set[Path]:
    return set(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*"))


def train(
    db: Path, output: Path, ranks: int, *flags: str, entry: str = "vimpac.pretrain", env: dict[str, str] | None = None
) -> dict[int, dict]:
    """Run `command(...)` to the end (`env`: variables added to `environment()`); return its metrics. Fails when
    it fails or leaves DeepSpeed's shm segments."""
    before = shm_segments()
    result = subprocess.run(
        command(db, output, ranks, *flags, entry=entry),
        cwd=REPO,
        env={**environment(), **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert shm_segments() <= before, "DeepSpeed's CPU all-reduce segments were left in /dev/shm"
    return read_metrics(output)


def assert_same_curve(actual: dict[int, dict], expected: dict[int, dict], rtol: float = 0.0) -> None:
    assert sorted(actual) == sorted(expected)
    for step in expected:
        for name in LOSSES:
            assert actual[step][name] == pytest.approx(expected[step][name], rel=rtol, abs=rtol * 1e-3), (step, name)


# ------------------------------------------------------------------------------------------ model references


def random_batch(config: VimpacConfig, batch: int = 3, seed: int = 0):
    """Tokens with some PAD (a padded frame) and MASK, and labels at a few masked positions."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, config.vocab_size, (batch, *config.shape), generator=gen)
    labels = torch.full_like(tokens, -100)
    masked = torch.rand(tokens.shape, generator=gen) < 0.25
    labels[masked] = tokens[masked]
    tokens[masked] = config.mask_id
    tokens[0, -1] = config.pad_id
    labels[0, -1] = -100
    return tokens, labels


def naive_attention(q, k, v, cls_q, cls_k, cls_v, axes, pad=None, scale=None):
    """Per-line loop: for every sample and every line of `axes`, explicit softmax attention with CLS first."""
    batch, t, h, w, heads, dim = q.shape
    scale = dim**-0.5 if scale is None else scale
    sizes = {"T": t, "H": h, "W": w}
    line_axes = [a for a in "THW" if a not in axes]
    token_out, cls_out = {}, []
    for b in range(batch):
        cls_lines = []
        for line in itertools.product(*(range(sizes[a]) for a in line_axes)):
            positions = []
            for along in itertools.product(*(range(sizes[a]) for a in axes)):
                where = dict(zip(line_axes, line)) | dict(zip(axes, along))
                positions.append((where["T"], where["H"], where["W"]))
            qs = torch.stack([cls_q[b]] + [q[b, i, j, l] for i, j, l in positions])  # [S, heads, d]
            ks = torch.stack([cls_k[b]] + [k[b, i, j, l] for i, j, l in positions])
            vs = torch.stack([cls_v[b]] + [v[b, i, j, l] for i, j, l in positions])
            allowed = torch.tensor([True] + [pad is None or not bool(pad[b, i, j, l]) for i, j, l in positions])
            scores = torch.einsum("ihd,jhd->hij", qs, ks) * scale
            scores = scores.masked_fill(~allowed, float("-inf"))
            weights = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
            probs = weights / weights.sum(dim=-1, keepdim=True)
            out = torch.einsum("hij,jhd->ihd", probs, vs)
            cls_lines.append(out[0])
            for p, pos in enumerate(positions):
                token_out[(b, *pos)] = out[1 + p]
        cls_out.append(torch.stack(cls_lines).mean(dim=0))
    order = itertools.product(range(batch), range(t), range(h), range(w))
    out = torch.stack([token_out[key] for key in order]).view(batch, t, h, w, heads, dim)
    return out, torch.stack(cls_out)
