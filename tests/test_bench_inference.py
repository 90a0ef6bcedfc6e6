"""scripts/bench/inference_throughput.py at its smallest: the export it makes is one `vimpac predict` accepts, and
the JSON's figures are consistent with each other. No timing is asserted."""

import json

import pytest

from tests.helpers import REPO, loaded_script

SCRIPT = REPO / "scripts" / "bench" / "inference_throughput.py"


@pytest.fixture(scope="module")
def bench():
    yield from loaded_script(SCRIPT, "bench_inference_throughput")


def test_made_export_has_the_demo_default_sizes(bench, tmp_path):
    from vimpac.inference import load_pipeline

    budget = bench.BUDGETS["default"]
    pipeline = load_pipeline(bench.make_export(tmp_path, seed=0), need_classifier=True)
    config = pipeline.model.config
    assert (config.layers, config.hidden_size, config.clip_len) == (budget.layers, budget.hid_dim, budget.clip_len)
    assert pipeline.tokenizer.vocab_size == config.vocab_size == budget.vocab_size  # fingerprint checked on load
    assert pipeline.frame_size == budget.frame_size and pipeline.num_clips == 3
    assert pipeline.classes == list(budget.classes)


def test_made_export_has_the_long_budget_sizes(bench, tmp_path):
    from vimpac.inference import load_pipeline

    budget = bench.BUDGETS["long"]
    pipeline = load_pipeline(bench.make_export(tmp_path, seed=0, budget_name="long"), need_classifier=True)
    assert (pipeline.model.config.hidden_size, pipeline.frame_size, pipeline.num_clips) == (256, 128, 5)
    assert len(pipeline.classes) == 16 and pipeline.model.num_classes == 16 and budget.classes is None


@pytest.mark.slow
def test_two_videos_write_consistent_json(bench, tmp_path):
    out = tmp_path / "bench.json"
    argv = ["--videos", "2", "--repeats", "2", "--workers", "2", "--json", str(out), "--note", "smoke"]
    payload = bench.main(argv)
    assert json.loads(out.read_text()) == json.loads(json.dumps(payload))
    assert payload["note"] == "smoke" and payload["machine"]["cpu_count"] and "git_commit" in payload
    assert payload["precision"] == "float32"
    frames = payload["decode_only"]["frames"]
    assert frames > 0
    for way in ("streamed", "one_at_a_time"):
        for name in ("predict", "embed"):
            row = payload[way][name]
            assert row["videos"] == 2 and row["frames"] == frames and row["clips"] == 6  # 1 view × K = 3 each
            assert row["videos_per_s"] == pytest.approx(2 / row["seconds"])
            assert len(row["repeats_videos_per_s"]) == 2 and row["videos_per_s"] == min(row["repeats_videos_per_s"])
    assert payload["streamed"]["predict"]["workers"] == 2 and payload["streamed"]["embed"]["failed"] == 0
    row = payload["one_at_a_time"]["predict"]
    assert 0 < row["tokens_seconds"] + row["model_seconds"] <= row["seconds"]


def test_seconds_makes_long_videos(bench, tmp_path):
    from vimpac.tokenization.decode import probe

    folder = bench.make_corpus(tmp_path, videos=2, seed=0, seconds=3.0)
    videos = sorted(folder.iterdir())
    assert len(videos) == 2 and all(probe(v).duration == pytest.approx(3.0, abs=0.2) for v in videos)
