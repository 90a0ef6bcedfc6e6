"""Flag values no run can use are refused before any work, in one line naming the flag (exit code 2)."""

from __future__ import annotations

import pytest

from vimpac.cli import main

TOKENIZE = ["tokenize", "--videos", "v", "--annotations", "a.txt", "--format", "list", "--tokenizer", "t"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([*TOKENIZE, "--out", "{tmp}/o", "--device", "gpu"], "--device must be cpu or cuda[:N]; got 'gpu'"),
        ([*TOKENIZE, "--out", "{tmp}/o", "--fps", "inf"], "--fps must be positive and finite"),
        (["selfcheck", "--device", "cuda:x"], "--device must be cpu or cuda[:N]; got 'cuda:x'"),
        (["selfcheck", "--json", "{tmp}"], "--json {tmp} is a folder"),
        (["probe", "--model", "m", "--data", "d", "--out", "{tmp}"], "--out {tmp} is a folder"),
        (["pretrain-eval", "--model", "m", "--data", "d", "--out", "{tmp}"], "--out {tmp} is a folder"),
        (["probe", "--model", "m", "--data", "d", "--weight-decays", "nan"], "--weight-decays must list finite"),
        (["predict", "x.mp4", "--model", "m", "--views", ","], "--views ',' names no view"),
        (["db", "import-original", "{tmp}", "--out", "{tmp}/o", "--fps", "0"], "--fps must be positive and finite"),
        (["db", "import-original", "{tmp}", "--out", "{tmp}/o", "--frame-size", "0"], "--frame-size must be a"),
        (["db", "import-original", "{tmp}", "--out", "{tmp}/o", "--class-names", "{tmp}/none.txt"], "is not a file"),
        (["synth", "--out", "{tmp}/s", "--seed", "-1"], "--seed -1: must be ≥ 0"),
    ],
)
def test_bad_values_are_refused_before_any_work(tmp_path, capsys, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message.replace("{tmp}", str(tmp_path)) in err and "Traceback" not in err
