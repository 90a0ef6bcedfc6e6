"""scripts/bench/kernels.py at tiny shapes on the CPU (Triton interpreter): every case is timed for every
implementation and the derived figures agree with the times."""

import importlib.util
import json

import pytest
import torch

from tests.helpers import REPO

SCRIPT = REPO / "scripts" / "bench" / "kernels.py"
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the quick run is the CPU smoke test")


def test_quick_run_times_every_case_and_writes_json(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_kernels", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "kernels.json"
    flags = ["--quick", "--device", "cpu", "--no-compile", "--warmup", "0", "--iters", "1", "--json", str(out)]
    assert bench.main(flags) == 0
    payload = json.loads(out.read_text())
    assert {"date", "machine", "versions", "git_commit", "settings", "results"} <= set(payload)
    attention = [r for r in payload["results"] if r["kernel"] == "axial_attention"]
    assert {(r["case"], r["pass"]) for r in attention} == {
        (case, p) for case in ("axis T", "axis H", "axis W", "layer T,H|W") for p in ("fwd", "fwd+bwd")
    }
    for row in attention:
        assert set(row["ms"]) == {"eager", "triton"} and min(row["ms"].values()) > 0
        assert row["speedup_vs"]["eager"] == pytest.approx(row["ms"]["eager"] / row["ms"]["triton"])
        assert row["floor_ms"] is None  # no GPU, no bandwidth peak
    (vq,) = [r for r in payload["results"] if r["kernel"] == "nearest_code"]
    assert set(vq["ms"]) == {"matmul", "cdist", "triton", "reference"}
    assert "axial_attention" in capsys.readouterr().out
