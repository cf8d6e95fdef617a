"""The repository passes `ruff check` with the pyproject.toml configuration.

scripts/test.sh runs ruff before pytest as well; this keeps plain `pytest` runs honest too.
"""

from pathlib import Path
import subprocess
import sys

REPO = Path(__file__).resolve().parents[1]


def test_ruff_check_passes():
    result = subprocess.run(
        [sys.executable, '-m', 'ruff', 'check', '--no-cache', '--output-format=concise', '.'],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f'ruff check found problems:\n{result.stdout}{result.stderr}'
