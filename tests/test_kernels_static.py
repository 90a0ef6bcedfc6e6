"""Static kernel report (scripts/bench/kernels_static.py): every Triton kernel compiles ahead of time for sm_80 and
sm_90 without a GPU, fits the target's shared memory, and spills no registers at the shipped configs' defaults.

The compile runs in a subprocess without TRITON_INTERPRET (conftest sets it for this process; compiling needs the
real JITFunctions) and lands in Triton's cache, so a rerun costs only the `ptxas -v` pass.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "bench" / "kernels_static.py"


def load_script():
    spec = importlib.util.spec_from_file_location("kernels_static", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ks = load_script()
needs_ptxas = pytest.mark.skipif(ks.ptxas_path() is None, reason="triton's bundled ptxas is absent")

PTXAS_LOG = """ptxas info    : 11 bytes gmem
ptxas info    : Compiling entry function '_axial_bwd_kernel' for 'sm_90a'
ptxas info    : Function properties for _axial_bwd_kernel
    104 bytes stack frame, 148 bytes spill stores, 152 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 104 bytes cumulative stack size
"""


def test_parse_ptxas():
    assert ks.parse_ptxas(PTXAS_LOG) == {"registers": 255, "stack": 104, "spill_stores": 148, "spill_loads": 152}
    with pytest.raises(ValueError, match="cannot parse"):
        ks.parse_ptxas("nothing here")


def test_failures_flag_errors_shared_overflow_and_default_spills():
    base = {"kernel": "axial_bwd", "spec": "unaligned", "target": 80, "dtype": "fp16", "seq": 17, "dim": 64}
    base |= {"dropout": False, "pad": False, "block_m": 32, "lpp": 1, "status": "ok", "registers": 100}
    base |= {"stack": 0, "spill_stores": 0, "spill_loads": 0, "shared": 20 * 1024, "shipped": ["small-f128 axis H|W"]}
    assert ks.failures([base]) == []
    assert "does not compile" in ks.failures([base | {"status": "error", "message": "boom"}])[0]
    assert "shared memory" in ks.failures([base | {"shared": 200 * 1024}])[0]  # over sm_80's 163 KB
    assert ks.failures([base | {"shared": 200 * 1024, "target": 90}]) == []  # under sm_90's 227 KB
    assert "spills" in ks.failures([base | {"spill_stores": 4}])[0]
    assert ks.failures([base | {"spill_stores": 4, "shipped": []}]) == []  # not a shipped default: reported only
    assert ks.failures([base | {"status": "refused", "message": "too big"}]) == []


def test_quick_matrix_covers_the_shipped_lines():
    cases = ks.all_cases(quick=True, targets=(80, 90))
    attention = [c for c in cases if c["kernel"] != "vq_argmax"]
    for kernel in ("axial_fwd", "axial_bwd"):
        for dropout in (False, True):
            got = {(c["seq"], c["dim"]) for c in attention if c["kernel"] == kernel and c["dropout"] == dropout}
            assert set(ks.shipped_lines()) <= got
    fp32_backward = {(c["seq"], c["dim"]) for c in attention if c["kernel"] == "axial_bwd" and c["dtype"] == "fp32"}
    assert set(ks.shipped_lines()) <= fp32_backward
    # (line, head dim) of the shipped models: small d=64, large d=32; T = 5, 8, 16; 16x16 and 32x32 grids.
    assert set(ks.shipped_lines()) == {(6, 64), (9, 64), (17, 64), (6, 32), (9, 32), (17, 32), (33, 32)}
    vq = [c for c in cases if c["kernel"] == "vq_argmax"]
    assert {c["dtype"] for c in vq} == {"fp16", "fp32"}


def test_bytes_columns():
    """Rows carry bytes per call at the shape they stand for; the table shows per-line → per-program partials."""
    from vimpac.kernels.axial_attention_triton import bytes_moved

    case = {"kernel": "axial_fwd", "spec": "unaligned", "target": 90, "dtype": "fp16", "seq": 6, "dim": 64}
    case |= {"dropout": False, "pad": False, "shipped": ["small-f128 T=5 axis T"]}
    fields = ks.bytes_fields(case)
    assert fields["bytes_shape"] == [8, 5, 16, 16, 8, 64]  # the small model's micro-batch 8, T=5, 16x16, 8 heads
    assert fields["bytes"] == bytes_moved((8, 5, 16, 16), "T", 8, 64, torch.float16)["total"]
    assert fields["bytes_min"] < fields["bytes"] < fields["bytes_per_line"]
    assert ks.bytes_cell(fields) == ("54.0 → 42.9 MiB", "1.35 → 1.07")  # the kernel docstring's worked example
    row = case | fields | {"block_m": 32, "lpp": 5, "status": "ok", "num_warps": 4, "registers": 110}
    row |= {"spill_stores": 0, "spill_loads": 0, "shared": 12 * 1024}
    table = ks.compare_table([], [row]).splitlines()
    assert table[0] == "| kernel | case | before | after | bytes per call | × minimum |"
    assert table[2].endswith("| — | (32,5) w4: 110 regs, 0/0 spill, 12 KB | 54.0 → 42.9 MiB | 1.35 → 1.07 |")
    assert ks.bytes_cell({"kernel": "axial_fwd", "status": "refused"}) == ("—", "—")
    vq = ks.vq_cases(quick=True, targets=(90,))[0]
    vq_fields = ks.bytes_fields(vq)
    assert vq_fields["bytes"] == vq_fields["bytes_per_line"] > vq_fields["bytes_min"]  # VQ is unchanged: one value
    assert " → " not in ks.bytes_cell(vq_fields)[0]


@needs_ptxas
@pytest.mark.slow
def test_quick_report_is_clean(tmp_path):
    """Compile the CI subset for real; fail on compile errors, shared-memory overflow and spills at defaults."""
    out = tmp_path / "static.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(SCRIPT), "--quick", "--check", "--jobs", "2", "--json", str(out)]
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    payload = json.loads(out.read_text())
    results = payload["results"]
    assert len(results) == len(ks.all_cases(quick=True, targets=(80, 90)))
    assert payload["problems"] == []
    assert all(r["status"] == "ok" for r in results), [ks.label(r) for r in results if r["status"] != "ok"]

    # The dispatcher's shared-memory bound (used to refuse tiles that do not fit) covers what Triton allocates.
    from vimpac.kernels.axial_attention_triton import _shared_bytes

    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    for r in results:
        if r["kernel"] != "vq_argmax":
            bound = _shared_bytes(r["block_m"], r["dim"], dtypes[r["dtype"]], r["kernel"] == "axial_bwd")
            assert r["shared"] <= bound, ks.label(r)
