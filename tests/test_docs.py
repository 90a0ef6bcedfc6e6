"""The generated command-line reference (docs/cli.md) matches the parsers."""

import subprocess
import sys

from tests.helpers import REPO


def test_cli_reference_is_up_to_date():
    result = subprocess.run(
        [sys.executable, "scripts/cli_reference.py", "--check"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr + "\n(run: python scripts/cli_reference.py)"
