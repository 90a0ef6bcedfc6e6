"""Switching from the original release: its checkpoints convert (`vimpac convert-original`) into exports that
reproduce the original model's outputs (golden.npz) through `vimpac.load_model`, fine-tune and evaluate; its
args.pickle is read without running code; missing files and options vimpac cannot express are refused by name.

The fixtures were written by the original release's own code; see their README for how. Without them (a checkout
without the shared fixtures folder) these tests skip.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import vimpac
from tests.helpers import REPO, environment, launcher
from vimpac.cli import main
from vimpac.errors import UsageError
from vimpac.original import ArgsUnpickler, RefusedPickle, convert_checkpoint, read_args

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "original-release"
pytestmark = pytest.mark.skipif(
    not FIXTURES.is_dir(), reason=f"the original-release fixtures are not at {FIXTURES} (shared fixtures folder absent)"
)
PRETRAIN = FIXTURES / "pretrain_small" / "last"
FINETUNE = FIXTURES / "finetune_small" / "last"
LMDB = FIXTURES / "lmdb" / "dalle_ucf101_train_val_fps16_hflip0_32center32"


@pytest.fixture(scope="module")
def golden():
    with np.load(FIXTURES / "golden.npz", allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Both fixture checkpoints converted with the command line: {"pretrain": folder, "finetune": folder}."""
    root = tmp_path_factory.mktemp("converted")
    out = {}
    for kind, source in (("pretrain", PRETRAIN), ("finetune", FINETUNE.parent)):  # finetune: found via last/
        assert main(["convert-original", str(source), "--out", str(root / kind)]) == 0
        out[kind] = root / kind
    return out


def tolerance(golden: dict[str, np.ndarray], name: str) -> float:
    """How far a float32 forward may land from golden array `name`: 4× the gap the fixture measured between the
    original's float32 and float64 runs of it (f64_maxabs_<name>, 2e-7 to 2e-6), plus 1e-6; 1e-6 for arrays copied
    as they are (the positional table). A wrong LayerNorm eps alone (1e-6 for 1e-12) is off by 4e-5."""
    gap = golden.get(f"f64_maxabs_{name}")
    return 1e-6 + (4 * float(gap) if gap is not None else 0.0)


def within_tolerance(errors: dict[str, float], golden: dict[str, np.ndarray]) -> dict[str, tuple[float, float]]:
    """{name: (error, tolerance)} of the arrays whose error exceeds their tolerance (empty: all agree)."""
    return {k: (e, tolerance(golden, k)) for k, e in errors.items() if not e < tolerance(golden, k)}


def max_error(actual: torch.Tensor, expected: np.ndarray) -> float:
    assert tuple(actual.shape) == expected.shape
    return float((actual.double() - torch.from_numpy(expected).double()).abs().max())


# ------------------------------------------------------------------------------------------------ golden outputs


def test_converted_pretraining_export_reproduces_every_golden_array(exports, golden):
    model = vimpac.load_model(exports["pretrain"])
    assert model.config.special_ids == "original" and model.config.pad_id == 8193 and model.config.mask_id == 8196
    assert model.config.num_heads == 2 and model.config.shape == (3, 4, 4) and model.num_classes is None
    positions = golden["mlm_positions"]
    b, t, i, j = positions.T
    flat = ((b * 3 + t) * 4 + i) * 4 + j
    errors = {}
    for case in ("a", "b"):  # b: the last frame of sample 1 is PAD
        tokens = golden[f"tokens_{case}"]
        cls, hidden = model.encode(tokens)
        errors[f"pt_cls_{case}"] = max_error(cls, golden[f"pt_cls_{case}"])
        errors[f"pt_hidden_{case}"] = max_error(hidden, golden[f"pt_hidden_{case}"])
        errors[f"pt_cls_proj_{case}"] = max_error(model.projection(tokens), golden[f"pt_cls_proj_{case}"])
        logits = model.mlm_logits(torch.from_numpy(tokens), positions)
        errors[f"pt_mlm_logits_{case}"] = max_error(logits, golden[f"pt_mlm_logits_{case}"])
        assert torch.equal(model.mlm_logits(tokens, flat), logits)
        everywhere = model.mlm_logits(tokens)
        assert everywhere.shape == (2, 3, 4, 4, 8197)
        everywhere_error = max_error(everywhere[b, t, i, j], golden[f"pt_mlm_logits_{case}"])
        assert everywhere_error < tolerance(golden, f"pt_mlm_logits_{case}")
        assert torch.equal(model.cls(tokens), cls) and torch.equal(model.hidden_states(tokens), hidden)
    state = load_file(str(exports["pretrain"] / "model.safetensors"))
    tables = {k.rsplit(".", 1)[1]: state[k] for k in state if k.startswith("backbone.positional_embedding.")}
    grid = tables["temporal"][:, None, None] + tables["height"][None, :, None] + tables["width"][None, None, :]
    errors["pt_pos_emb"] = max_error(torch.cat([tables["cls"], grid.reshape(48, -1)]), golden["pt_pos_emb"])
    assert not within_tolerance(errors, golden)


def test_converted_finetuning_export_reproduces_every_golden_array(exports, golden):
    model = vimpac.load_model(exports["finetune"])
    assert model.num_classes == 5 and model.has_classifier and not model.has_mlm_head
    errors = {}
    for case in ("a", "b"):
        tokens = golden[f"tokens_{case}"]
        errors[f"ft_cls_{case}"] = max_error(model.cls(tokens), golden[f"ft_cls_{case}"])
        errors[f"ft_logits_{case}"] = max_error(model.class_logits(tokens), golden[f"ft_logits_{case}"])
    assert not within_tolerance(errors, golden)


def test_load_model_converts_an_original_folder_in_memory_exactly_like_the_export(exports, golden):
    tokens = golden["tokens_b"]
    direct = vimpac.load_model(FIXTURES / "finetune_small")  # the original output folder: its last/ is used
    exported = vimpac.load_model(exports["finetune"])
    assert torch.equal(direct.class_logits(tokens), exported.class_logits(tokens))
    assert direct.source == FINETUNE


# ------------------------------------------------------------------------------------------------ the export


def test_export_records_its_origin_and_loads_where_vimpac_exports_load(exports):
    from vimpac.finetune_setup import finetune_config, initial_state, load_exported
    from vimpac.modeling import VimpacForClassification
    from vimpac.pretrain_eval import load_pretrained

    for kind, folder in exports.items():
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            assert f.metadata()["producer"] == "vimpac convert-original"
            assert f.metadata()["original_kind"] == kind
        record = json.loads((folder / "original_args.json").read_text())
        assert record["kind"] == kind and record["args"]["hid_dim"] == 128
    # fine-tuning's --load: the pre-training export gets a fresh classifier, the fine-tuning export keeps its own
    for kind, untouched in (("pretrain", ["classifier.fc.weight", "classifier.fc.bias"]), ("finetune", [])):
        saved, state = load_exported(exports[kind])
        flags = argparse.Namespace(dropout=0.1, clip_len=None, frame_size=None, different_shape=False, load="x")
        config = finetune_config(flags, saved)
        model = VimpacForClassification(config, 5)
        assert sorted(initial_state(model, state, saved, config)) == sorted(untouched)
    pretrained = load_pretrained(exports["pretrain"])
    assert pretrained.mlm_head is not None and pretrained.nce_head is not None


def test_api_refuses_missing_heads_and_bad_tokens(exports, golden):
    pretrained, finetuned = vimpac.load_model(exports["pretrain"]), vimpac.load_model(exports["finetune"])
    tokens = golden["tokens_a"]
    with pytest.raises(vimpac.MissingHeadError, match="classifier"):
        pretrained.class_logits(tokens)
    with pytest.raises(vimpac.MissingHeadError, match="MLM head"):
        finetuned.mlm_logits(tokens)
    with pytest.raises(vimpac.MissingHeadError, match="projection"):
        finetuned.projection(tokens)
    with pytest.raises(ValueError, match=r"\(3, 4, 4\)"):
        pretrained.cls(tokens[:, :2])
    with pytest.raises(ValueError, match="8197"):
        pretrained.cls(np.full_like(tokens, 8197))
    with pytest.raises(ValueError, match="integer"):
        pretrained.cls(tokens.astype(np.float32))
    with pytest.raises(ValueError, match="positions"):
        pretrained.mlm_logits(tokens, [[0, 0, 0, 9]])
    assert pretrained.cls(tokens.tolist()).shape == (2, 128)  # nested lists work too
    assert not pretrained.cls(tokens).requires_grad
    with pytest.raises(UsageError, match=r"no config\.json"):
        vimpac.load_model(FIXTURES / "lmdb")


def test_import_vimpac_stays_light():
    code = "import sys, vimpac; assert 'torch' not in sys.modules; assert callable(vimpac.load_model)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# ------------------------------------------------------------------------------------------- refusals


def copy_checkpoint(tmp_path: Path, args: dict | None = None, raw_args: bytes | None = None) -> Path:
    """A checkpoint folder with the fixture's pre-training weights and the given arguments."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    os.symlink(PRETRAIN / "classifier.pt", folder / "classifier.pt")
    if raw_args is None:
        raw_args = pickle.dumps(argparse.Namespace(**args), protocol=4)
    (folder / "args.pickle").write_bytes(raw_args)
    return folder


class Exploit:
    """Unpickling this runs a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_args_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    base = read_args(PRETRAIN / "args.pickle")
    for name, payload in (
        ("bare", pickle.dumps(Exploit(marker), protocol=4)),
        ("inside", pickle.dumps(argparse.Namespace(**{**base, "model": Exploit(marker)}), protocol=4)),
        ("protocol0", pickle.dumps(Exploit(marker), protocol=0)),
    ):
        (tmp_path / name).mkdir()
        folder = copy_checkpoint(tmp_path / name, raw_args=payload)
        with pytest.raises(UsageError, match=r"refused: refusing to load (posix|os|nt)\.system"):
            convert_checkpoint(folder)
        assert main(["convert-original", str(folder), "--out", str(tmp_path / name / "out")]) == 2
        assert not (tmp_path / name / "out").exists()
    assert not marker.exists()
    # the unpickler itself: an allowed Namespace comes back, anything else raises before being called
    assert ArgsUnpickler.ALLOWED[("argparse", "Namespace")] is argparse.Namespace
    with pytest.raises(RefusedPickle):
        ArgsUnpickler.find_class(ArgsUnpickler.__new__(ArgsUnpickler), "builtins", "eval")


def test_missing_files_are_named(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UsageError, match=r"lacks classifier\.pt and args\.pickle"):
        convert_checkpoint(empty)
    only_weights = tmp_path / "weights"
    only_weights.mkdir()
    os.symlink(PRETRAIN / "classifier.pt", only_weights / "classifier.pt")
    with pytest.raises(UsageError, match=r"lacks args\.pickle"):
        convert_checkpoint(only_weights)
    assert main(["convert-original", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 2
    assert "not a directory" in capsys.readouterr().err
    # weights that need more than weights_only (a pickled object): refused, not executed
    bad = tmp_path / "bad"
    bad.mkdir()
    torch.save({"backbone.x": Exploit(tmp_path / "pwned")}, bad / "classifier.pt")
    shutil.copy(PRETRAIN / "args.pickle", bad / "args.pickle")
    with pytest.raises(UsageError, match="weights_only"):
        convert_checkpoint(bad)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"pre_activation": True, "halve_att": True}, "--pre-activation True, .*--halve-att"),
        ({"pre_activation": True}, r"lacks backbone\.ln_post\.weight"),  # post-LN weights, pre-LN arguments
        ({"model": "bert"}, "--model 'bert'"),
        ({"pos_emb": "frozen"}, "--pos-emb 'frozen'"),
        ({"nce_bn_after_proj": True}, r"lacks cls_head\.mlp\.bn_1\.weight"),  # the weights have no such BN
        ({"model": "efflayoutT|H|W"}, "cannot be built"),  # 2 heads over 3 parallel patterns
        ({"frame_size": 64}, "shapes or dtypes differ"),
        ({"vocab_size": 2048}, "8197 rows"),
    ],
)
def test_options_vimpac_cannot_express_or_weights_that_do_not_fit_are_refused_by_name(tmp_path, change, message):
    args = {**read_args(PRETRAIN / "args.pickle"), **change}
    with pytest.raises(UsageError, match=message):
        convert_checkpoint(copy_checkpoint(tmp_path, args))


def test_drop_projection_head_converts_the_rest(tmp_path, golden):
    args = {**read_args(PRETRAIN / "args.pickle"), "nce_bn_after_proj": True}
    folder = copy_checkpoint(tmp_path, args)
    assert main(["convert-original", str(folder), "--out", str(tmp_path / "out"), "--drop-projection-head"]) == 0
    model = vimpac.load_model(tmp_path / "out")
    assert model.has_mlm_head and not model.has_projection_head
    assert max_error(model.hidden_states(golden["tokens_a"]), golden["pt_hidden_a"]) < tolerance(golden, "pt_hidden_a")
    assert main(["convert-original", str(folder), "--out", str(tmp_path / "out"), "--drop-projection-head"]) == 2


# ------------------------------------------------------------------------------- fine-tuning on imported data


@pytest.mark.slow
def test_converted_weights_finetune_and_evaluate_on_an_imported_database(exports, tmp_path):
    """The converted pre-training export fine-tunes on the imported fixture LMDB; the converted fine-tuning export
    evaluates with --eval-only, and its predictions are those of vimpac.load_model on the same clips."""
    from vimpac.finetune_data import FinetuneTestClips

    db = tmp_path / "db"
    assert main(["db", "import-original", str(LMDB), "--out", str(db), "--annotations", str(FIXTURES / "anno")]) == 0
    run = ["--deepspeed_config", "ds_configs/cpu.json", "--precision", "fp32", "--zero-stage", "0"]
    run += ["--num-workers", "0", "--data", str(db), "--frame-rate", "2", "--batch-size", "3", "--bs-per-gpu", "3"]
    run += ["--last-test-clips", "2"]
    jobs = {
        "train": ["--load", str(exports["pretrain"]), "--epochs", "1", "--output", str(tmp_path / "train")],
        "eval": ["--eval-only", "--load", str(exports["finetune"]), "--output", str(tmp_path / "eval")],
    }
    for name, flags in jobs.items():
        cmd = [*launcher("vimpac.finetune", 1), *run, *flags]
        result = subprocess.run(cmd, cwd=REPO, env=environment(), capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, name + result.stdout[-3000:] + result.stderr[-3000:]
    trained = json.loads((tmp_path / "train" / "eval" / "final_clips2.json").read_text())
    assert trained["num_videos"] == 2 and trained["split"] == "test_1"
    tuned = vimpac.load_model(tmp_path / "train")  # a run directory: its export/, now with a 5-class classifier
    assert tuned.num_classes == 5 and tuned.config.special_ids == "original" and tuned.producer == "vimpac.finetune"
    evaluated = json.loads((tmp_path / "eval" / "eval" / "eval_only_clips2.json").read_text())
    # the same clips as the original's test loader: ApplyEyeMakeup (3 frames) is PAD-filled, BalanceBeam is not
    model = vimpac.load_model(exports["finetune"])
    clips = FinetuneTestClips(db, "test_1", 3, pad_id=8193, views=["r32_center_f0"], num_clips=2, frame_rate=2)
    expected = {}
    for index, video in enumerate(clips.ids):
        tokens = clips[index]["tokens"]
        pads = int((tokens == 8193).sum())
        assert pads == {"ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01": 64, "BalanceBeam/v_BalanceBeam_g05_c04": 0}[video]
        expected[video] = int(model.class_logits(tokens).softmax(-1).mean(0).argmax())
    assert evaluated["predictions"] == expected
