"""Shared by every test file: train.main() called in-process installs its --preempt_signals handlers, and a test
must not leave them behind (a process forked later, e.g. a multiprocessing pool's worker, would inherit a SIGTERM
handler that does not exit, and the pool's terminate would wait for it forever)."""

import signal

import pytest


@pytest.fixture(autouse=True)
def keep_signal_handlers():
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)
