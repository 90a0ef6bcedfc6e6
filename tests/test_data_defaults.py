"""--vocab-size and --frame-size default to the code database's: pre-training and fine-tuning from scratch take
them from --data when they are not given and say so on rank 0; a given value that contradicts the database is
still refused with the flag named; commands without a database keep 8192 codes at 128 px."""

import argparse
import json
import subprocess

import pytest

from tests.helpers import REPO, environment, launcher
from tests.synthetic_codes import VOCAB, write_code_database, write_labeled
from vimpac import finetune, pretrain
from vimpac.config import add_model_arguments, config_from_args, fill_from_database

# Neither the old defaults (8192 codes, 128 px) nor the other tests' (64 codes, 32 px): 5x5 codes per frame.
DB_VOCAB, DB_FRAME = 100, 40
TINY = ["--layers", "1", "--hid-dim", "32", "--heads", "2", "--clip-len", "2", "--nce-proj-hid-dim", "32"]
RUN = ["--deepspeed_config", "ds_configs/cpu.json", "--zero-stage", "0", "--num-workers", "0", "--epochs", "1"]
RUN += ["--batch-size", "4", "--bs-per-gpu", "4", "--max-steps-per-epoch", "1"]


@pytest.fixture(scope="module")
def database(tmp_path_factory):
    path = tmp_path_factory.mktemp("db") / "db"
    return write_code_database(path, videos=8, frames=4, grid=(DB_FRAME // 8, DB_FRAME // 8), vocab=DB_VOCAB)


@pytest.fixture(scope="module")
def labeled(tmp_path_factory):
    return write_labeled(tmp_path_factory.mktemp("labeled") / "db", videos_per_class=2, val_per_class=1, classes=2)


def test_fill_takes_only_what_was_not_given():
    manifest = {"tokenizer": {"vocab_size": 256}, "frame_size": 64, "grid": [8, 8]}
    args = argparse.Namespace(vocab_size=None, frame_size=None)
    assert fill_from_database(args, manifest, "DB") == "vocabulary 256 and frame size 64 taken from DB"
    assert (args.vocab_size, args.frame_size) == (256, 64)
    args = argparse.Namespace(vocab_size=512, frame_size=None)
    assert fill_from_database(args, manifest, "DB") == "frame size 64 taken from DB"
    assert (args.vocab_size, args.frame_size) == (512, 64)  # a given value is kept (and refused later if wrong)
    assert fill_from_database(argparse.Namespace(vocab_size=8, frame_size=32), manifest, "DB") is None


def test_help_says_where_the_default_comes_from():
    def help_of(parser: argparse.ArgumentParser) -> str:
        return " ".join(parser.format_help().split())  # unwrapped

    assert "tokenizer codes (default: from the --data database)" in help_of(pretrain.build_parser())
    assert "multiple of 8 (default: from the --data database)" in help_of(pretrain.build_parser())
    assert "(default: the export's with --load, else from the --data database)" in help_of(finetune.build_parser())
    # Without a database (model-info, selfcheck) the flags keep the model's defaults.
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    config = config_from_args(parser.parse_args([]))
    assert (config.vocab_size, config.grid) == (8192, (16, 16))
    args = pretrain.build_parser().parse_args(["--data", "DB"])
    assert (args.vocab_size, args.frame_size) == (None, None)
    with pytest.raises(ValueError, match="fill_from_database"):
        config_from_args(args)


def run(entry: str, *flags: str) -> subprocess.CompletedProcess:
    cmd = [*launcher(entry, 1), *TINY, *RUN, *flags]
    return subprocess.run(cmd, cwd=REPO, env=environment(), capture_output=True, text=True, timeout=300)


def test_pretraining_takes_vocabulary_and_frame_size_from_the_database(database, tmp_path):
    out = tmp_path / "run"
    result = run("vimpac.pretrain", "--data", str(database), "--output", str(out), "--mask-blocks", "1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"vocabulary {DB_VOCAB} and frame size {DB_FRAME} taken from {database}" in result.stdout
    config = json.loads((out / "export" / "config.json").read_text())
    assert config["vocab_size"] == DB_VOCAB and config["grid"] == [DB_FRAME // 8, DB_FRAME // 8]
    recorded = json.loads((out / "run_config.json").read_text())["args"]
    assert (recorded["vocab_size"], recorded["frame_size"]) == (DB_VOCAB, DB_FRAME)


def test_finetuning_from_scratch_takes_them_from_data(labeled, tmp_path):
    result = run("vimpac.finetune", "--data", str(labeled), "--output", str(tmp_path / "run"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"vocabulary {VOCAB} and frame size 32 taken from {labeled}" in result.stdout
    assert json.loads((tmp_path / "run" / "export" / "config.json").read_text())["vocab_size"] == VOCAB


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        (["--vocab-size", "8192"], f"tokenized with {DB_VOCAB} codes but the model has --vocab-size 8192; pass "),
        (["--frame-size", "128"], f"(frame size {DB_FRAME}) but the model expects 16x16 (--frame-size 128)"),
    ],
)
def test_a_given_flag_that_contradicts_the_database_is_refused(
    database, tmp_path, capsys, single_process_env, flag, message
):
    assert pretrain.main(["--data", str(database), "--output", str(tmp_path / "run"), *TINY, *RUN, *flag]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        (["--vocab-size", "8192"], f"tokenized with {VOCAB} codes but the model has --vocab-size 8192"),
        (["--frame-size", "64"], "(frame size 32) but the model expects 8x8 (--frame-size 64)"),
    ],
)
def test_finetuning_from_scratch_refuses_a_contradicting_flag(
    labeled, tmp_path, capsys, single_process_env, flag, message
):
    assert finetune.main(["--data", str(labeled), "--output", str(tmp_path / "run"), *TINY, *RUN, *flag]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
