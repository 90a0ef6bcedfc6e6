"""A finished run takes its process groups down before the interpreter exits.

Gloo's groups stop their threads only when the last reference to them goes, and a trained DeepSpeed engine holds
them through hooks autograd keeps; left to interpreter finalization, those threads raced the exit and a finished
rank occasionally aborted ("terminate called without an active exception"). Checked here on 2 ranks under the
deepspeed launcher: after vimpac/pretrain.py's `main` returns, no gloo or c10d store thread is left in either rank,
under ZeRO 0, 2 and 3 (stage 3 also needs DeepSpeed's module-level state emptied: vimpac/dist_setup.py).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import MODEL, REPO, RUN, environment, launcher
from tests.synthetic_codes import write_code_database

PROBE = REPO / "tests" / "teardown_probe.py"
DIST_THREADS = ("gloo", "pt_gloo", "pt_tcpstore")  # gloo's loop and work threads, the store server's loop


@pytest.mark.skipif(sys.platform != "linux", reason="reads the thread names from /proc/self/task")
@pytest.mark.parametrize("stage", ["0", "2", "3"])
def test_no_process_group_threads_survive_a_finished_run(tmp_path, stage):
    db = write_code_database(tmp_path / "db", videos=16)
    probe = tmp_path / "threads"
    probe.mkdir()
    command = [*launcher(str(PROBE), 2), "--data", str(db), "--output", str(tmp_path / "out"), *MODEL, *RUN]
    command += ["--zero-stage", stage, "--epochs", "1"]
    env = {**environment(), "TEARDOWN_PROBE_OUTPUT": str(probe)}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for rank in (0, 1):
        report = json.loads((probe / f"rank{rank}.json").read_text())
        assert report["exit_code"] == 0
        left = [name for name in report["threads"] if name.startswith(DIST_THREADS)]
        assert not left, f"rank {rank}: process-group threads still alive after main returned: {left}"
