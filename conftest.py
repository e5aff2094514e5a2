"""Shared by every test file, in every folder: the signal handlers restored after each test, and the tiny twin
checkpoint (demo.py --tiny) and synthetic demo episodes, each built once per session for whichever test asks first."""

import signal

import pytest

import data
from demo import make_demo, make_tiny


@pytest.fixture(autouse=True)
def keep_signal_handlers():
    """train.main() called in-process installs its --preempt_signals handlers, and a test must not leave them behind
    (a process forked later, e.g. a multiprocessing pool's worker, would inherit a SIGTERM handler that does not exit,
    and the pool's terminate would wait for it forever)."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    """6 synthetic episodes in the real layout (demo.py), 140-240 frames of 256x256 each: -> their directory."""
    out = str(tmp_path_factory.mktemp("demo"))
    make_demo(out, episodes=6, seed=0)
    return out


@pytest.fixture(scope="session")
def demo(demo_dir):
    """The demo episodes' paths, in order."""
    return data.list_episodes(demo_dir)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The tiny twin of openvla-7b (demo.py --tiny): its base checkpoint directory."""
    return make_tiny(str(tmp_path_factory.mktemp("tiny-openvla")))
