"""`vimpac visualize` and vimpac.visualize: the three picture rows pixel by pixel, prediction with an oracle model,
the grid / GIF / curves files written by the command on a tiny run directory, and its errors."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence

from tests.synthetic_codes import video_codes
from tests.tokenizers import tiny_vqvae_dir
from vimpac.checkpoint import export_weights
from vimpac.cli import main
from vimpac.code_db import CodeDatabaseWriter
from vimpac.config import VimpacConfig
from vimpac.errors import UsageError
from vimpac.masking import IGNORE_INDEX, mask_blocks
from vimpac.modeling import VimpacForPretraining
from vimpac.tokenization.tokenizer import load_tokenizer
from vimpac.visualize import (
    GAP,
    MASK_GREY,
    OUTLINE_COLOUR,
    PAD_COLOUR,
    cell_pixels,
    clip_rows,
    label_column_width,
    outline_pixels,
    plot_curves,
    predict_masked,
    retrieval_captions,
    retrieval_picture,
    text_size,
    upscale_factor,
    write_gif,
    write_grid_png,
)

VOCAB, GRID, CLIP_LEN, FPS = 64, (4, 4), 5, 4
VIEWS = ["r32_top_f0", "r32_center_f0", "r32_bottom_f0"]
IDS = [f"video{i}" for i in range(3)]
FRAMES = 12


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A demo-shaped run directory: tokenizer, a labeled test database made with it, a random pre-trained model
    exported with its run_config.json, and metrics of a pre-training and a fine-tuning run."""
    run = tmp_path_factory.mktemp("run")
    tiny_vqvae_dir(run / "tokenizer", vocab_size=VOCAB)
    tokenizer = load_tokenizer(run / "tokenizer")
    manifest = {
        "dataset": "synthetic",
        "fps": FPS,
        "frame_size": GRID[0] * 8,
        "grid": list(GRID),
        "tokenizer": {"name": tokenizer.name, "vocab_size": VOCAB, "fingerprint": tokenizer.fingerprint},
        "views": VIEWS,
        "classes": ["a", "b"],
    }
    rng = np.random.default_rng(0)
    with CodeDatabaseWriter(run / "codes" / "labeled_test", manifest) as writer:
        for i, video_id in enumerate(IDS):
            codes = {view: video_codes(rng, FRAMES, GRID, VOCAB) for view in VIEWS}
            writer.add(video_id, codes, label=i % 2, duration=FRAMES / FPS, fps=float(FPS))
        writer.finalize({"test": IDS})

    torch.manual_seed(0)
    config = VimpacConfig(
        vocab_size=VOCAB, hidden_size=32, heads=2, layers=1, clip_len=CLIP_LEN, grid=GRID, nce_proj_hid_dim=16
    )
    export_weights(VimpacForPretraining(config).state_dict(), config, run / "pretrain")
    args = {"mask_blocks": 3, "frame_rate": 2.0}
    (run / "pretrain" / "run_config.json").write_text(json.dumps({"args": args}))
    write_metrics(
        run / "pretrain", [{"loss/mlm": 4 - s / 10, "loss/nce": 2.0, "accuracy/mlm": s / 20} for s in range(5)]
    )
    write_metrics(
        run / "finetune_pretrained",
        [{"loss/train": 1 - s / 10, **({"eval/top1_clips1": 0.5} if s == 4 else {})} for s in range(5)],
    )
    return run


def write_metrics(run: Path, records: list[dict]) -> None:
    run.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"step": step + 1, "epoch": 0, **record}) for step, record in enumerate(records)]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def tokenizer(run_dir):
    return load_tokenizer(run_dir / "tokenizer")


def random_clip(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens with a PAD frame at the end, block mask, random predictions) of shape [T, 4, 4]."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB, size=(CLIP_LEN, *GRID))
    tokens[-1] = VOCAB  # the compact PAD id
    _, labels = mask_blocks(tokens, 4, rng, pad_id=VOCAB, mask_id=VOCAB + 1, vocab_size=VOCAB)
    return tokens, labels != IGNORE_INDEX, rng.integers(0, VOCAB, size=tokens.shape)


def test_clip_rows_pixels(tokenizer):
    tokens, masked, predicted = random_clip()
    assert masked.any() and not masked[-1].any()
    rows = clip_rows(tokenizer, tokens, masked, predicted)
    d = tokenizer.downsample
    shape = (CLIP_LEN, GRID[0] * d, GRID[1] * d, 3)
    assert list(rows) == ["reconstruction", "masked", "prediction"]
    assert all(frames.shape == shape and frames.dtype == np.uint8 for frames in rows.values())

    pad = tokens >= VOCAB
    visible = np.where(pad, 0, tokens)
    reference = tokenizer.decode(visible)
    pad_px = cell_pixels(pad, d)
    assert (rows["reconstruction"][pad_px] == PAD_COLOUR).all()
    np.testing.assert_array_equal(rows["reconstruction"][~pad_px], reference[~pad_px])

    masked_px = cell_pixels(masked, d)
    assert (rows["masked"][masked_px] == MASK_GREY).all()
    np.testing.assert_array_equal(rows["masked"][~masked_px], rows["reconstruction"][~masked_px])

    filled = tokenizer.decode(np.where(masked, predicted, visible))
    outline = outline_pixels(masked, d)
    assert outline.any() and (outline <= masked_px).all()
    assert (rows["prediction"][outline] == OUTLINE_COLOUR).all()
    keep = ~outline & ~pad_px
    np.testing.assert_array_equal(rows["prediction"][keep], filled[keep])
    assert (rows["prediction"][pad_px] == PAD_COLOUR).all()


def test_outline_is_the_region_border():
    cells = np.zeros((1, 3, 3), dtype=bool)
    cells[0, :2, :2] = True  # one 2×2 block of 4×4-px cells: an 8×8 square whose border has 28 pixels
    outline = outline_pixels(cells, 4)
    assert outline.sum() == 28
    assert outline[0, 0, :8].all() and outline[0, 7, :8].all() and not outline[0, 1:7, 1:7].any()


class Oracle(torch.nn.Module):
    """Returns logits peaked at the true code, and an even larger one at the PAD row that must be ignored."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, tokens: torch.Tensor, mlm_labels: torch.Tensor) -> dict[str, torch.Tensor]:
        labels = mlm_labels.flatten()
        positions = (labels != IGNORE_INDEX).nonzero().flatten()
        logits = torch.zeros(len(positions), VOCAB + 2)
        logits[torch.arange(len(positions)), labels[positions]] = 1e4
        logits[:, VOCAB] = 1e5
        return {"mlm_logits": logits, "mlm_positions": positions}


def test_predict_masked_with_an_oracle_reproduces_the_clip():
    tokens, _, _ = random_clip(1)
    inputs, labels = mask_blocks(tokens, 4, np.random.default_rng(1), VOCAB, VOCAB + 1, VOCAB)
    assert (inputs == VOCAB + 1).any()
    oracle = Oracle().train()
    predicted = predict_masked(oracle, inputs, labels, VOCAB)
    np.testing.assert_array_equal(predicted, tokens)
    assert oracle.training  # its mode is restored


def test_predict_masked_with_a_real_model_changes_only_masked_positions(run_dir):
    from vimpac.finetune_setup import load_exported

    config, state = load_exported(run_dir / "pretrain")
    model = VimpacForPretraining(config)
    model.load_state_dict(state)
    tokens, _, _ = random_clip(2)
    inputs, labels = mask_blocks(tokens, 4, np.random.default_rng(2), config.pad_id, config.mask_id, VOCAB)
    predicted = predict_masked(model, inputs, labels, VOCAB)
    masked = labels != IGNORE_INDEX
    np.testing.assert_array_equal(predicted[~masked], tokens[~masked])
    assert ((predicted[masked] >= 0) & (predicted[masked] < VOCAB)).all()


def grid_size(rows: int, frames: int, height: int, width: int, names: list[str] | None) -> tuple[int, int]:
    s = upscale_factor(height)
    left = GAP + (label_column_width(names) + GAP if names else 0)
    return left + frames * (s * width + GAP), GAP + rows * (s * height + GAP)


def test_grid_png_and_gif_files(tmp_path, tokenizer):
    rows = clip_rows(tokenizer, *random_clip())
    assert upscale_factor(32) == 3 and upscale_factor(96) == 1 and upscale_factor(200) == 1
    write_grid_png(rows, tmp_path / "plain.png", labels=False)
    with Image.open(tmp_path / "plain.png") as image:
        assert image.size == grid_size(3, CLIP_LEN, 32, 32, None) == (2 + 5 * 98, 2 + 3 * 98)
        # cell (row 1 = masked, frame 0) enlarged ×3 by nearest neighbour
        cell = np.asarray(image.convert("RGB"))[2 + 98 : 2 + 98 + 96, 2 : 2 + 96]
        np.testing.assert_array_equal(cell, rows["masked"][0].repeat(3, axis=0).repeat(3, axis=1))
    write_gif(rows, tmp_path / "clip.gif", fps=4)
    with Image.open(tmp_path / "clip.gif") as gif:
        assert sum(1 for _ in ImageSequence.Iterator(gif)) == CLIP_LEN
        assert gif.info["duration"] == 250 and gif.info["loop"] == 0


def test_plot_curves_skips_runs_without_metrics(tmp_path, run_dir, capsys):
    runs = {"pretrain": run_dir / "pretrain", "finetune": run_dir / "finetune_pretrained", "none": tmp_path}
    assert plot_curves(runs, tmp_path / "curves.png") == ["pretrain", "finetune"]
    assert "skipping none" in capsys.readouterr().err
    with Image.open(tmp_path / "curves.png") as image:
        assert image.format == "PNG" and image.size[0] > 300
    with pytest.raises(UsageError, match="no training metrics"):
        plot_curves({"none": tmp_path}, tmp_path / "nothing.png")


def test_command_writes_pictures(run_dir, tmp_path, capsys):
    out = tmp_path / "pictures"
    assert main(["visualize", "--run", str(run_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "view r32_center_f0" in printed  # the centre view by default
    # run_config's frame_rate 2 at 4 fps: stride 2; delta = 12 + 1 - 10 = 3, centred start 1
    assert "frames 1..9 every 2" in printed
    assert "masked-token accuracy on this clip:" in printed
    for name in (f"{IDS[0]}.png", f"{IDS[0]}.gif", "curves.png"):
        assert str(out / name) in printed
    with Image.open(out / f"{IDS[0]}.png") as image:
        assert image.size == grid_size(3, CLIP_LEN, 32, 32, ["reconstruction", "masked", "prediction"])
    with Image.open(out / f"{IDS[0]}.gif") as gif:
        assert sum(1 for _ in ImageSequence.Iterator(gif)) == CLIP_LEN
    with Image.open(out / "curves.png") as image:
        image.load()

    assert main(["visualize", "--run", str(run_dir), "--list"]) == 0
    assert capsys.readouterr().out.split() == IDS


def test_command_options(run_dir, tmp_path, capsys):
    args = ["visualize", "--run", str(run_dir), "--out", str(tmp_path), "--no-curves", "--video", IDS[2]]
    assert main([*args, "--view", "r32_top_f0", "--start", "10", "--frame-rate", "4", "--mask-blocks", "2"]) == 0
    printed = capsys.readouterr().out
    assert "view r32_top_f0, frames 10..14 every 1" in printed and "(2 blocks, seed 0)" in printed
    assert not (tmp_path / "curves.png").exists()
    with Image.open(tmp_path / f"{IDS[2]}.gif") as gif:
        assert sum(1 for _ in ImageSequence.Iterator(gif)) == CLIP_LEN


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--video", "nope"], "valid ids include video0, video1, video2"),
        (["--view", "r64_center_f0"], "its views: r32_top_f0"),
        (["--frame-rate", "3"], "does not divide"),
        (["--model", "missing"], "--model missing"),
        (["--fps", "0"], "--fps must be positive"),
    ],
)
def test_command_errors(run_dir, tmp_path, capsys, extra, message):
    assert main(["visualize", "--run", str(run_dir), "--out", str(tmp_path / "out"), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_vocabulary_mismatch_names_the_sizes(run_dir, tmp_path, capsys):
    tiny_vqvae_dir(tmp_path / "tok32", vocab_size=32)
    assert main(["visualize", "--run", str(run_dir), "--tokenizer", str(tmp_path / "tok32")]) == 2
    err = capsys.readouterr().err
    assert "has 64 codes" in err and "has 32 codes" in err


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit):
        main(["visualize", "--help"])
    text = capsys.readouterr().out
    assert "examples:" in text and "--mask-blocks" in text


def test_retrieval_picture_size_borders_and_captions():
    rng = np.random.default_rng(0)
    q, k, f, h, w = 3, 3, 3, 32, 40
    queries = rng.integers(0, 256, size=(q, f, h, w, 3), dtype=np.uint8)
    neighbours = rng.integers(0, 256, size=(q, k, f, h, w, 3), dtype=np.uint8)
    query_labels = np.array([0, 1, 2])
    neighbour_labels = np.array([[0, 1, 0], [2, 1, 1], [2, 2, 2]])
    similarities = np.array([[0.9, 0.8, 0.7], [0.95, 0.5, 0.25], [0.3, 0.2, 0.1]])
    names = ["right", "left", "shrink"]
    image = retrieval_picture(queries, neighbours, query_labels, neighbour_labels, similarities, names)
    captions, neighbour_captions = retrieval_captions(query_labels, neighbour_labels, similarities, names)
    assert captions[1] == "query: left" and neighbour_captions[1][0] == "#1 shrink 0.950 other"
    assert neighbour_captions[1][1] == "#2 left 0.500 same"
    # s = 3 (32 px → 96); tile = 3 frames of 120 px, GAP apart, in a 3-px border
    tile_w, tile_h = 3 * (120 + GAP) - GAP + 2 * 3, 96 + 2 * 3
    widest = max(text_size(t)[0] for t in [*captions, *(c for row in neighbour_captions for c in row)])
    column = max(tile_w, widest + 2 * 4)
    line = text_size("Ag|")[1] + 2 * 4
    assert image.size == (GAP + 4 * (column + GAP) + 12, GAP + 3 * (tile_h + line + GAP))
    pixels = np.asarray(image)
    # the top-left pixel of each tile's border: grey query, green same class, red another class
    x0 = [GAP] + [GAP + n * (column + GAP) + 12 for n in (1, 2, 3)]
    y0 = [GAP + r * (tile_h + line + GAP) for r in range(3)]
    assert tuple(pixels[y0[0], x0[0]]) == (96, 96, 96)
    assert tuple(pixels[y0[0], x0[1]]) == (0, 160, 0) and tuple(pixels[y0[0], x0[2]]) == (220, 0, 0)
    assert tuple(pixels[y0[1], x0[1]]) == (220, 0, 0) and tuple(pixels[y0[2], x0[3]]) == (0, 160, 0)
    # the second query frame, enlarged ×3 (nearest), inside the border
    cell = pixels[y0[1] + 3 : y0[1] + 3 + 96, x0[0] + 3 + 120 + GAP : x0[0] + 3 + 2 * 120 + GAP]
    np.testing.assert_array_equal(cell, queries[1, 1].repeat(3, axis=0).repeat(3, axis=1))

    titled = retrieval_picture(queries, neighbours, query_labels, neighbour_labels, similarities, names, title="t")
    assert titled.size == (image.width, image.height + line)
    with pytest.raises(ValueError, match="neighbours must be"):
        retrieval_picture(queries, neighbours[:, :, :2], query_labels, neighbour_labels, similarities, names)
