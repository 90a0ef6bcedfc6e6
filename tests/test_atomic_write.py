"""vimpac.atomic_write: the target holds the old content or the new one, never a part, and no temporary file
outlives the write."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from vimpac import atomic_write
from vimpac.atomic_write import atomic_path, write_json_atomic, write_text_atomic


def test_a_finished_write_replaces_the_file_and_leaves_nothing_beside_it(tmp_path):
    target = tmp_path / "manifest.json"
    target.write_text("old")
    write_json_atomic(target, {"b": 1, "é": [2]}, sort_keys=True)
    assert json.loads(target.read_text(encoding="utf-8")) == {"b": 1, "é": [2]}
    assert "é" in target.read_text(encoding="utf-8")  # non-ASCII kept as is
    write_text_atomic(target, "new\n")
    assert target.read_text() == "new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_partial_one(tmp_path):
    target = tmp_path / "video.mp4"
    target.write_bytes(b"old video")
    with pytest.raises(RuntimeError, match="encoder died"), atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".mp4" and tmp.name.startswith(".")  # format by extension
        tmp.write_bytes(b"half a vid")
        raise RuntimeError("encoder died")
    assert target.read_bytes() == b"old video"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["video.mp4"]


def test_a_written_file_gets_the_umask_mode_even_from_a_writer_that_makes_it_private(tmp_path):
    mask = os.umask(0o027)
    try:
        atomic_write._file_mode.cache_clear()
        with atomic_path(tmp_path / "model.safetensors") as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp))  # safetensors creates its file 0600
        assert (tmp_path / "model.safetensors").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(mask)
        atomic_write._file_mode.cache_clear()
