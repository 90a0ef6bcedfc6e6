"""Test helper, run as a script in place of vimpac/pretrain.py (same flags, also under the deepspeed launcher).

It runs vimpac/pretrain.py's `main` to the end and then, still inside the process, writes the names of the threads
left alive to $TEARDOWN_PROBE_OUTPUT/rank<RANK>.json, with main's exit code (only where /proc/self/task lists
them: Linux). Used by tests/test_pretrain_runs.py's ZeRO-stage runs.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # run as a script: import `vimpac` by name

from vimpac.pretrain import main

if __name__ == "__main__":
    code = main()
    tasks = Path("/proc/self/task")
    if tasks.is_dir():
        threads = sorted((task / "comm").read_text().strip() for task in tasks.iterdir())
        out = Path(os.environ["TEARDOWN_PROBE_OUTPUT"]) / f"rank{os.environ.get('RANK', '0')}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"exit_code": code, "threads": threads}))
    sys.exit(code)
