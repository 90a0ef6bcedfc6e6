"""scripts/bench/transfer.py's bookkeeping: label budgets, the mean ± std table over seeds, the probe table and the
plot, on hand-made rows (the runs themselves are the demo's, tested in test_demo.py)."""

import pytest
from PIL import Image

from tests.helpers import REPO, loaded_script

SCRIPT = REPO / "scripts" / "bench" / "transfer.py"


@pytest.fixture(scope="module")
def bench():
    yield from loaded_script(SCRIPT, "bench_transfer")


def probe_json(linear: float, knn: float) -> dict:
    feature = {"linear": {"accuracy": linear, "weight_decay": 1e-3}, "knn": knn}
    return {"results": {"pretrained": {"cls": feature, "mean": feature}, "random": {"cls": feature, "mean": feature}}}


ROWS = [
    {"seed": 0, "variant": "mlm+cl", "labels": "4", "top1": 0.5},
    {"seed": 1, "variant": "mlm+cl", "labels": "4", "top1": 0.7},
    {"seed": 0, "variant": "scratch", "labels": "4", "top1": 0.2},
    {"seed": 1, "variant": "scratch", "labels": "4", "top1": 0.2},
    {"seed": 0, "variant": "mlm+cl", "labels": "all", "top1": 0.9},
    {"seed": 0, "variant": "mlm+cl", "probe": probe_json(0.6, 0.4)},
    {"seed": 1, "variant": "mlm+cl", "probe": probe_json(0.8, 0.4)},
]


def test_label_budgets_parse_and_reject_nonsense(bench):
    assert bench.parse_labels(["2", "all"]) == [2, None]
    assert [bench.label_name(n) for n in (2, None)] == ["2", "all"]
    for bad in ("0", "-1", "many"):
        with pytest.raises(SystemExit, match="neither a positive count nor 'all'"):
            bench.parse_labels([bad])


def test_table_holds_mean_and_std_over_seeds(bench):
    table = bench.markdown(ROWS, [4, None], ["mlm+cl", "scratch"], chance=1 / 6)
    assert "| mlm+cl | 0.600 ± 0.141 | 0.900 |" in table  # std of (0.5, 0.7) with n − 1
    assert "| scratch | 0.200 ± 0.000 | — |" in table
    assert "chance 0.167" in table
    # probe table: one column per (model, classifier, feature), e.g. the pre-trained linear probe on CLS
    lines = table.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| pre-training"))
    column = lines[start].split(" | ").index("pretrained linear cls")
    row = next(line for line in lines[start:] if line.startswith("| mlm+cl"))
    assert row.split(" | ")[column] == "0.700 ± 0.141"
    assert row.split(" | ")[lines[start].split(" | ").index("random knn mean")] == "0.400 ± 0.000"


def test_plot_is_written(bench, tmp_path):
    bench.plot(ROWS, [4, None], ["mlm+cl", "scratch"], 1 / 6, tmp_path / "t.png")
    with Image.open(tmp_path / "t.png") as png:
        assert png.format == "PNG" and png.width > 0


def test_scratch_at_its_own_learning_rate_is_its_own_row(bench):
    import argparse

    assert bench.scratch_name(None) == "scratch" and bench.scratch_name(3e-4) == "scratch (lr 0.0003)"
    args = argparse.Namespace(variants=["mlm+cl", "scratch"], scratch_lr=3e-4)
    assert bench.shown_variants(args) == ["mlm+cl", "scratch (lr 0.0003)"]
    rows = [{"seed": 0, "variant": "scratch (lr 0.0003)", "labels": "all", "top1": 0.6}]
    assert "| scratch (lr 0.0003) | 0.600 |" in bench.markdown(rows, [None], bench.shown_variants(args), 1 / 6)
