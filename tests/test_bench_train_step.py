"""scripts/bench/train_step.py at a toy size: the reported figures are consistent with each other and with the
batch, the mixed-precision optimizer keeps 16-bit weights equal to its fp32 masters, and the CLI writes its JSON.
No timing is asserted, only the arithmetic between the measured time and the derived figures."""

import json
import statistics
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, loaded_script
from vimpac.flops import pretrain_train_flops
from vimpac.masking import IGNORE_INDEX

SCRIPT = REPO / "scripts" / "bench" / "train_step.py"


@pytest.fixture(scope="module")
def bench():
    yield from loaded_script(SCRIPT, "bench_train_step")


def test_batch_holds_two_masked_clips_per_video_first_clips_first(bench):
    config = bench.PRESETS["tiny"].config()
    batch = bench.make_batch(config, videos=3, mask_blocks=2, seed=1)
    tokens, labels = batch["tokens"], batch["labels"]
    assert tokens.shape == labels.shape == (6, *config.shape)
    masked = labels != IGNORE_INDEX
    assert batch["predicted"] == int(masked.sum()) > 0
    assert bool((tokens[masked] == config.mask_id).all())  # no rand-replace: every masked position is MASK
    assert bool((tokens[~masked] < config.vocab_size).all()) and bool((labels[masked] < config.vocab_size).all())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_result_fields_are_consistent(bench, precision):
    row = bench.measure("tiny", 2, precision, "cpu", warmup=1, steps=3, peak_tflops=0.5)
    config = bench.PRESETS["tiny"].config()
    t, h, w = config.shape
    assert (row["clips"], row["tokens_per_step"]) == (4, 4 * t * h * w)
    assert len(row["step_times_s"]) == 3 and row["median_step_s"] == statistics.median(row["step_times_s"])
    assert row["tokens_per_s"] == pytest.approx(row["tokens_per_step"] / row["median_step_s"], rel=1e-12)
    assert row["clips_per_s"] == pytest.approx(4 / row["median_step_s"], rel=1e-12)
    assert 0 < row["predicted_per_step"] < row["tokens_per_step"]
    assert row["model_flops_per_step"] == pretrain_train_flops(config, 4, row["predicted_per_step"])
    assert row["tflops_per_s"] == pytest.approx(row["model_flops_per_step"] / row["median_step_s"] / 1e12, rel=1e-12)
    assert row["peak_flops"] == 0.5e12 and row["mfu"] == pytest.approx(row["tflops_per_s"] / 0.5, rel=1e-12)
    assert row["parameters"] == sum(p.numel() for p in bench.VimpacForPretraining(config).parameters())
    assert row["peak_memory_bytes"] > 0 and row["peak_memory_kind"]
    assert all(torch.isfinite(torch.tensor(list(step.values()))).all() for step in row["losses"])
    assert (row["precision"], row["attention"], row["grad_checkpoint"]) == (precision, "reference", False)
    assert bench.measure("tiny", 1, precision, "cpu", warmup=0, steps=1)["mfu"] is None  # no peak on a CPU


def test_mixed_precision_update_keeps_bf16_weights_equal_to_fp32_masters(bench):
    config = bench.PRESETS["tiny"].config()
    torch.manual_seed(0)
    model = bench.VimpacForPretraining(config).to(torch.bfloat16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = bench.MixedPrecisionAdamW(model, lr=1e-2)
    batch = bench.make_batch(config, 2, 2)
    batch.pop("predicted")
    bench.train_step(model, batch, optimizer, loss_scale=8.0)
    changed = 0
    for p, master in optimizer.pairs:
        assert master.dtype == torch.float32 and master is not p
        assert torch.equal(p.detach(), master.detach().to(torch.bfloat16))
        assert p.grad is None and master.grad is None
    for name, p in model.named_parameters():
        changed += not torch.equal(p, before[name])
    assert changed > len(before) // 2


def test_cli_prints_the_table_and_writes_json(bench, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("VIMPAC_KERNELS", "reference")  # main() sets it; monkeypatch restores it afterwards
    out = tmp_path / "bench.json"
    code = bench.main(["--configs", "tiny", "--batch-size", "1", "--warmup", "0", "--steps", "2", "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "tokens/s" in printed and "tiny" in printed and "pass --peak-tflops" in printed
    payload = json.loads(out.read_text())
    assert {"date", "machine", "versions", "git_commit", "settings", "cpu_env", "results"} <= set(payload)
    assert payload["versions"]["torch"] == torch.__version__ and payload["machine"]["cpu_count"] >= 1
    (row,) = payload["results"]
    assert row["config"] == "tiny" and row["timed_steps"] == 2 and row["batch_videos"] == 1
    assert row["tokens_per_s"] == pytest.approx(row["tokens_per_step"] / row["median_step_s"], rel=1e-12)


def test_cli_refuses_unknown_configs_and_unusable_kernels(bench, capsys, monkeypatch):
    assert bench.main(["--configs", "huge"]) == 2
    assert "unknown --configs ['huge']" in capsys.readouterr().err
    # Triton kernels on CPU tensors need the interpreter: without it the benchmark refuses before any work.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("VIMPAC_KERNELS", "reference")  # main() sets it; monkeypatch restores it afterwards
    assert bench.main(["--configs", "tiny", "--attention", "triton", "--device", "cpu"]) == 2
    assert "TRITON_INTERPRET=1" in capsys.readouterr().err


def test_demo_preset_is_the_demo_s_pretraining_model_and_micro_batch(bench):
    """The `demo` preset follows `vimpac demo`'s default budget: the model pretrain.py builds from the demo's flags,
    pretrain.py's default mask blocks, the CPU engine json and the per-rank micro-batch on 2 CPU ranks."""
    from vimpac.commands.demo import BUDGETS, engine_config, micro_batch, model_flags
    from vimpac.config import config_from_args
    from vimpac.pretrain import build_parser

    budget = BUDGETS["default"]
    args = build_parser().parse_args(["--deepspeed_config", "x", "--data", "y", "--output", "z", *model_flags(budget)])
    preset = bench.PRESETS["demo"]
    assert preset.config() == config_from_args(args)
    assert preset.mask_blocks == args.mask_blocks
    assert bench.REPO / preset.ds_config == Path(engine_config("cpu", finetune=False))
    assert bench.DEFAULT_CPU_BATCH["demo"] == micro_batch(budget.pretrain_batch, ranks=2)


def test_profile_steps_record_top_ops_and_cpu_times(bench):
    row = bench.measure("tiny", 1, "fp32", "cpu", warmup=0, steps=2, profile_steps=1)
    assert len(row["process_cpu_times_s"]) == 2 and all(t > 0 for t in row["process_cpu_times_s"])
    ops = row["profile_top_ops"]
    assert row["profile_steps"] == 1 and 0 < len(ops) <= 25
    assert any(op["op"] in ("aten::mm", "aten::addmm") for op in ops)
    shares = [op["self_cpu_share"] for op in ops]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1 + 1e-9
    assert "profile_top_ops" not in bench.measure("tiny", 1, "fp32", "cpu", warmup=0, steps=1)
