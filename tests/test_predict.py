"""`vimpac predict` / `vimpac embed` / model.predict on real video files: the same numbers as the evaluation."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import REPO, environment, launcher
from tests.tokenizers import tiny_vqvae_dir
from tests.videos import write_video
from vimpac.checkpoint import export_weights
from vimpac.cli import main as cli_main
from vimpac.code_db import CodeDatabase
from vimpac.config import VimpacConfig
from vimpac.errors import UsageError
from vimpac.export_info import INFO_FILE, derive_info, inference_info
from vimpac.finetune_data import FinetuneTestClips
from vimpac.finetune_setup import evaluate_clips
from vimpac.inference import VideoPipeline, load_pipeline, video_files
from vimpac.modeling import VimpacForClassification
from vimpac.tokenization.extract import ExtractConfig, extract

CLASSES = ("jump", "run", "walk")
VIDEOS = {"a": (0, 20), "b": (1, 14), "c": (2, 9), "d": (0, 26)}  # id: (class, frames at 8 fps)
VIEWS = ["r32_top_f0", "r32_center_f0", "r32_bottom_f0"]


def tokenize_videos(root: Path, tokenizer: Path, out: Path, **settings) -> Path:
    """`vimpac tokenize` of the videos listed in root/{train,val}.txt: test views, 4 fps, 32 px."""
    cfg = ExtractConfig(
        videos=root / "videos",
        annotations=[root / "train.txt", root / "val.txt"],
        format="list",
        tokenizer=str(tokenizer),
        out=out,
        fps=4.0,
        frame_size=32,
        views="test",
        workers=1,
        encode_batch=64,
        progress=False,
        **settings,
    )
    assert extract(cfg).tokenized == len(VIDEOS)
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tiny tokenizer, 4 real .mp4 files tokenized by `vimpac tokenize` (list format, test views, 4 fps, 32 px),
    and a fine-tuning run directory (random classifier, exported) whose run_config.json names that database."""
    root = tmp_path_factory.mktemp("predict")
    tok = tiny_vqvae_dir(root / "tok")
    videos = root / "videos"
    videos.mkdir()
    for i, (vid, (_label, frames)) in enumerate(VIDEOS.items()):
        pixels = np.random.default_rng(i).integers(0, 256, size=(frames, 48, 64, 3), dtype=np.uint8)
        write_video(videos / f"{vid}.mp4", frames=pixels, fps=8)
    lines = "".join(f"{vid}.mp4 {CLASSES[label]}\n" for vid, (label, _) in VIDEOS.items())
    for split in ("train", "val"):
        (root / f"{split}.txt").write_text(lines)
    db = tokenize_videos(root, tok, root / "db")
    config = VimpacConfig(vocab_size=64, hidden_size=32, layers=1, heads=2, clip_len=2, grid=(4, 4), dropout=0.0)
    torch.manual_seed(0)
    model = VimpacForClassification(config, len(CLASSES))
    with torch.no_grad():  # the head starts at zero (uniform probabilities): give it weights that tell videos apart
        model.classifier.fc.weight.normal_(std=1.0)
    run = root / "ft"
    export_weights(model.state_dict(), config, run, producer="vimpac.finetune")
    args = {"data": str(db), "eval_data": str(db), "frame_rate": 2.0, "num_test_clips": 1, "last_test_clips": "1,2"}
    args["single_clip"] = "start"
    (run / "run_config.json").write_text(json.dumps({"args": args, "test_views": VIEWS}))
    return {"root": root, "tok": tok, "videos": videos, "db": db, "run": run}


def test_inference_info_is_derived_from_the_run_and_saved(setup):
    info = inference_info(setup["run"])
    assert info["tokenizer"]["path"] == str(setup["tok"]) and len(info["tokenizer"]["fingerprint"]) == 16
    assert (info["fps"], info["frame_rate"], info["frame_size"], info["clip_len"]) == (4.0, 2.0, 32, 2)
    assert info["views"] == VIEWS and info["num_clips"] == 2 and info["classes"] == list(CLASSES)
    assert json.loads((setup["run"] / "export" / INFO_FILE).read_text()) == info
    assert inference_info(setup["run"] / "export", overrides={"num_clips": 3})["num_clips"] == 3


def test_the_clip_rate_of_fine_tuning_carries_to_data_at_another_fps(setup, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(setup["run"] / "export", run / "export", ignore=shutil.ignore_patterns(INFO_FILE))
    args = {"data": str(setup["db"]), "frame_rate": None}
    for record, rate in (
        ({"test_views": VIEWS, "clip_rate": 4.0}, 4.0),  # fine-tuned at its database's own 4 fps
        ({"test_views": VIEWS}, 4.0),  # a run from before clip_rate was recorded: its training database's fps
        ({}, None),  # a pre-training run: each database at its own rate
    ):
        (run / "run_config.json").write_text(json.dumps({"args": args, **record}))
        assert derive_info(run / "export")["frame_rate"] == rate
    # K: the largest of the final evaluation, which runs at --num-test-clips and each --last-test-clips
    (run / "run_config.json").write_text(json.dumps({"args": {**args, "num_test_clips": 5, "last_test_clips": "2"}}))
    assert derive_info(run / "export")["num_clips"] == 5
    # An export moved away from its run directory keeps what it was trained and evaluated with, on any database.
    (run / "run_config.json").unlink()
    recorded = {**derive_info(run / "export", setup["db"]), "frame_rate": 2.0, "num_clips": 3, "single_clip": "start"}
    (run / "export" / INFO_FILE).write_text(json.dumps(recorded))
    info = inference_info(run / "export", data=setup["db"])
    assert (info["frame_rate"], info["num_clips"], info["single_clip"]) == (2.0, 3, "start")
    pipeline = load_pipeline(setup["run"])
    assert VideoPipeline(pipeline.model, {**pipeline.info, "fps": 8.0, "frame_rate": 4.0}).stride == 2
    with pytest.raises(UsageError, match=r"the model takes clips at 4 fps .*, the frames come at 2 fps"):
        VideoPipeline(pipeline.model, {**pipeline.info, "fps": 2.0, "frame_rate": 4.0})


def test_predict_equals_the_evaluation_of_a_database_of_the_same_files(setup, tmp_path):
    pipeline = load_pipeline(setup["run"], need_classifier=True)
    db = CodeDatabase(setup["db"])
    pad = pipeline.model.config.pad_id
    test_set = FinetuneTestClips(db, "val", 2, pad_id=pad, views=VIEWS, num_clips=2, frame_rate=2.0)
    model = VimpacForClassification(pipeline.model.config, len(CLASSES))
    model.load_state_dict(pipeline.model._model.state_dict())
    expected, _ = evaluate_clips(model, test_set, "cpu")
    got = torch.stack([pipeline.probabilities(setup["videos"] / f"{vid}.mp4") for vid in test_set.ids])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # K = 1: the clip at the video's start, as the run's --single-clip start evaluated it
    single = FinetuneTestClips(db, "val", 2, pad_id=pad, views=VIEWS, frame_rate=2.0, single_clip="start")
    expected_one, _ = evaluate_clips(model, single, "cpu")
    one = load_pipeline(setup["run"], overrides={"num_clips": 1})
    got_one = torch.stack([one.probabilities(setup["videos"] / f"{vid}.mp4") for vid in single.ids])
    torch.testing.assert_close(got_one, expected_one, rtol=1e-5, atol=1e-6)
    # the CLI, against `finetune.py --eval-only` on that database (2 clips, test views, --frame-rate 2)
    out = tmp_path / "eval"
    cmd = [*launcher("vimpac.finetune", 1), "--deepspeed_config", "ds_configs/cpu.json", "--precision", "fp32"]
    cmd += ["--zero-stage", "0", "--num-workers", "0", "--batch-size", "4", "--bs-per-gpu", "4"]
    cmd += ["--data", str(setup["db"]), "--load", str(setup["run"] / "export"), "--eval-only", "--frame-rate", "2"]
    cmd += ["--last-test-clips", "2", "--output", str(out)]
    result = subprocess.run(cmd, cwd=REPO, env=environment(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    evaluated = json.loads((out / "eval" / "eval_only_clips2.json").read_text())
    assert evaluated["views"] == VIEWS
    report = tmp_path / "p.json"
    assert cli_main(["predict", str(setup["videos"]), "--model", str(setup["run"]), "--json", str(report)]) == 0
    predictions = json.loads(report.read_text())["predictions"]
    assert len(predictions) == len(VIDEOS)
    for p in predictions:
        vid = Path(p["video"]).stem
        assert p["top"][0]["label"] == CLASSES[evaluated["predictions"][vid]]
        row = expected[test_set.ids.index(vid)]
        assert p["top"][0]["probability"] == pytest.approx(float(row.max()), rel=1e-5)
    probs = [t["probability"] for t in predictions[0]["top"]]
    assert len(probs) == 3 and probs == sorted(probs, reverse=True)


def test_bad_inputs_are_reported_and_the_others_go_on(setup, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.mp4").write_bytes(b"")
    data = (setup["videos"] / "d.mp4").read_bytes()
    (bad / "truncated.mp4").write_bytes(data[: len(data) // 2])
    (bad / "noise.mp4").write_bytes(os.urandom(5000))
    write_audio_only(bad / "audio.mp4")
    good = setup["videos"] / "a.mp4"
    files = [good, bad / "missing.mp4", *sorted(bad.iterdir())]
    out = tmp_path / "p.csv"
    assert cli_main(["predict", *map(str, files), "--model", str(setup["run"]), "--csv", str(out)]) == 1
    rows = list(csv.DictReader(out.open()))
    errors = {Path(r["video"]).name: r["error"] for r in rows if r["error"]}
    assert next(r["label"] for r in rows if Path(r["video"]) == good) in CLASSES
    assert "file not found" in errors["missing.mp4"] and "empty" in errors["empty.mp4"]
    assert "not a video" in errors["noise.mp4"] and "no video stream" in errors["audio.mp4"]
    assert re.match(r"(open|decode): ", errors["truncated.mp4"])
    err = capsys.readouterr().err
    assert "missing.mp4: cannot predict (open: file not found" in err
    # an export without a classifier, a tokenizer of another vocabulary
    config = VimpacConfig(vocab_size=64, hidden_size=32, layers=1, heads=2, clip_len=2, grid=(4, 4))
    from vimpac.modeling import VimpacBackbone

    pre = tmp_path / "pt"
    export_weights({f"backbone.{k}": v for k, v in VimpacBackbone(config).state_dict().items()}, config, pre)
    assert cli_main(["predict", str(good), "--model", str(pre), "--data", str(setup["db"])]) == 2
    assert "holds no classifier" in capsys.readouterr().err
    (pre / "export" / "model.safetensors").write_bytes(b"cut short")  # a damaged copy
    assert cli_main(["predict", str(good), "--model", str(pre), "--data", str(setup["db"])]) == 2
    assert "model.safetensors is damaged or incomplete" in capsys.readouterr().err
    other = tiny_vqvae_dir(tmp_path / "tok32", vocab_size=32)
    assert cli_main(["predict", str(good), "--model", str(setup["run"]), "--tokenizer", str(other)]) == 2
    assert "32 codes but the model was trained on a vocabulary of 64" in capsys.readouterr().err
    same_size = tiny_vqvae_dir(tmp_path / "tok64", vocab_size=64, seed=1)
    assert cli_main(["predict", str(good), "--model", str(setup["run"]), "--tokenizer", str(same_size)]) == 2
    assert "is not the one the model's code database was made with" in capsys.readouterr().err
    # settings no video could use are refused before any work
    assert cli_main(["predict", str(good), "--model", str(setup["run"]), "--views", "r32_centre_f0"]) == 2
    assert "--views: not a view name: 'r32_centre_f0'" in capsys.readouterr().err
    embed = ["embed", str(good), "--model", str(setup["run"]), "--out", str(tmp_path / "e")]
    assert cli_main([*embed, "--num-clips", "0"]) == 2
    assert "--num-clips must be >= 1" in capsys.readouterr().err and not (tmp_path / "e").exists()
    assert cli_main([*embed, "--frame-rate", "3"]) == 2  # the flag the frame-rate message names exists
    assert "--frame-rate 3.0 does not divide" in capsys.readouterr().err


def test_inputs_without_any_video_are_refused_before_anything_is_written(setup, tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "notes.txt").write_text("not a list of videos either\n")
    for command in (["predict"], ["embed", "--out", str(tmp_path / "emb")]):
        assert cli_main([*command, str(empty), "--model", str(setup["run"])]) == 2
        assert f"no video files in {empty} (folders are searched for .mp4 .webm" in capsys.readouterr().err
    assert not (tmp_path / "emb").exists()
    class_index = tmp_path / "classInd.txt"
    class_index.write_text("# a list that is no list of videos\n1 ApplyEyeMakeup\n2 ApplyLipstick\n")
    assert cli_main(["predict", str(class_index), "--model", str(setup["run"])]) == 2
    assert f"{class_index} line 2: '1 ApplyEyeMakeup' does not name a video file" in capsys.readouterr().err


def test_list_files_take_a_byte_order_mark_crlf_labels_and_spaces(tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_bytes(
        "\ufeffa/one.mp4\r\nClass/v_two.avi 7\r\n\r\n# note\r\nmy clip.MKV\r\n/abs/x.webm\r\n"
        "air drumming/y.mp4 3\r\n".encode()
    )
    assert video_files([listing]) == [
        tmp_path / "a" / "one.mp4",
        tmp_path / "Class" / "v_two.avi",
        tmp_path / "my clip.MKV",
        Path("/abs/x.webm"),
        tmp_path / "air drumming" / "y.mp4",
    ]


def write_audio_only(path: Path) -> None:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        for i in range(10):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), dtype=np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_embed_files_equals_embed_database_and_resumes(setup, tmp_path, capsys):
    files, from_db = tmp_path / "files", tmp_path / "db"
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{setup['videos'] / vid}.mp4\n" for vid in sorted(VIDEOS)[:2]))
    common = ["--model", str(setup["run"]), "--feature", "both", "--no-progress"]
    assert cli_main(["embed", str(listing), "--out", str(files), *common]) == 0
    assert len(np.load(files / "embeddings.npy")) == 2
    assert cli_main(["embed", str(setup["videos"]), "--out", str(files), *common]) == 0  # resumes: 2 new
    assert cli_main(["embed", "--db", str(setup["db"]), "--split", "val", "--out", str(from_db), *common]) == 0
    a, b = np.load(files / "embeddings.npy"), np.load(from_db / "embeddings.npy")
    assert a.dtype == np.float32 and a.shape == (4, 64)
    ids_a = [Path(r["video"]).stem for r in csv.DictReader((files / "index.csv").open())]
    ids_b = [r["id"] for r in csv.DictReader((from_db / "index.csv").open())]
    assert sorted(ids_a) == sorted(ids_b) == sorted(VIDEOS)
    order = [ids_a.index(i) for i in ids_b]
    np.testing.assert_allclose(a[order], b, rtol=1e-5, atol=1e-6)
    assert cli_main(["embed", str(setup["videos"]), "--out", str(files), *common[:2], "--feature", "cls"]) == 2
    assert "other settings (feature)" in capsys.readouterr().err
    assert cli_main(["embed", "--db", str(setup["db"]), "--split", "train", "--out", str(from_db), *common]) == 2
    assert "other settings (split)" in capsys.readouterr().err
    assert cli_main(["embed", str(setup["videos"]), "--out", str(files), *common, "--precision", "bf16"]) == 2
    assert "other settings (precision)" in capsys.readouterr().err  # rows in two precisions would mix
    recorded = json.loads((files / "settings.json").read_text())
    assert recorded.pop("precision") == "float32"
    (files / "settings.json").write_text(json.dumps(recorded))  # written before the precision was recorded
    assert cli_main(["embed", str(setup["videos"]), "--out", str(files), *common]) == 0
    per_clip = tmp_path / "clips"
    assert cli_main(["embed", "--db", str(setup["db"]), "--out", str(per_clip), *common, "--per-clip"]) == 0
    assert np.load(per_clip / "embeddings.npy").shape == (4, 6, 64)  # 3 views × 2 clips


def test_api_predict_and_embed_on_a_path_and_an_array(setup):
    import vimpac

    model = vimpac.load_model(setup["run"], tokenizer=setup["tok"])
    pipeline = load_pipeline(setup["run"])
    path = setup["videos"] / "a.mp4"
    top = model.predict(path, top_k=2)
    assert [n for n, _ in top] == [n for n, _ in pipeline.top_k(pipeline.probabilities(path), 2)]
    assert model.embed(path).shape == (32,) and model.embed(path, "both", per_clip=True).shape == (6, 64)
    frames = np.random.default_rng(0).integers(0, 256, size=(7, 48, 64, 3), dtype=np.uint8)
    assert len(model.predict(frames)) == 3 and model.embed(frames).dtype == np.float32


def test_readme_example_runs(setup, tmp_path, monkeypatch):
    text = (REPO / "README.md").read_text()
    section = text.split("## Use a trained model", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S)[1]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "ft").symlink_to(setup["run"])
    (tmp_path / "runs" / "tok").symlink_to(setup["tok"])
    (tmp_path / "clip.mp4").symlink_to(setup["videos"] / "a.mp4")
    exec(compile(code, "README.md", "exec"), {})


def test_streamed_codes_equal_one_video_at_a_time_in_input_order(setup, tmp_path):
    from vimpac.inference_stream import file_codes

    pipeline = load_pipeline(setup["run"])
    missing = tmp_path / "missing.mp4"
    paths = [setup["videos"] / f"{vid}.mp4" for vid in ("d", "a")]
    items = [(str(i), p) for i, p in enumerate([paths[0], missing, paths[1], paths[0], setup["videos"] / "c.mp4"])]
    alone = list(file_codes(pipeline, items, workers=0))
    streamed = list(file_codes(pipeline, items, workers=2))
    assert [(i, s) for i, s, _ in streamed] == [(i, str(p)) for i, p in items]  # input order, duplicates kept
    for (_, _, a), (_, _, b) in zip(alone, streamed):
        if isinstance(a, dict):
            assert b["stage"] == a["stage"] == "open" and "file not found" in b["reason"]
        else:
            assert len(a) == len(b) == len(VIEWS) and all(np.array_equal(x, y) for x, y in zip(a, b))
    assert np.array_equal(streamed[0][2][1], streamed[3][2][1])
    # Only the frames the evaluation clips read are encoded; they equal those of encoding every frame.
    every = list(file_codes(pipeline, items, workers=2, every_frame=True))
    skipped = 0
    for (_, _, planned), (_, _, full) in zip(streamed, every):
        if isinstance(full, dict):
            continue
        for a, b in zip(planned, full):
            read = pipeline.evaluation_frames(len(b))
            assert np.array_equal(a[read], b[read]) and (a[[i for i in range(len(b)) if i not in read]] == -1).all()
            skipped += len(b) - len(read)
    assert skipped > 0
    assert all(
        torch.equal(pipeline.clips(a), pipeline.clips(b))
        for (*_, a), (*_, b) in zip(streamed, every)
        if isinstance(a, list)
    )


@pytest.mark.parametrize("clips_per_forward", [1, 5, 64])
def test_batched_model_equals_one_video_at_a_time(setup, clips_per_forward):
    from vimpac.inference_stream import file_codes, run_videos

    pipeline = load_pipeline(setup["run"], clips_per_forward=clips_per_forward)
    items = [(vid, setup["videos"] / f"{vid}.mp4") for vid in sorted(VIDEOS)]
    results = list(run_videos(pipeline, file_codes(pipeline, items, workers=0), "probabilities"))
    features = list(run_videos(pipeline, file_codes(pipeline, items, workers=0), "features", "both", per_clip=True))
    assert [r.id for r in results] == [r.id for r in features] == sorted(VIDEOS)
    for (_, path), result, feature in zip(items, results, features):
        tokens = pipeline.tokens(path)
        torch.testing.assert_close(result.probabilities, pipeline.probabilities_of(tokens), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(feature.features, pipeline.features_of(tokens, "both", True), rtol=1e-5, atol=1e-5)
        assert feature.features.shape == (6, 64) and result.failure is None


def test_precision_is_checked_and_bf16_agrees_with_fp32(setup):
    from vimpac.errors import UsageError

    with pytest.raises(UsageError, match="fp16 needs a CUDA device"):
        load_pipeline(setup["run"], device="cpu", precision="fp16")
    with pytest.raises(UsageError, match="--precision must be one of"):
        load_pipeline(setup["run"], device="cpu", precision="half")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no CUDA device is visible here"):
            load_pipeline(setup["run"], device="cuda")
    fp32 = load_pipeline(setup["run"], device="cpu")
    bf16 = load_pipeline(setup["run"], device="cpu", precision="bf16")
    assert fp32.dtype == torch.float32 and bf16.dtype == torch.bfloat16
    tokens = fp32.tokens(setup["videos"] / "a.mp4")
    a, b = fp32.probabilities_of(tokens), bf16.probabilities_of(tokens)
    assert b.dtype == torch.float32 and int(a.argmax()) == int(b.argmax())
    torch.testing.assert_close(b, a, rtol=0, atol=0.05)
    assert not torch.equal(a, b)  # bf16 really ran


def test_predict_resumes_json_and_csv_outputs(setup, tmp_path, capsys):
    videos = [str(setup["videos"] / f"{vid}.mp4") for vid in sorted(VIDEOS)]
    common = ["--model", str(setup["run"]), "--top-k", "2", "--no-progress"]
    report = tmp_path / "p.json"
    assert cli_main(["predict", *videos[:2], *common, "--json", str(report)]) == 0
    first = json.loads(report.read_text())
    assert [p["video"] for p in first["predictions"]] == videos[:2] and first["settings"]["top_k"] == 2
    capsys.readouterr()
    assert cli_main(["predict", str(setup["videos"]), str(tmp_path / "gone.mp4"), *common, "--json", str(report)]) == 1
    out = capsys.readouterr()
    assert "2 of 5 videos are in the output already; 3 to do" in out.out and "2 predicted, 1 failed" in out.err
    second = json.loads(report.read_text())
    assert second["predictions"][:2] == first["predictions"]
    assert [p["video"] for p in second["predictions"]] == videos and len(second["failures"]) == 1
    assert cli_main(["predict", *videos, *common, "--json", str(report)]) == 0  # nothing left to do
    assert "5 of 4" not in capsys.readouterr().out and json.loads(report.read_text()) == second
    assert cli_main(["predict", *videos, "--model", str(setup["run"]), "--json", str(report)]) == 2
    assert "other settings (top_k)" in capsys.readouterr().err
    # CSV: a run stopped after its first video (rows written as each video is done) picks up from there
    table = tmp_path / "new" / "dir" / "p.csv"  # folders are made
    assert cli_main(["predict", videos[0], *common, "--csv", str(table)]) == 0
    assert cli_main(["predict", *videos, *common, "--csv", str(table)]) == 0
    rows = list(csv.DictReader(table.open()))
    assert [r["video"] for r in rows] == [v for v in videos for _ in range(2)]
    assert [r["rank"] for r in rows] == ["1", "2"] * len(videos)
    assert cli_main(["predict", *videos, *common, "--csv", str(table)]) == 0  # nothing left to do
    assert json.loads((table.parent / "p.csv.settings.json").read_text())["top_k"] == 2

    # A write cut short (a kill, a full disk) leaves the last video's second row torn, or missing: that video is
    # predicted again, its rows whole, nothing glued to a broken line.
    def whole(path):
        return sorted((r["video"], r["rank"], r["label"], r["probability"]) for r in csv.DictReader(path.open()))

    lines = table.read_text().splitlines(keepends=True)
    for cut in ([*lines[:8], lines[8][:9]], lines[:8]):
        table.write_text("".join(cut))
        capsys.readouterr()
        assert cli_main(["predict", *videos, *common, "--csv", str(table)]) == 0
        assert "1 video(s) without all their rows (an interrupted write)" in capsys.readouterr().out
        assert whole(table) == sorted((r["video"], r["rank"], r["label"], r["probability"]) for r in rows)
    settings = table.with_name("p.csv.settings.json")
    recorded = settings.read_text()
    settings.unlink()  # a CSV from before settings were kept, written with --top-k 2, read with 3 ranks
    assert cli_main(["predict", *videos, "--model", str(setup["run"]), "--top-k", "3", "--csv", str(table)]) == 2
    assert "has rows of ranks ['1', '2'], not 1..3 (--top-k 3)" in capsys.readouterr().err
    assert whole(table) == sorted((r["video"], r["rank"], r["label"], r["probability"]) for r in rows)
    settings.write_text(recorded)
    assert cli_main(["predict", *videos, "--model", str(setup["run"]), "--csv", str(table)]) == 2
    assert "other settings (top_k" in capsys.readouterr().err
    assert len(list(csv.DictReader(table.open()))) == len(rows)
    # Only failures left to do, after earlier predictions: some failed (1), not "nothing could be predicted" (2).
    gone = str(tmp_path / "gone.mp4")
    assert cli_main(["predict", *videos, gone, *common, "--csv", str(table)]) == 1
    assert cli_main(["predict", gone, *common, "--csv", str(tmp_path / "none.csv")]) == 2
    (tmp_path / "other.csv").write_text("a,b\n")
    assert cli_main(["predict", *videos, *common, "--csv", str(tmp_path / "other.csv")]) == 2
    assert "not a predictions CSV" in capsys.readouterr().err


def test_outputs_know_the_model_by_its_weights_not_its_path(setup, tmp_path, capsys):
    video = str(setup["videos"] / "a.mp4")
    moved = tmp_path / "moved"
    shutil.copytree(setup["run"], moved)
    report = tmp_path / "p.json"
    assert cli_main(["predict", video, "--model", str(moved), "--json", str(report), "--no-progress"]) == 0
    relative = os.path.relpath(moved / "export")  # the same weights, spelt another way
    assert cli_main(["predict", video, "--model", relative, "--json", str(report), "--no-progress"]) == 0
    from safetensors.torch import load_file, save_file

    weights = moved / "export" / "model.safetensors"
    tensors = load_file(str(weights))
    tensors["classifier.fc.weight"] = -tensors["classifier.fc.weight"]
    save_file(tensors, str(weights), metadata={"format": "pt"})
    capsys.readouterr()
    assert cli_main(["predict", video, "--model", str(moved), "--json", str(report), "--no-progress"]) == 2
    assert "other settings (weights)" in capsys.readouterr().err
    old = json.loads(report.read_text())
    del old["settings"]["weights"]  # an output written before the weights were recorded: known by the path
    report.write_text(json.dumps(old))
    assert cli_main(["predict", video, "--model", relative, "--json", str(report), "--no-progress"]) == 0


def test_predict_refuses_what_no_video_could_use_before_any_work(setup, tmp_path, capsys):
    video = str(setup["videos"] / "a.mp4")
    common = ["--model", str(setup["run"]), "--no-progress"]
    for device in ("gpu", "mps", "cpu:1", "cuda:x"):
        assert cli_main(["predict", video, *common, "--device", device]) == 2
        assert f"--device must be cpu or cuda[:N]; got '{device}'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli_main(["predict", video, *common, "--device", "cuda:3"]) == 2
        assert "no CUDA device is visible here" in capsys.readouterr().err
    assert cli_main(["predict", video, *common, "--views", "r16_center_f0", "--csv", str(tmp_path / "v.csv")]) == 2
    assert "resize the shorter side below the crop size 32" in capsys.readouterr().err
    assert not (tmp_path / "v.csv").exists()
    assert cli_main(["predict", video, *common, "--csv", str(tmp_path)]) == 2
    assert f"--csv {tmp_path} is a folder" in capsys.readouterr().err
    # a --data database of another class list, or made by another tokenizer than the model was trained on
    other = tmp_path / "db4"
    shutil.copytree(setup["db"], other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["classes"] = [*CLASSES, "swim"]
    (other / "manifest.json").write_text(json.dumps(manifest))
    assert cli_main(["predict", video, *common, "--data", str(other)]) == 2
    assert "name 4 classes but the model's classifier has 3" in capsys.readouterr().err
    from vimpac.tokenization.tokenizer import fingerprint

    trained = tmp_path / "trained"
    config = VimpacConfig.load(setup["run"] / "export" / "config.json")
    state = VimpacForClassification(config, len(CLASSES)).state_dict()
    export_weights(state, config, trained, producer="vimpac.finetune", tokenizer=fingerprint(setup["tok"]))
    shutil.copy(setup["run"] / "run_config.json", trained)
    assert cli_main(["predict", video, "--model", str(trained), "--no-progress"]) == 0
    made_by_other = tmp_path / "db_other"
    shutil.copytree(setup["db"], made_by_other)
    tok2 = tiny_vqvae_dir(tmp_path / "tok2", vocab_size=64, seed=1)
    manifest = json.loads((made_by_other / "manifest.json").read_text())
    manifest["tokenizer"]["fingerprint"], manifest["args"]["tokenizer"] = fingerprint(tok2), str(tok2)
    (made_by_other / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert cli_main(["predict", video, "--model", str(trained), "--data", str(made_by_other)]) == 2
    assert "is not the one the model was trained on" in capsys.readouterr().err
    embed = ["embed", video, "--model", str(trained), "--data", str(made_by_other), "--out", str(tmp_path / "e")]
    assert cli_main(embed) == 2


def test_a_video_named_twice_is_done_once(setup, tmp_path):
    a = setup["videos"] / "a.mp4"
    listing = tmp_path / "l.txt"
    listing.write_text(f"{a}\n{a}\n")
    assert video_files([setup["videos"], a, listing]) == sorted(setup["videos"].glob("*.mp4"))
    table = tmp_path / "p.csv"
    for _ in range(2):  # and so the output resumes
        assert cli_main(["predict", str(a), str(listing), "--model", str(setup["run"]), "--csv", str(table)]) == 0
    assert [r["rank"] for r in csv.DictReader(table.open())] == ["1", "2", "3"]


def test_embed_resumes_after_a_torn_index_line(setup, tmp_path):
    out = tmp_path / "e"
    videos = [str(setup["videos"] / f"{vid}.mp4") for vid in sorted(VIDEOS)]
    common = ["--model", str(setup["run"]), "--out", str(out), "--no-progress"]
    assert cli_main(["embed", *videos, *common]) == 0
    whole = np.load(out / "embeddings.npy")
    index = (out / "index.csv").read_bytes()
    (out / "index.csv").write_bytes(index[:-5])  # the last row cut short, its embedding already written
    with (out / "failures.jsonl").open("w") as f:
        f.write('{"id": "x", "sta')  # a failure record cut short: x is tried again
    assert cli_main(["embed", *videos, *common]) == 0
    assert (out / "index.csv").read_bytes() == index and (out / "failures.jsonl").read_text() == ""
    np.testing.assert_allclose(np.load(out / "embeddings.npy"), whole, rtol=1e-6, atol=1e-7)


def test_frame_selection_of_the_database_is_used_for_video_files(setup, tmp_path):
    """A model evaluated on a database made with `--frame-selection ffmpeg` (the original release's extraction)
    decodes video files the same way."""
    db = tokenize_videos(setup["root"], setup["tok"], tmp_path / "db_ffmpeg", frame_selection="ffmpeg")
    ffmpeg = load_pipeline(setup["run"], data=db)
    assert ffmpeg.frame_selection == "ffmpeg" and load_pipeline(setup["run"]).frame_selection == "vimpac"
    codes_db = CodeDatabase(db)
    path = setup["videos"] / "d.mp4"
    got = ffmpeg.codes(path)
    for view, codes in zip(VIEWS, got):
        assert np.array_equal(codes, codes_db.read("d", view)[0])
    assert any(not np.array_equal(a, b) for a, b in zip(got, load_pipeline(setup["run"]).codes(path)))
