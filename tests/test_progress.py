"""
Tests of progress.py, the leaves' progress lines: the ETA from this run's pace, tqdm's bar on a terminal (a real
pseudo-terminal too), plain lines when the output is a file.

    python -m pytest -q tests/test_progress.py
"""

import fcntl
import io
import os
import pty
import struct
import subprocess
import sys
import termios

import pytest

from progress import Progress, duration

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Clock:
    """A clock the test moves by hand."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_duration():
    assert [duration(s) for s in (0, 42.4, 60, 425, 3599.6, 3600, 7380, 90000)] == [
        "0s",
        "42s",
        "1m00s",
        "7m05s",
        "1h00m",
        "1h00m",
        "2h03m",
        "25h00m",
    ]


def test_plain_lines_carry_the_eta_of_this_runs_pace():
    """5 items, 1 done by an earlier run: the ETA counts only what this run did, and lines that finish no item
    (a dropped seed) are printed as they are."""
    out, err, clock = io.StringIO(), io.StringIO(), Clock()
    with Progress(total=5, done=1, file=out, clock=clock) as progress:
        progress.write("dropped | seed 7")
        clock.now += 12
        progress.update(line="episode 2/5")
        progress.write("a problem", file=err)
        clock.now += 8
        progress.update(line="episode 3/5")
        clock.now += 100
        progress.update(n=2, line="episodes 4 and 5")
    assert out.getvalue().splitlines() == [
        "dropped | seed 7",
        "episode 2/5 | 12s elapsed, eta 36s",  # 12 s an item, 3 left
        "episode 3/5 | 20s elapsed, eta 20s",  # 10 s an item, 2 left
        "episodes 4 and 5 | 2m00s elapsed, eta 0s",
    ]
    assert err.getvalue() == "a problem\n" and "\r" not in out.getvalue()


def test_eta_is_unknown_before_the_first_item():
    out, clock = io.StringIO(), Clock()
    progress = Progress(total=3, file=out, clock=clock)
    clock.now += 5
    assert progress.eta() is None
    progress.update(n=0, line="started")
    assert out.getvalue() == "started | 5s elapsed, eta ?\n"


def test_terminal_gets_a_bar_under_the_lines():
    screen = Terminal()
    with Progress(total=4, done=1, unit="episode", file=screen) as progress:
        progress.update(line="episode 2/4 | seed 3")
        progress.write("dropped | seed 4")
    text = screen.getvalue()
    assert "\r" in text and "episode 2/4 | seed 3\n" in text and "dropped | seed 4\n" in text
    assert "elapsed" not in text  # the bar carries the time, not the lines
    bars = [part for part in text.replace("\n", "\r").split("\r") if "episode/s" in part or "s/episode" in part]
    assert bars and bars[-1].lstrip().startswith("50%") and "2/4 [" in bars[-1]  # done + this run's item
    assert "<" in bars[-1]  # tqdm's elapsed<remaining


@pytest.mark.slow
def test_a_real_terminal_and_a_pipe():
    """The same command on a pseudo-terminal draws tqdm's bar; into a pipe it prints plain lines with the ETA."""
    script = (
        "import time\n"
        "from progress import Progress\n"
        "with Progress(total=3, unit='job') as p:\n"
        "    for k in range(1, 4):\n"
        "        time.sleep(0.05)\n"
        "        p.update(line=f'job {k}/3')\n"
    )
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert [line.split(" | ")[0] for line in lines] == ["job 1/3", "job 2/3", "job 3/3"]
    assert all(" elapsed, eta " in line for line in lines) and lines[-1].endswith("eta 0s")
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty is 0 columns wide
    process = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=follower, stderr=follower)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # EIO: the other end closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert process.wait(timeout=60) == 0
    text = b"".join(chunks).decode()
    assert "job 3/3" in text and "\r" in text and "100%" in text and "3/3 [" in text and "elapsed" not in text
