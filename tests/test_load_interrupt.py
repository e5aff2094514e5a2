"""
Ctrl-C while safetensors reads weights must end as a KeyboardInterrupt (train.py's one line and exit 130, serve.py's
"stopped while loading the checkpoint"), never as a ValueError from inside torch.

    python -m pytest -q tests/test_load_interrupt.py
"""

import collections
import signal

import numpy as np
import pytest
import torch

import model
from demo import make_tiny


@pytest.fixture(scope="module")
def twin(tmp_path_factory):
    path = tmp_path_factory.mktemp("twin") / "tiny"
    make_tiny(str(path))
    return str(path)


def interrupted_loads(load, delays):
    """How each of `load`'s calls, repeated until an alarm `delay` seconds later raises KeyboardInterrupt in it (as
    Ctrl-C does), ended: {outcome: count}."""
    outcomes = collections.Counter()
    previous = signal.signal(signal.SIGALRM, signal.default_int_handler)
    # an interrupt between torch's `with torch.no_grad()` setting the grad mode and entering the block never restores
    # it (a race of any asynchronous exception, harmless in a process that Ctrl-C ends): restored here, so that the
    # tests after these ones still train
    grad = torch.is_grad_enabled()
    try:
        for delay in delays:
            # armed inside the try: an alarm of 0.5 ms may fire before the first load starts
            try:
                signal.setitimer(signal.ITIMER_REAL, delay)
                while True:
                    load()
            except KeyboardInterrupt:
                outcomes["KeyboardInterrupt"] += 1
            except Exception as e:
                signal.setitimer(signal.ITIMER_REAL, 0)
                outcomes[f"{type(e).__name__}: {e}"] += 1
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        torch.set_grad_enabled(grad)
    return outcomes


def test_ctrl_c_while_weights_load_is_a_keyboard_interrupt(twin):
    # torch.asarray, which safetensors reads every tensor with, swallows a KeyboardInterrupt raised inside it and fails
    # with "could not determine the shape of object type 'torch.storage.UntypedStorage'": 4 loads in 10 hit it
    vla = model.VLA.from_config(model.read_json(f"{twin}/config.json"), tokenizer=model.load_tokenizer(twin)[1])
    delays = np.random.default_rng(0).uniform(0.0005, 0.03, 60)
    outcomes = interrupted_loads(lambda: model.load_weights(vla, twin, torch.float32, "cpu"), delays)
    assert outcomes == {"KeyboardInterrupt": len(delays)}


def test_ctrl_c_while_a_head_loads_is_a_keyboard_interrupt(twin, tmp_path):
    vla = model.VLA.from_pretrained(twin)
    model.save_head(vla, tmp_path / "action_head.safetensors")
    delays = np.random.default_rng(1).uniform(0.0005, 0.01, 60)
    outcomes = interrupted_loads(lambda: model.load_head(vla, tmp_path / "action_head.safetensors"), delays)
    assert outcomes == {"KeyboardInterrupt": len(delays)}


def test_a_corrupt_tensor_is_still_a_value_error():
    """The retry that tells a swallowed Ctrl-C apart must not turn a real error into an interrupt."""

    class Broken:
        def get_tensor(self, key):
            raise ValueError(f"{key}: broken")

    with pytest.raises(ValueError, match="^w: broken$"):
        model.get_tensor(Broken(), "w")
