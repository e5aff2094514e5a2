"""
Tests of aloha/act/ that need no lerobot, which lives in a venv of its own (aloha/act/README.md): evaluate_act.py's
report matches aloha/evaluate.py's where compare.py reads it, its lockstep loop steps the simulator and renders only
when a chunk is due, and to_lerobot.py refuses bad demos in one line before writing. The LeRobot side (the writer,
lerobot-train, the ACT policy) needs that venv: the README lists the smoke run that covered it.

    python -m pytest -q aloha/act/test_act.py
"""

import argparse
import json
import os
import sys

import h5py
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import compare  # noqa: E402  (aloha/)
import envs  # noqa: E402
import evaluate  # noqa: E402
import evaluate_act  # noqa: E402  (this folder)
import to_lerobot  # noqa: E402


def test_summary_is_evaluate_pys():
    """The copied wilson and summarize give what aloha/evaluate.py's give (compare.py reads either report)."""
    rng = np.random.default_rng(0)
    for n in (0, 1, 7, 100):
        stages = rng.integers(0, 5, n)
        episodes = [{"seed": 1000 + i, "max_reward": int(r), "success": bool(r == 4)} for i, r in enumerate(stages)]
        assert evaluate_act.summarize(episodes) == evaluate.summarize(episodes)
        assert evaluate_act.wilson(int((stages == 4).sum()), n) == evaluate.wilson(int((stages == 4).sum()), n)


class HoldStill:
    """An actor double with evaluate_act.Actor's interface: whenever an environment's plan has run out it plans
    `every` copies of the joint state it sees; it records whether each step's frames came only when a plan was due."""

    def __init__(self, every):
        self.every, self.frames_when_due, self.frames_when_not = every, 0, 0

    def new_ensembler(self):
        return None

    def act(self, observations, running):
        for i, episode in running.items():
            has_frames = observations[i]["images"] is not None
            if episode.needs_chunk():
                assert has_frames, f"environment {i} is due a chunk at step {episode.t} but was not rendered"
                self.frames_when_due += 1
                episode.queue.extend([observations[i]["qpos"]] * self.every)
            else:
                self.frames_when_not += has_frames
        return {i: episode.queue.popleft() for i, episode in running.items()}


@pytest.mark.slow
def test_lockstep_episodes_make_a_report_compare_reads(tmp_path):
    """3 seeds on 2 simulators, 7 steps each with a plan every 3: every seed ends at --steps, frames are rendered
    exactly when a plan is due (steps 0, 3, 6), and the report pairs in compare.py like evaluate.py's."""
    args = argparse.Namespace(steps=7, gif=0)
    actor, results = HoldStill(every=3), []
    cameras = {evaluate_act.CAMERA: ("top", (48, 64))}
    with envs.SimPool(2, "transfer_cube", cameras) as pool:
        evaluate_act.run_episodes([1000, 1001, 1002], pool, actor, args, lambda result, _: results.append(result))
    assert sorted(r["seed"] for r in results) == [1000, 1001, 1002]
    assert all(r["steps"] == 7 and r["max_reward"] == 0 and not r["success"] for r in results)
    assert (actor.frames_when_due, actor.frames_when_not) == (3 * 3, 0)
    report = {"settings": {"task": "transfer_cube"}, "policy": evaluate_act.policy_entry(results, "hold still")}
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    stages, task, _ = compare.load(str(path), "A")
    assert (stages, task) == ({1000: 0, 1001: 0, 1002: 0}, "transfer_cube")
    assert report["policy"]["stage_histogram"]["0"] == 3


def write_demo(path, frames=4, size=(8, 10), action_dim=14):
    with h5py.File(path, "w") as f:
        f["observations/images/top"] = np.zeros((frames, *size, 3), np.uint8)
        f["observations/qpos"] = np.zeros((frames, 14), np.float32)
        f["action"] = np.zeros((frames, action_dim), np.float32)


def test_to_lerobot_refuses_bad_demos_in_one_line(tmp_path, capsys):
    demos, out = tmp_path / "demos", str(tmp_path / "out")
    demos.mkdir()
    cases = [
        ([], "no episode_N.hdf5 files"),
        ([("episode_0.hdf5", {})], "--episodes 5: .* holds only 1 episodes"),
        ([("episode_1.hdf5", {"action_dim": 7})], "action \\(4, 7\\) must both be \\(4, 14\\)"),
        ([("episode_1.hdf5", {}), ("episode_2.hdf5", {"size": (8, 12)})], "frames of \\(8, 12, 3\\), the first"),
    ]
    for files, message in cases:
        for name, kwargs in files:
            write_demo(demos / name, **kwargs)
        argv = [str(demos), out] + (["--episodes", "5"] if "--episodes" in message else [])
        with pytest.raises(SystemExit, match=f"^error: .*{message}"):
            to_lerobot.main(argv)
        assert not os.path.exists(out) and not os.path.exists(out + ".partial")
    (tmp_path / "exists").mkdir()
    with pytest.raises(SystemExit, match="exists: pass --overwrite"):
        to_lerobot.main([str(demos), str(tmp_path / "exists")])
