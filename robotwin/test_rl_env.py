"""
Tests of robotwin/rl_env.py, rl.py's RoboTwin adapter, against a fake TASK_ENV with the interface RoboTwin's
script/eval_policy.py drives (setup_demo, play_once, plan_success, check_success, close_env, set_instruction, get_obs,
take_action(action, action_type="qpos"), eval_success, take_action_cnt, step_lim). Run from the repository root:

    python -m pytest -q robotwin/test_rl_env.py
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from robotwin import rl_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
CAMERAS = {"head_camera_image": "head_camera", "low_cam_image": "front_camera"}
FACTORY = "robotwin.test_rl_env:fake_task"


class FakeTaskEnv:
    """RoboTwin's TASK_ENV in miniature. Seeds 4n+2 make an unstable scene (setup_demo raises, as UnStableError),
    seeds 4n+3 one the expert cannot solve; the joints go where the action says; the episode succeeds when the
    third action's first joint is above the first action's (the policy's noise decides); 12 actions at most."""

    def __init__(self):
        self.calls, self.step_lim = [], 12
        self.take_action_cnt, self.eval_success, self.plan_success = 0, False, False

    def setup_demo(self, now_ep_num, seed, is_test, **args):
        self.calls.append(("setup_demo", seed, is_test, args.get("task_name")))
        if seed % 4 == 2:
            raise RuntimeError("UnStableError: the objects fell")
        self.seed, self.take_action_cnt, self.eval_success = seed, 0, False
        self.qpos, self.first, self.instruction = np.zeros(14), None, None

    def play_once(self):
        self.calls.append(("play_once", self.seed))
        self.plan_success = self.seed % 4 != 3
        return {"info": {"{A}": f"shoe {self.seed % 10}"}}

    def check_success(self):
        return self.plan_success

    def close_env(self, clear_cache=False):
        self.calls.append(("close_env",))

    def set_instruction(self, instruction):
        self.instruction = instruction

    def get_instruction(self):
        return self.instruction

    def get_obs(self):
        t = self.take_action_cnt
        rgb = {
            name: {"rgb": np.full((240, 320, 3), (self.seed * 7 + t * 13 + k * 50) % 256, np.uint8)}
            for k, name in enumerate(["head_camera", "front_camera", "left_camera", "right_camera"])
        }
        return {"observation": rgb, "joint_action": {"vector": self.qpos.copy()}, "endpose": {}}

    def take_action(self, action, action_type="qpos"):
        assert action_type == "qpos" and action.shape == (14,) and action.dtype == np.float64
        if self.take_action_cnt == self.step_lim or self.eval_success:
            return
        self.take_action_cnt += 1
        self.qpos = action.copy()
        self.first = action.copy() if self.first is None else self.first
        if self.take_action_cnt == 3 and action[0] > self.first[0]:
            self.eval_success = True


def fake_task(root, task, task_config):
    """The factory rl.py's --robotwin_factory names: (TASK_ENV, setup_demo's arguments, describe)."""
    assert os.path.isdir(os.path.join(root, "envs")) and task == "place_shoe"

    def describe(info, seed):
        return f"place the {info['info']['{A}']} on the mat"

    return FakeTaskEnv(), {"task_name": task, "task_config": task_config}, describe


def test_runner_follows_robotwins_evaluation(tmp_path):
    env, setup, describe = fake_task(str(fake_root(tmp_path)), "place_shoe", "demo_clean")
    runner = rl_env.TaskEnvRunner(env, setup, describe, CAMERAS)
    # an unstable scene and a seed the expert fails: skipped, each checked once
    assert runner.reset(6) == {"skip": True} and runner.reset(7) == {"skip": True}
    assert runner.reset(7) == {"skip": True}
    assert [c[0] for c in env.calls] == ["setup_demo", "close_env", "setup_demo", "play_once", "close_env"]
    env.calls.clear()
    obs = runner.reset(5)
    # the expert's run, then the policy's scene from the same seed
    assert env.calls == [
        ("setup_demo", 5, True, "place_shoe"),
        ("play_once", 5),
        ("close_env",),
        ("setup_demo", 5, True, "place_shoe"),
    ]
    assert obs["instruction"] == "place the shoe 5 on the mat" == env.get_instruction()
    assert sorted(obs["images"]) == sorted(CAMERAS) and obs["images"]["low_cam_image"].shape == (240, 320, 3)
    assert obs["images"]["low_cam_image"][0, 0, 0] == (5 * 7 + 50) % 256 and obs["qpos"].shape == (14,)
    reward, obs = runner.step(np.zeros(14, np.float32), render=False)
    assert reward == 0 and obs["images"] is None and not obs["done"]
    runner.step(np.ones(14), render=True)
    reward, obs = runner.step(np.ones(14), render=True)
    assert reward == 1 and obs["done"] and obs["images"] is None and env.calls[-1] == ("close_env",)
    # again from the cache: no second expert run; a failure runs into the step limit
    runner.reset(5)
    assert [c[0] for c in env.calls[-2:]] == ["close_env", "setup_demo"]
    for t in range(12):
        reward, obs = runner.step(-np.full(14, t, np.float64), render=True)
    assert reward == 0 and obs["done"] and env.take_action_cnt == 12


def test_runner_names_a_camera_the_task_config_lacks():
    env = FakeTaskEnv()
    runner = rl_env.TaskEnvRunner(env, {}, None, {"right_wrist_image": "right_camera", "x": "top_camera"})
    with pytest.raises(ValueError, match=r"^the task config renders no top_camera \(the checkpoint reads "):
        runner.reset(1)


def fake_root(path):
    (path / "envs").mkdir(parents=True)
    (path / "envs" / "place_shoe.py").write_text("")
    (path / "envs" / "_base_task.py").write_text("")
    (path / "task_config").mkdir()
    (path / "task_config" / "demo_clean.yml").write_text("")
    return path


def test_check_inputs_one_line_each(tmp_path):
    root = fake_root(tmp_path / "RoboTwin")
    cams = ["head_camera_image", "low_cam_image"]
    assert rl_env.check_inputs(str(root), "place_shoe", "demo_clean", cams) == CAMERAS
    with pytest.raises(ValueError, match=r"^--task 'stack_cups': unknown task; RoboTwin's envs/ has place_shoe"):
        rl_env.check_inputs(str(root), "stack_cups", "demo_clean", cams)
    with pytest.raises(ValueError, match=r"^--task_config demo_noisy: no task_config/demo_noisy.yml in "):
        rl_env.check_inputs(str(root), "place_shoe", "demo_noisy", cams)
    with pytest.raises(ValueError, match=r"^the checkpoint reads cameras observations/images/top, which RoboTwin"):
        rl_env.check_inputs(str(root), "place_shoe", "demo_clean", ["observations/images/top"])
    with pytest.raises(ValueError, match=r"not a RoboTwin checkout \(no envs/ directory\)$"):
        rl_env.check_inputs(str(tmp_path), "place_shoe", "demo_clean", cams)


@pytest.mark.slow
def test_pool_steps_task_envs_in_spawned_processes(tmp_path):
    root = fake_root(tmp_path / "RoboTwin")
    with rl_env.RoboTwinPool(2, str(root), "place_shoe", "demo_clean", CAMERAS, FACTORY) as pool:
        first = pool.reset({0: 5, 1: 7}, {0: True, 1: True})
        assert first[1] == {"skip": True} and first[0]["images"]["head_camera_image"][0, 0, 0] == 35
        out = pool.step({0: np.ones(14)}, {0: True})
        assert list(out) == [0] and out[0][0] == 0 and out[0][1]["images"]["head_camera_image"][0, 0, 0] == 48
        with pytest.raises(RuntimeError, match="RoboTwin environment 1 failed"):
            pool.step({1: np.ones(3)}, {1: False})


@pytest.fixture(scope="module")
def trained(demo_dir, tiny_dir, tmp_path_factory):
    """A tiny policy on two RoboTwin cameras with proprioception, 2 steps of train.py."""
    out = tmp_path_factory.mktemp("rt-run")
    flags = ["--vla_path", tiny_dir, "--data_dir", demo_dir, "--out_dir", out, "--val_episodes", 0]
    flags += ["--batch_size", 2, "--num_workers", 0, "--lora_rank", 4, "--max_steps", 2, "--save_interval", 2]
    flags += ["--cameras", "head_camera_image,low_cam_image", "--proprio"]
    r = subprocess.run(
        [sys.executable, "train.py", *map(str, flags)], cwd=ROOT, env=ENV, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return out / "step_000002"


@pytest.mark.slow
def test_rl_runs_on_robotwin_task_envs(trained, tmp_path):
    """rl.py --sim robotwin end to end on the fake TASK_ENVs: the skipped seeds, the per-episode instructions, the
    step limit, GRPO's update, a checkpoint in the standard layout."""
    root, out = fake_root(tmp_path / "RoboTwin"), tmp_path / "rl"
    flags = ["--checkpoint", trained, "--out_dir", out, "--sim", "robotwin", "--robotwin_root", root]
    flags += ["--task", "place_shoe", "--robotwin_factory", FACTORY, "--iterations", 2, "--envs", 2, "--episodes", 4]
    flags += ["--group", 2, "--steps", 500, "--execute", 4, "--threads", 1, "--progress", 0]
    r = subprocess.run(
        [sys.executable, "rl.py", *map(str, flags)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # iteration 1: seeds 20000, 20001, both solvable, 12 actions at most (the task's step limit, not --steps)
    assert rows[0]["seeds"] == [20000, 20001] and rows[0]["episodes"] == 4 and rows[0]["skipped"] == 0
    assert rows[0]["env_steps"] <= 4 * 12
    # iteration 2: 20002 unstable, 20003 unsolvable: nothing to learn from
    assert rows[1]["seeds"] == [20002, 20003] and rows[1]["episodes"] == 0 and rows[1]["skipped"] == 4
    assert rows[1]["groups"] == 0 and rows[1]["pg_loss"] is None
    import model

    run = model.check_checkpoint(str(out / "step_000002"))
    assert run["cameras"] == "head_camera_image,low_cam_image" and run["rl"]["flags"]["sim"] == "robotwin"
