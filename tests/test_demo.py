"""`vimpac demo --budget tiny` end to end: every stage runs (two ranks under the DeepSpeed launcher), every
artefact exists and is valid, and a rerun skips every stage and reports the same numbers."""

import json
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image, ImageSequence
from safetensors import safe_open

from tests.helpers import REPO, environment
from vimpac.code_db import inspect
from vimpac.commands.demo import BUDGETS

STAGES = (
    "synth",
    "tokenizer",
    "tokenize:unlabeled",
    "tokenize:labeled_train",
    "tokenize:labeled_test",
    "pretrain",
    "finetune_pretrained",
    "finetune_scratch",
    "pretrain-eval",
    "probe",
    "pictures",
    "pictures:retrieval",
)


def demo(out: Path, *flags: str) -> subprocess.CompletedProcess:
    command = [str(Path(sys.executable).parent / "vimpac"), "demo", "--budget", "tiny", "--out", str(out), *flags]
    result = subprocess.run(command, cwd=REPO, env=environment(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


@pytest.mark.slow
def test_tiny_demo_writes_every_artefact_and_reruns_from_its_cache(tmp_path):
    run = tmp_path / "demo"
    first = demo(run)
    assert "vimpac demo: done" in first.stdout
    stages = json.loads((run / "stages.json").read_text())
    assert set(STAGES) <= set(stages)

    assert (run / "corpus" / "something-something-v2-train.json").is_file()
    assert (run / "tokenizer" / "config.json").is_file()
    for name in ("unlabeled", "labeled_train", "labeled_test"):
        report = inspect(run / "codes" / name, sample=5)
        assert report["ok"] and report["counts"]["videos"] > 0 and report["counts"]["failures"]["total"] == 0
    for name, producer in (("pretrain", "vimpac.pretrain"), ("finetune_pretrained", "vimpac.finetune")):
        with safe_open(str(run / name / "export" / "model.safetensors"), "pt") as weights:
            assert weights.metadata()["producer"] == producer
        assert list((run / name / "tensorboard").glob("events.out.tfevents.*"))

    report = json.loads((run / "report.json").read_text())
    pre = report["pretraining"]
    assert pre["masked_positions"] > 0
    for key in ("mlm_accuracy", "most_frequent_accuracy", "nearest_copy_accuracy", "contrastive_accuracy"):
        assert 0.0 <= pre[key] <= 1.0, key
    assert pre["contrastive_chance"] == pytest.approx(1 / 7)  # batches of 4 validation videos, 2 clips each
    for name in ("finetune_pretrained", "finetune_scratch"):
        results = report["finetuning"][name]
        assert sorted(results, key=int) == ["1", "2"]
        for k, record in results.items():
            assert 0.0 <= record["top1"] <= record["top5"] <= 1.0
            assert record["views_per_video"] == int(k) * len(record["views"]) and record["num_videos"] == 4

    pictures = report["pictures"]
    with Image.open(pictures["png"]) as png:
        assert png.format == "PNG" and png.width > png.height > 0
    with Image.open(pictures["gif"]) as gif:
        assert sum(1 for _ in ImageSequence.Iterator(gif)) == report["budget"]["clip_len"]
    with Image.open(pictures["curves"]) as curves:
        assert curves.format == "PNG"
    assert pictures["retrieval"] == str(run / "pictures" / "retrieval.png")
    with Image.open(pictures["retrieval"]) as retrieval:  # 3 query rows (4 held-out videos, one per class)
        assert retrieval.format == "PNG" and retrieval.width > retrieval.height > 0
    shown = stages["pictures:retrieval"]
    assert len(shown["queries"]) == 3 and all(len(row) == 3 for row in shown["neighbours"])
    objects = report["stages"]["tokenizer"]["objects"]
    assert objects["videos"] == 4 and objects["subject_pixels"] > 0  # the 4 validation videos, unseen in training
    probe = report["probe"]
    assert set(probe["results"]) == {"pretrained", "random"} and probe["eval_videos"] == 4
    # the probes average the clips of the largest K the fine-tunings test with ("1,2" in the tiny budget)
    assert probe["settings"]["num_test_clips"] == BUDGETS["tiny"].probe_clips == 2
    for model in probe["results"].values():
        for feature in ("cls", "mean"):
            assert 0.0 <= model[feature]["linear"]["accuracy"] <= 1.0 and 0.0 <= model[feature]["knn"] <= 1.0
    for line in (
        "pictures",
        "curves",
        "retrieval.png",
        "top-1 on held-out videos",
        "masked-token accuracy",
        "inside the moving objects",
    ):
        assert line in first.stdout

    again = demo(run)
    assert again.stdout.count("done earlier") == len(STAGES)
    assert json.loads((run / "report.json").read_text())["finetuning"] == report["finetuning"]


def test_seed_changes_the_corpus_and_a_run_keeps_its_seed(tmp_path, capsys):
    from vimpac.commands.demo import BUDGETS, DemoPaths, Stages, make_data
    from vimpac.errors import UsageError

    def corpus(seed: int, name: str) -> dict[str, np.ndarray]:
        paths = DemoPaths(tmp_path / name)
        paths.run.mkdir()
        stages = Stages(paths, "tiny", BUDGETS["tiny"], seed)
        stages.needed = lambda stage: stage == "synth"  # the corpus alone: no tokenizer, no databases
        make_data(paths, BUDGETS["tiny"], stages, "cpu", 1, seed)
        return {p.name: decoded(p) for p in sorted((paths.corpus / "videos").iterdir())}

    def decoded(path: Path) -> np.ndarray:
        with av.open(str(path)) as container:
            return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]).astype(np.float32)

    def gap(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.abs(a - b).mean()) if a.shape == b.shape else float("inf")

    # libx264's bytes vary run to run (even single-threaded), so the same seed is judged on decoded pixels: a
    # re-encode of the same frames moves them by a fraction of a level, a different scene by tens of levels.
    zero, again, one = corpus(0, "a"), corpus(0, "b"), corpus(1, "c")
    assert zero.keys() == again.keys() == one.keys()
    assert all(gap(zero[name], again[name]) < 1.0 for name in zero)
    assert all(gap(zero[name], one[name]) > 5.0 for name in zero)
    with pytest.raises(UsageError, match=r"seed 0.*--fresh.*seed 1"):
        Stages(DemoPaths(tmp_path / "a"), "tiny", BUDGETS["tiny"], 1)


def test_a_rank_count_that_does_not_split_the_batches_is_refused_before_any_work(tmp_path, capsys):
    from vimpac.cli import main

    assert main(["demo", "--out", str(tmp_path / "demo"), "--budget", "tiny", "--ranks", "3"]) == 2
    assert "--ranks 3: the tiny budget's batches (4 and 4 videos) must split evenly" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()
