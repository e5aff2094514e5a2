"""
Fixtures the core's test files share, built once per session: the trained runs (run_a, run_p) and a Policy on run_a.
The tiny twin and the demo episodes come from the repository's top-level conftest.py, shared with every test folder.
"""

import json
import os

import pytest
import torch

import infer
from helpers import P_FLAGS, run_train, train_flags

torch.set_num_threads(1)
# a test that needs one of these launches a training run when it is the first to ask: it must be marked slow
TRAINED = {"run_a", "run_p", "policy", "val_episode"}


def pytest_collection_modifyitems(config, items):
    """Refuse a test in this folder that needs a trained run without the slow marker: `-m "not slow"` would train."""
    here = os.path.dirname(os.path.abspath(__file__))
    unmarked = [
        item.nodeid
        for item in items
        if str(item.path).startswith(here + os.sep)
        and TRAINED & set(item.fixturenames)
        and not item.get_closest_marker("slow")
    ]
    if unmarked:
        raise pytest.UsageError(f"needs a trained run ({', '.join(sorted(TRAINED))}), not marked slow: {unmarked}")


@pytest.fixture(scope="session")
def run_a(tiny_dir, demo_dir, tmp_path_factory):
    """6 steps, checkpoints at 3 and 6, lr decay after step 4: the reference for resume, lr and metrics tests."""
    out = tmp_path_factory.mktemp("run_a")
    r = run_train(
        train_flags(
            tiny_dir, demo_dir, out, "--max_steps", 6, "--save_interval", 3, "--eval_interval", 3, "--lr_decay_step", 4
        )
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def run_p(tiny_dir, demo_dir, tmp_path_factory):
    """4 steps with OFT's other levers: proprioception (the demo has no `state`: action[t]), offset 1, full attention,
    and OFT+'s FiLM; activations recomputed in backward (--grad_ckpt on)."""
    out = tmp_path_factory.mktemp("run_p")
    r = run_train(train_flags(tiny_dir, demo_dir, out, *P_FLAGS, "--max_steps", 4))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def policy(run_a):
    """run_a's last checkpoint as a Policy on the CPU (LoRA merged, as by default)."""
    return infer.Policy.from_checkpoint(str(run_a / "step_000006"), device="cpu")


@pytest.fixture(scope="session")
def val_episode(run_a):
    """The episode run_a held out for validation: a path."""
    return json.load(open(run_a / "step_000006" / "args.json"))["val_episode_files"][0]
