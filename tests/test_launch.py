"""
launch.sh under torchrun: a rank's one-line error stays on the screen's last line, not buried under torchrun's report.

    python -m pytest -q tests/test_launch.py
"""

import os
import re
import subprocess

import pytest

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "NPROC": "2"}


def launch(*flags):
    return subprocess.run(
        ["bash", "launch.sh", *map(str, flags)], cwd=HERE, env=ENV, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags, error",
    [
        (["--data_dir", "{tmp}", "--bad_flag", "1"], "train.py: error: unrecognized arguments: --bad_flag 1"),
        (["--data_dir", "{tmp}/none"], "error: {tmp}/none: no such file or directory"),
    ],
)
def test_a_ranks_error_is_the_last_line_under_torchrun(flags, error, tmp_path):
    """Every rank prints the error; torchrun's report of their exit (a traceback and a table, ~40 lines) is one line."""
    r = launch(*(f.format(tmp=tmp_path) for f in flags))
    lines = r.stderr.splitlines()
    assert r.returncode == 1 and lines[-1] == error.format(tmp=tmp_path), r.stderr[-3000:]
    assert re.fullmatch(r"torchrun: train.py failed \(rank [01]: exit code -?\d+\); the ranks' first error:", lines[-2])
    assert "Traceback" not in r.stderr and "ChildFailedError" not in r.stderr
