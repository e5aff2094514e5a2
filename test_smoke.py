"""
nanoOFT's smoke test: one pass through what a user does, on the tiny twin checkpoint and synthetic demo episodes, CPU
only, about two minutes on 2 cores. Train 2 steps from the command line, resume the run to step 4, replay a held-out
episode with infer.py, and drive the last checkpoint through Policy.predict and Policy.act.

    python -m pytest -q test_smoke.py

Every module's own tests are in tests/ (python -m pytest runs them all, -m "not slow" the quick ones).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import data
import infer

torch.set_num_threads(1)
HERE = os.path.dirname(os.path.abspath(__file__))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
FILES = [
    "adapter_model.safetensors",
    "adapter_config.json",
    "action_head.safetensors",
    "dataset_statistics.json",
    "args.json",
    "trainer_state.pt",
]


def run(script, *args):
    """A core script as a user runs it from the repository: -> its CompletedProcess, failing the test on an error."""
    r = subprocess.run(
        [sys.executable, script, *map(str, args)], cwd=HERE, env=ENV, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def train(tiny_dir, demo_dir, out, *extra):
    """train.py on the tiny twin: 1 validation episode, batch 2, LoRA rank 4, a checkpoint and an evaluation every
    step (2 batches), lr decay after step 3."""
    flags = ["--vla_path", tiny_dir, "--data_dir", demo_dir, "--out_dir", out, "--val_episodes", 1, "--batch_size", 2]
    flags += ["--num_workers", 0, "--lora_rank", 4, "--log_interval", 1, "--eval_batches", 2, "--eval_interval", 1]
    return run("train.py", *flags, "--save_interval", 1, "--lr_decay_step", 3, *extra)


def weights(ckpt):
    """The trained tensors of a checkpoint: LoRA and the action head."""
    return load_file(ckpt / "adapter_model.safetensors") | load_file(ckpt / "action_head.safetensors")


def frames_at(episode, t, cameras):
    """What a robot's cameras hand over: camera name -> HxWx3 uint8 frame."""
    return {c: f.permute(1, 2, 0).numpy() for c, f in zip(cameras, episode["frames"](t))}


@pytest.mark.slow
def test_train_resume_replay_and_act(tiny_dir, demo_dir, tmp_path):
    out = tmp_path / "run"
    # 1. two steps: a complete checkpoint at each, the loss logged at each step and finite
    train(tiny_dir, demo_dir, out, "--max_steps", 2)
    assert sorted(os.listdir(out)) == [".lock", "metrics.jsonl", "step_000001", "step_000002"]
    for f in FILES:
        assert os.path.isfile(out / "step_000002" / f), f
    assert torch.load(out / "step_000002" / "trainer_state.pt", weights_only=True)["step"] == 2
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert all(r["val_l1"] > 0 for r in rows if "val_l1" in r)

    # 2. the same command to step 4 with --resume auto: it continues from step 2 and logs each step once
    r = train(tiny_dir, demo_dir, out, "--max_steps", 4, "--resume", "auto")
    assert f"resumed from {out / 'step_000002'} at step 2" in r.stdout
    assert "step 3/4" in r.stdout and "step 1/4" not in r.stdout and "step 2/4" not in r.stdout
    ckpt = out / "step_000004"
    assert torch.load(ckpt / "trainer_state.pt", weights_only=True)["step"] == 4
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert [r["lr"] for r in rows if "loss" in r] == pytest.approx([5e-4] * 3 + [5e-5])  # the schedule carried on
    before, after = weights(out / "step_000002"), weights(ckpt)
    assert before.keys() == after.keys() and max((after[k] - before[k]).abs().max() for k in after) > 0

    # 3. infer.py replays the held-out episode: a report with finite errors and one executed action per frame
    args = json.load(open(ckpt / "args.json"))
    (held_out,) = args["val_episode_files"]
    assert held_out in data.list_episodes(demo_dir)
    run("infer.py", "--checkpoint", ckpt, "--episode", held_out, "--out", tmp_path / "infer")
    report = json.load(open(tmp_path / "infer" / "report.json"))
    episode = data.read_episode(held_out, args["cameras"].split(","))
    assert np.array(report["executed"]).shape == (episode["length"], 14)
    assert np.isfinite(report["l1"]) and np.isfinite(report["l1_raw"]) and report["l1"] > 0
    assert report["l1_raw"] == pytest.approx(np.abs(np.array(report["executed"]) - episode["actions"]).mean())

    # 4. the checkpoint as a library: raw actions within the training data's bounds, the same as infer.py executed
    policy = infer.Policy.from_checkpoint(str(ckpt), device="cpu", execute=2)
    instruction = report["instruction"]
    chunk = policy.predict(frames_at(episode, 0, policy.cameras), instruction)
    assert chunk.shape == (8, 14) and chunk.dtype == np.float32
    lo, hi = np.array(policy.stats["min"]), np.array(policy.stats["max"])
    assert (chunk >= lo - 1e-6).all() and (chunk <= hi + 1e-6).all()
    np.testing.assert_allclose(report["executed"][0], chunk[0], rtol=1e-4, atol=1e-5)
    actions = [policy.act(frames_at(episode, t, policy.cameras), instruction) for t in range(3)]
    np.testing.assert_allclose(np.stack(actions[:2]), chunk[:2], rtol=1e-5, atol=1e-6)  # executes 2, then re-plans
    replanned = policy.predict(frames_at(episode, 2, policy.cameras), instruction)
    np.testing.assert_allclose(actions[2], replanned[0], rtol=1e-5, atol=1e-6)
