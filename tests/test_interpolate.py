"""Positional-table interpolation (vimpac.interpolate) and resuming pre-training at another frame size.

References are independent of the code under test: a numpy implementation of the half-pixel linear rule, hand
computed values, torch's F.interpolate, and, for the resumed runs, the state DeepSpeed's ordinary loader restores
from the checkpoint at the old shape (tests/resume_probe.py reads both with DeepSpeed's public safe_get_full_*
API) or the checkpoint file itself (stage 0).
"""

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.helpers import REPO, environment, launcher
from tests.synthetic_codes import VOCAB, write_code_database
from vimpac.config import VimpacConfig
from vimpac.errors import UsageError
from vimpac.interpolate import (
    check_resizable,
    interpolate_grid,
    interpolate_table,
    positional_leaf,
    resize_positional_state,
)
from vimpac.metrics import read_metrics
from vimpac.modeling import VimpacBackbone, VimpacForPretraining
from vimpac.optim import lr_multiplier

PROBE = REPO / "tests" / "resume_probe.py"
POS = "backbone.positional_embedding."


def linear_reference(table: np.ndarray, new_n: int) -> np.ndarray:
    """Half-pixel (align_corners=False) linear resize along axis 0, written out: x = (i + 0.5)·n/new_n − 0.5."""
    n = table.shape[0]
    out = np.empty((new_n, *table.shape[1:]), dtype=np.float64)
    for i in range(new_n):
        x = min(max((i + 0.5) * n / new_n - 0.5, 0.0), n - 1)
        lo = int(np.floor(x))
        hi = min(lo + 1, n - 1)
        out[i] = (1 - (x - lo)) * table[lo] + (x - lo) * table[hi]
    return out


def small_config(**fields) -> VimpacConfig:
    base = {"vocab_size": 16, "hidden_size": 8, "layers": 1, "heads": 2, "clip_len": 5, "grid": (16, 16)}
    return VimpacConfig(**{**base, **fields})


def random_state(config: VimpacConfig) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return VimpacForPretraining(config).state_dict()


# ------------------------------------------------------------------------------------------- pure functions
def test_interpolate_table_hand_computed():
    # n=2 → 4: sample positions -0.25, 0.25, 0.75, 1.25, clamped to [0, 1].
    table = torch.tensor([[0.0, 10.0], [1.0, 30.0]])
    expected = torch.tensor([[0.0, 10.0], [0.25, 15.0], [0.75, 25.0], [1.0, 30.0]])
    torch.testing.assert_close(interpolate_table(table, 4), expected, rtol=0, atol=1e-7)
    # n=3 → 2: positions 0.25 and 1.75.
    torch.testing.assert_close(
        interpolate_table(torch.tensor([[0.0], [10.0], [20.0]]), 2), torch.tensor([[2.5], [17.5]]), rtol=0, atol=1e-6
    )


@pytest.mark.parametrize(("n", "new_n"), [(5, 10), (16, 32), (32, 16), (7, 3), (4, 8), (1, 3)])
def test_interpolate_table_matches_references(n, new_n):
    table = torch.randn(n, 6, generator=torch.Generator().manual_seed(n * 100 + new_n), dtype=torch.float64)
    out = interpolate_table(table, new_n)
    assert out.shape == (new_n, 6) and out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), linear_reference(table.numpy(), new_n), rtol=0, atol=1e-12)
    reference = F.interpolate(table.t()[None], size=new_n, mode="linear", align_corners=False)[0].t()
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-12)


def test_interpolate_table_keeps_dtype_and_copies_when_unchanged():
    table = torch.randn(5, 4).half()
    out = interpolate_table(table, 10)
    assert out.dtype == torch.float16
    np.testing.assert_allclose(out.float().numpy(), linear_reference(table.float().numpy(), 10), atol=2e-3)
    same = interpolate_table(table, 5)
    assert torch.equal(same, table) and same.data_ptr() != table.data_ptr()


def test_interpolate_grid_is_linear_along_each_spatial_axis():
    h, w, d = 3, 4, 5
    table = torch.randn(h * w, d, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = interpolate_grid(table, (h, w), (6, 7)).reshape(6, 7, d).numpy()
    grid = table.reshape(h, w, d).numpy()  # row-major: position i·w + j is (row i, column j)
    along_h = linear_reference(grid, 6)  # rows first, then columns
    expected = linear_reference(along_h.transpose(1, 0, 2), 7).transpose(1, 0, 2)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-12)


def test_hw_separation_resizes_each_axis_on_its_own():
    old = small_config(clip_len=5, grid=(16, 16))
    state = random_state(old)
    both = resize_positional_state(state, old, small_config(clip_len=10, grid=(32, 32)))
    for leaf, n in (("temporal", 10), ("height", 32), ("width", 32)):
        expected = linear_reference(state[POS + leaf].double().numpy(), n)
        np.testing.assert_allclose(both[POS + leaf].double().numpy(), expected, rtol=0, atol=1e-6)
    # The CLS position and every non-positional tensor are passed through untouched (the same objects).
    for key, value in state.items():
        if positional_leaf(key) not in ("temporal", "height", "width"):
            assert both[key] is value, key
    # Only the grid changes: the temporal table is left as it was; only T: height and width are.
    grid_only = resize_positional_state(state, old, small_config(clip_len=5, grid=(32, 32)))
    assert grid_only[POS + "temporal"] is state[POS + "temporal"]
    assert torch.equal(grid_only[POS + "height"], both[POS + "height"])
    time_only = resize_positional_state(state, old, small_config(clip_len=10, grid=(16, 16)))
    assert time_only[POS + "height"] is state[POS + "height"] and time_only[POS + "width"] is state[POS + "width"]
    assert torch.equal(time_only[POS + "temporal"], both[POS + "temporal"])
    # Non-square grids resize height and width to their own sizes; the result loads into the new model.
    new = small_config(clip_len=3, grid=(8, 24))
    VimpacForPretraining(new).load_state_dict(resize_positional_state(state, old, new), strict=True)


def test_temporal_separation_resizes_the_spatial_table_as_a_grid():
    old = small_config(pos_emb="temporal_separation", grid=(4, 6))
    new = small_config(pos_emb="temporal_separation", grid=(8, 3))
    state = random_state(old)
    # An additive table f(row) + g(column): bilinear resizing keeps it additive, each part resized on its axis.
    rows, cols = torch.randn(4, 8, dtype=torch.float64), torch.randn(6, 8, dtype=torch.float64)
    state[POS + "spatial"] = (rows[:, None] + cols[None, :]).reshape(24, 8)
    out = resize_positional_state(state, old, new)
    expected = linear_reference(rows.numpy(), 8)[:, None] + linear_reference(cols.numpy(), 3)[None, :]
    np.testing.assert_allclose(out[POS + "spatial"].reshape(8, 3, 8).numpy(), expected, rtol=0, atol=1e-12)
    assert out[POS + "temporal"] is state[POS + "temporal"] and out[POS + "cls"] is state[POS + "cls"]
    VimpacForPretraining(new).load_state_dict(out, strict=True)


def test_same_shape_is_the_identity_and_bare_backbone_keys_work():
    config = small_config()
    state = VimpacBackbone(config).state_dict()  # keys "positional_embedding.*", no "backbone." prefix
    out = resize_positional_state(state, config, small_config())
    assert all(out[k] is v for k, v in state.items())
    bigger = resize_positional_state(state, config, small_config(grid=(32, 32)))
    assert bigger["positional_embedding.height"].shape == (32, 8)
    VimpacBackbone(small_config(grid=(32, 32))).load_state_dict(bigger, strict=True)


def test_second_moments_are_clamped_at_zero():
    old, new = small_config(grid=(2, 2)), small_config(grid=(4, 4))
    moments = {POS + "height": torch.tensor([[-1.0] * 8, [3.0] * 8]), POS + "width": torch.ones(2, 8)}
    out = resize_positional_state(moments, old, new, nonnegative=True)
    np.testing.assert_allclose(out[POS + "height"][:, 0].numpy(), [0.0, 0.0, 2.0, 3.0])  # -1, 0, 2, 3 → clamped
    raw = resize_positional_state(moments, old, new)
    np.testing.assert_allclose(raw[POS + "height"][:, 0].numpy(), [-1.0, 0.0, 2.0, 3.0])


def test_refusals_name_the_problem():
    old = small_config()
    with pytest.raises(UsageError, match=r"full.*hw_separation"):
        check_resizable(small_config(pos_emb="full"), small_config(pos_emb="full", grid=(32, 32)))
    check_resizable(small_config(pos_emb="full"), small_config(pos_emb="full"))  # nothing to resize: fine
    with pytest.raises(UsageError, match=r"hidden_size, layers") as err:
        check_resizable(old, small_config(layers=2, hidden_size=16, grid=(32, 32)))
    assert "--frame-size" in str(err.value)
    for change in ({"layout": "T,H,W"}, {"vocab_size": 32}, {"pos_emb": "temporal_separation"}):
        with pytest.raises(UsageError, match=next(iter(change))):
            resize_positional_state(random_state(old), old, small_config(**change))
    # A caller that changes more on purpose (fine-tuning's dropout) says so; the table width never may change.
    shape_and_dropout = ("clip_len", "grid", "dropout")
    out = resize_positional_state(
        random_state(old), old, small_config(dropout=0.0, grid=(32, 32)), False, shape_and_dropout
    )
    assert out[POS + "height"].shape == (32, 8)
    with pytest.raises(UsageError, match="hidden_size"):
        check_resizable(old, small_config(hidden_size=16), allowed=("hidden_size",))


# ---------------------------------------------------------------------------------------- resumed runs
MODEL = ["--layers", "2", "--hid-dim", "64", "--heads", "2", "--clip-len", "4", "--nce-proj-hid-dim", "64"]
MODEL += ["--vocab-size", str(VOCAB), "--mask-blocks", "2"]
RUN = ["--deepspeed_config", "ds_configs/cpu.json", "--batch-size", "8", "--bs-per-gpu", "4", "--num-workers", "0"]
RUN += ["--lr", "1e-2", "--warm-up", "3", "--epochs", "4"]  # 2 steps per epoch on 16 videos: 8 steps in all


def launch(
    entry: str,
    db: Path,
    output: Path,
    frame: int,
    ranks: int,
    *flags: str,
    probe: Path | None = None,
    then_train: bool = False,
):
    """Run `entry` (vimpac.pretrain, or the path of tests/resume_probe.py) in one process or over `ranks` ranks."""
    args = [*launcher(entry, ranks), "--data", str(db), "--output", str(output), "--frame-size", str(frame)]
    args += [*MODEL, *RUN, *flags]
    env = environment()
    if probe is not None:
        env["RESUME_PROBE_OUTPUT"] = str(probe)
        env["RESUME_PROBE_THEN_TRAIN"] = "1" if then_train else "0"
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def run_ok(*args, **kwargs) -> subprocess.CompletedProcess:
    result = launch(*args, **kwargs)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def probe_state(
    db: Path, output: Path, frame: int, ranks: int, *flags: str, then_train: bool = False
) -> tuple[dict, subprocess.CompletedProcess]:
    """Resume `output` and read what the engine holds (tests/resume_probe.py); with `then_train`, the same launch
    then trains on to the end of the schedule, as `vimpac.pretrain --resume` would."""
    path = output.parent / f"probe_{output.name}_{frame}.pt"
    result = run_ok(str(PROBE), db, output, frame, ranks, *flags, "--resume", probe=path, then_train=then_train)
    return torch.load(path, weights_only=False), result


def expected_lr(step: int) -> float:
    """Learning rate of optimizer step `step` (0-based): peak 1e-2, 3 warm-up steps, linear decay over 8."""
    return 1e-2 * lr_multiplier("linear", step, 3, 8)


def zero_checkpoint_state(folder: Path) -> dict:
    """Weights and Adam moments per parameter, read straight from a one-rank ZeRO-1/2 checkpoint: each param
    group's fp32 master and moments are one flat tensor, and `param_slice_mappings` gives every parameter's
    (start, numel) in it."""
    model = torch.load(folder / "mp_rank_00_model_states.pt", weights_only=False)
    optim = torch.load(folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt", weights_only=False)
    optim = optim["optimizer_state_dict"]
    shapes = {n: s for group in model["param_shapes"] for n, s in group.items()}
    state = {"params": {}, "exp_avg": {}, "exp_avg_sq": {}}
    base = optim["base_optimizer_state"]
    for i, mapping in enumerate(optim["param_slice_mappings"]):
        flat = {"params": optim["single_partition_of_fp32_groups"][i], **base["state"][i]}
        for name, address in mapping.items():
            for kind in state:
                state[kind][name] = (
                    flat[kind].detach().narrow(0, address.start, address.numel).view(shapes[name]).clone()
                )
    return {
        **state,
        "buffers": {n: model["module"][n] for n in model["buffer_names"]},
        "optimizer_steps": sorted({float(s["step"]) for s in base["state"].values()}),
        "lr": [g["lr"] for g in base["param_groups"]],
        "global_steps": model["global_steps"],
    }


def small_model_configs() -> tuple[VimpacConfig, VimpacConfig]:
    fields = {"vocab_size": VOCAB, "hidden_size": 64, "layers": 2, "heads": 2, "clip_len": 4, "nce_proj_hid_dim": 64}
    return VimpacConfig(grid=(4, 4), **fields), VimpacConfig(grid=(8, 8), **fields)


def assert_resized(new: dict, old: dict, old_config: VimpacConfig, new_config: VimpacConfig, step: int = 4) -> None:
    """`new` (probed after the resized resume) holds `old`'s weights and moments, the height and width tables
    (grid 4 → 8; T unchanged) interpolated; the checkpoint was written after optimizer step `step`, in epoch 1."""
    assert old_config.clip_len == new_config.clip_len and new_config.grid[0] == new_config.grid[1]
    size = new_config.grid[0]
    for name, value in old["params"].items():
        for kind in ("params", "exp_avg", "exp_avg_sq"):
            table, got = (value if kind == "params" else old[kind][name]), new[kind][name]
            if positional_leaf(name) in ("height", "width"):
                expected = torch.from_numpy(linear_reference(table.double().numpy(), size)).float()
                assert got.shape == (size, new_config.hidden_size), name
                torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9, msg=f"{kind} {name}")
            else:  # weights and moments of every other parameter (temporal and CLS included) carry over exactly
                assert torch.equal(got, table), f"{kind} {name}"
    for name, value in old["buffers"].items():
        assert torch.equal(new["buffers"][name], value), name
    assert new["optimizer_steps"] == old["optimizer_steps"] == [float(step)]  # Adam's bias correction continues
    assert new["lr"] == old["lr"] and new["global_steps"] == old["global_steps"] == step
    assert new["lr"][0] == pytest.approx(expected_lr(step), rel=1e-9)
    # The old database's position does not carry over: whether the checkpoint ended epoch 1 (step 4) or was
    # written in its middle (step 3), the run goes on at the start of epoch 2.
    assert (new["epoch"], new["step_in_epoch"]) == (2, 0)


@pytest.fixture(scope="module")
def databases(tmp_path_factory):
    root = tmp_path_factory.mktemp("resize_db")
    small = write_code_database(root / "f32", videos=16, grid=(4, 4), seed=1)
    large = write_code_database(root / "f64", videos=16, grid=(8, 8), seed=2)  # another "tokenization"
    return small, large


def test_resume_at_a_larger_frame_size_interpolates_and_continues(databases, tmp_path):
    small, large = databases
    output = tmp_path / "run"
    old_config, new_config = small_model_configs()
    run_ok("vimpac.pretrain", small, output, 32, 1, "--interval", "2")  # epochs 0-1: steps 1-4, ZeRO 2
    old = zero_checkpoint_state(output / "checkpoints" / "step00000004")
    new, resumed = probe_state(large, output, 64, 1, then_train=True)
    assert_resized(new, old, old_config, new_config)
    assert not any(p.name.startswith("resized-") for p in (output / "checkpoints").iterdir()), "scratch removed"
    assert "positional tables and their Adam moments interpolated" in resumed.stdout
    metrics = read_metrics(output)
    assert sorted(metrics) == list(range(1, 9))  # the step counter continues: 5-8 in epochs 2 and 3
    assert [metrics[s]["epoch"] for s in range(5, 9)] == [2, 2, 3, 3]
    for step, record in metrics.items():  # one schedule over both launches
        assert record["optim/lr"] == pytest.approx(expected_lr(step - 1), rel=1e-9, abs=1e-15), step
        assert np.isfinite(record["loss/total"])
    assert VimpacConfig.load(output / "export" / "config.json").grid == (8, 8)

    # A resume that changes more than the shape is refused before anything is built.
    refused = launch("vimpac.pretrain", large, output, 64, 1, "--resume", "--dropout", "0.2")
    assert refused.returncode == 2 and "dropout" in refused.stderr and "Traceback" not in refused.stderr


def test_resume_at_a_larger_frame_size_from_zero_stage_0(databases, tmp_path):
    small, large = databases
    output = tmp_path / "run0"
    old_config, new_config = small_model_configs()
    flags = ["--zero-stage", "0", "--save-steps", "1", "--keep-checkpoints", "4"]
    run_ok("vimpac.pretrain", small, output, 32, 1, "--interval", "2", *flags)
    # Resume the checkpoint written in the middle of epoch 1, after step 3.
    (output / "checkpoints" / "latest").write_text("step00000003")
    # The old state straight from the checkpoint file: module weights and the torch AdamW state_dict, whose
    # entries follow the parameter groups of vimpac.optim (decayed, then not).
    saved = torch.load(output / "checkpoints/step00000003/mp_rank_00_model_states.pt", weights_only=False)
    assert (saved["epoch"], saved["step_in_epoch"]) == (1, 1)
    from vimpac.optim import parameter_groups

    names = [n for g in parameter_groups(VimpacForPretraining(old_config), 0.05) for n in g["names"]]
    indices = [i for g in saved["optimizer"]["param_groups"] for i in g["params"]]
    state = saved["optimizer"]["state"]
    module = saved["module"]
    old = {
        "params": {n: module[n].float() for n in names},
        "exp_avg": {n: state[i]["exp_avg"] for n, i in zip(names, indices)},
        "exp_avg_sq": {n: state[i]["exp_avg_sq"] for n, i in zip(names, indices)},
        "buffers": {k: v for k, v in module.items() if k not in names},
        "optimizer_steps": sorted({float(s["step"]) for s in state.values()}),
        "lr": [g["lr"] for g in saved["optimizer"]["param_groups"]],
        "global_steps": saved["global_steps"],
    }
    new, _ = probe_state(large, output, 64, 1, "--zero-stage", "0")
    assert_resized(new, old, old_config, new_config, step=3)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_resume_at_a_larger_frame_size_over_two_ranks(databases, tmp_path, stage):
    """Weights and moments partitioned over 2 ranks (ZeRO 2: optimizer state and gradients; 3: parameters too)."""
    small, large = databases
    output = tmp_path / "run2"
    old_config, new_config = small_model_configs()
    # 2 ranks × 2 videos × 2 accumulation steps: still 2 steps per epoch.
    two = ["--batch-size", "8", "--bs-per-gpu", "2", "--zero-stage", str(stage)]
    run_ok("vimpac.pretrain", small, output, 32, 2, *two, "--interval", "2")
    old, _ = probe_state(small, output, 32, 2, *two)
    new, _ = probe_state(large, output, 64, 2, *two, then_train=True)
    assert_resized(new, old, old_config, new_config)
    metrics = read_metrics(output)
    assert sorted(metrics) == list(range(1, 9))
    for step, record in metrics.items():
        assert record["optim/lr"] == pytest.approx(expected_lr(step - 1), rel=1e-9, abs=1e-15), step
