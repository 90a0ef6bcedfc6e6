"""`vimpac selfcheck` and the trainers' start-up kernel line, on CPU under the Triton interpreter (tiny shapes)."""

from __future__ import annotations

import json
import warnings
from types import SimpleNamespace

import pytest
import torch

import vimpac.kernels as kernels
from vimpac.cli import main
from vimpac.config import VimpacConfig
from vimpac.kernels import KernelFallbackWarning, first_call
from vimpac.kernels import axial_attention_triton as attention_module
from vimpac.kernels.selfcheck import run_selfcheck, startup_line

# hidden 32, 2 heads of 16, clip 2 × 2 × 2 codes: every kernel case runs in well under a second interpreted.
TINY = ["--hid-dim", "32", "--heads", "2", "--clip-len", "2", "--frame-size", "16", "--vocab-size", "64"]
CONFIG = VimpacConfig(hidden_size=32, heads=2, clip_len=2, grid=(2, 2), vocab_size=64, layout="T", dropout=0.1)


@pytest.fixture(autouse=True)
def fresh_checks(monkeypatch):
    monkeypatch.delenv("VIMPAC_KERNELS", raising=False)
    first_call.reset()
    yield
    first_call.reset()


def corrupt_attention(monkeypatch) -> None:
    real = attention_module.axial_attention_triton

    def wrong(*args, **kwargs):
        out, cls_out = real(*args, **kwargs)
        return out + 0.5, cls_out

    monkeypatch.setattr(attention_module, "axial_attention_triton", wrong)


def test_cli_checks_every_kernel_and_writes_json(tmp_path, capsys):
    out = tmp_path / "selfcheck.json"
    assert main(["selfcheck", *TINY, "--code-dim", "16", "--repeats", "1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "selfcheck on cpu (Triton interpreter" in text and "small shapes" in text
    rows = json.loads(out.read_text())
    # T,H|W: three axes × (inference, training) + nearest_code + argmax_scores
    assert [r["kernel"] for r in rows] == ["axial_attention"] * 6 + ["nearest_code", "argmax_scores"]
    assert {r["verdict"] for r in rows} == {"ok"}
    for row in rows:
        assert row["max_abs_err_fwd"] <= row["tol_fwd"] and row["triton_ms"] > 0 and row["reference_ms"] > 0
        assert (row["max_abs_err_bwd"] is None) == (row["kernel"] != "axial_attention")
        assert row["kernel"] in text
    assert {r["case"] for r in rows[:2]} == {"axis T, no PAD, dropout 0", "axis T, PAD, dropout 0.1"}


def test_cli_reports_a_wrong_kernel_and_fails(monkeypatch, capsys):
    corrupt_attention(monkeypatch)
    assert main(["selfcheck", *TINY, "--model", "T", "--repeats", "1"]) == 1
    captured = capsys.readouterr()
    table = captured.out.splitlines()
    assert sum("MISMATCH" in line for line in table) == 2 and sum(line.endswith(" ok") for line in table) == 2
    assert "forward max abs error" in captured.out and "VIMPAC_KERNELS=reference" in captured.err


@pytest.mark.parametrize("module", ["axial_attention_triton", "vq_triton"])
def test_kernels_imported_before_the_interpreter_was_asked_for_are_named(monkeypatch, module):
    import importlib

    from vimpac.kernels.selfcheck import triton_unusable

    assert triton_unusable(torch.device("cpu")) is None
    monkeypatch.setattr(importlib.import_module(f"vimpac.kernels.{module}"), "_INTERPRET", False)
    assert "imported before TRITON_INTERPRET=1" in triton_unusable(torch.device("cpu"))


def test_without_a_usable_triton_cases_are_skipped_with_the_reason(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    rows = run_selfcheck(CONFIG, torch.device("cpu"), torch.float32, vq=(4, 8, 16))
    assert rows and all(r.skipped and "TRITON_INTERPRET=1" in r.skipped for r in rows)


def test_startup_line_is_silent_where_the_reference_runs():
    assert startup_line(CONFIG, torch.device("cpu"), torch.float32) is None  # CPU: the default dispatch's reference
    assert startup_line(CONFIG, None, torch.float32) is None


@pytest.mark.parametrize("compiled", [False, True])
def test_startup_line_records_the_training_key(monkeypatch, compiled):
    monkeypatch.setattr(kernels, "_TRITON_DEVICE_TYPES", ("cuda", "cpu"))  # treat CPU as the CUDA path
    line = startup_line(CONFIG, torch.device("cpu"), torch.float32, compiled=compiled)
    assert line.startswith("kernel self-check on cpu, float32: axial_attention T/3 ok") and "Triton in use" in line
    ((key, result),) = first_call.results().items()
    # The model's first training call (dropout 0.1; a PAD mask when compiled) finds this verdict.
    q = torch.empty(1, 2, 2, 2, 2, 16, requires_grad=True)
    pad = torch.zeros(1, 2, 2, 2, dtype=torch.bool) if compiled else None
    assert key == first_call.axial_key(q, "T", pad, 0.1) and result.ok


def test_startup_line_reports_a_failing_kernel_and_falls_back(monkeypatch):
    monkeypatch.setattr(kernels, "_TRITON_DEVICE_TYPES", ("cuda", "cpu"))
    corrupt_attention(monkeypatch)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        line = startup_line(CONFIG, torch.device("cpu"), torch.float32)
    assert "T/3 FAILED" in line and "forward max abs error" in line and "PyTorch reference" in line
    assert sum(issubclass(w.category, KernelFallbackWarning) for w in record) == 1
    assert list(first_call._verdicts.values()) == [False]


def test_startup_line_names_the_forced_backends(monkeypatch):
    monkeypatch.setattr(kernels, "_TRITON_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setenv("VIMPAC_KERNELS", "reference")
    assert (
        startup_line(CONFIG, torch.device("cpu"), torch.float32)
        == "kernels: PyTorch reference (VIMPAC_KERNELS=reference)"
    )
    monkeypatch.setenv("VIMPAC_KERNELS", "triton")
    corrupt_attention(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", KernelFallbackWarning)
        line = startup_line(CONFIG, torch.device("cpu"), torch.float32)
    assert "FAILED" in line and "no fallback" in line and first_call.results() == {}


def build_trainer(tmp_path):
    from vimpac.trainer import Task, Trainer, TrainSettings

    engine = SimpleNamespace(module=None, device=torch.device("cpu"))
    ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": 1}
    ds.update(zero_optimization={"stage": 0}, fp16={"enabled": False}, bf16={"enabled": False})
    return Trainer(engine, CONFIG, [0, 1], TrainSettings(epochs=1), tmp_path, ds, Task())


def test_trainer_start_up_prints_the_kernel_line_only_where_triton_runs(tmp_path, monkeypatch, capsys):
    build_trainer(tmp_path)
    assert "kernel" not in capsys.readouterr().out  # CPU: the reference; nothing to say
    monkeypatch.setattr(kernels, "_TRITON_DEVICE_TYPES", ("cuda", "cpu"))  # as on a GPU
    build_trainer(tmp_path)
    assert "kernel self-check on cpu, float32: axial_attention T/3 ok" in capsys.readouterr().out
