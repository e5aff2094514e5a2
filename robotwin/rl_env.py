"""
RoboTwin 2.0 tasks as rl.py's simulators: N TASK_ENVs, each in its own process, reset and stepped in lockstep
through the interface RoboTwin's script/eval_policy.py drives (setup_demo, play_once, check_success, get_obs,
take_action(action, action_type="qpos"), eval_success, take_action_cnt/step_lim, close_env).

    python rl.py --sim robotwin --robotwin_root /path/RoboTwin --task place_shoe --task_config demo_clean \
        --checkpoint out/shoe/step_050000 --steps 500 ...          # docs/rl.md has the whole command

Per episode, as RoboTwin's evaluation: the seed is first played by RoboTwin's scripted expert, and a seed the expert
cannot solve (or whose scene is unstable) is skipped; then the scene is set up again from the seed, the instruction
drawn from the task's seen descriptions (seeded by the seed: the K rollouts of a GRPO group read the same one), and
the policy's 14 joint targets go to take_action. The reward is success alone (RoboTwin has no stages): 1 when
eval_success is set, which also ends the episode, as does RoboTwin's step limit. Frames are fetched (get_obs) only
when the policy samples a chunk.
"""

import importlib
import multiprocessing
import os
import sys
import traceback

import numpy as np

from robotwin.deploy_policy import CAMERAS

# the TASK_ENV maker the workers call: "module:function"(root, task, task_config) -> (TASK_ENV, setup_demo's
# arguments, describe(episode info, seed) -> instruction or None)
FACTORY = "robotwin.rl_env:load_task"


def check_inputs(root, task, task_config, cameras):
    """The RoboTwin checkout, task and config exist and every camera the checkpoint reads is a RoboTwin camera.
    -> {checkpoint camera: RoboTwin camera}. A ValueError in one line otherwise."""
    if not os.path.isdir(os.path.join(root, "envs")):
        raise ValueError(f"--robotwin_root {root}: not a RoboTwin checkout (no envs/ directory)")
    tasks = sorted(f[:-3] for f in os.listdir(os.path.join(root, "envs")) if f.endswith(".py") and f[0] != "_")
    if task not in tasks:
        raise ValueError(f"--task {task!r}: unknown task; RoboTwin's envs/ has {', '.join(tasks[:12])}...")
    if not os.path.isfile(os.path.join(root, "task_config", f"{task_config}.yml")):
        raise ValueError(f"--task_config {task_config}: no task_config/{task_config}.yml in {root}")
    ours = {name: cam for cam, name in CAMERAS.items()}
    unknown = [c for c in cameras if c not in ours]
    if unknown:
        raise ValueError(
            f"the checkpoint reads cameras {', '.join(unknown)}, which RoboTwin does not render (it has "
            f"{', '.join(ours)})"
        )
    return {c: ours[c] for c in cameras}


def _yaml(path):
    import yaml

    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def load_task(root, task, task_config):
    """The TASK_ENV and setup_demo's arguments, as RoboTwin's script/eval_policy.py builds them (commit 0c3f24c):
    the task config, the embodiment files and their configs, the head camera's size; run from RoboTwin's root."""
    os.chdir(root)
    for path in (os.path.join(root, "description", "utils"), os.path.join(root, "policy"), root):
        sys.path.insert(0, path)
    # rl.py's own modules were imported by the spawned process: RoboTwin's `envs` must win over aloha/envs.py
    module = sys.modules.get("envs")
    if module is not None and not os.path.realpath(getattr(module, "__file__", "") or "").startswith(root):
        del sys.modules["envs"]
    configs = importlib.import_module("envs").CONFIGS_PATH
    args = _yaml(os.path.join(root, "task_config", f"{task_config}.yml"))
    args |= {"task_name": task, "task_config": task_config, "eval_mode": True, "render_freq": 0}
    embodiments = _yaml(os.path.join(configs, "_embodiment_config.yml"))
    cameras = _yaml(os.path.join(configs, "_camera_config.yml"))
    head = cameras[args["camera"]["head_camera_type"]]
    args["head_camera_h"], args["head_camera_w"] = head["h"], head["w"]
    kind = args["embodiment"]
    files = [embodiments[k]["file_path"] for k in kind[:2]]
    args["left_robot_file"], args["right_robot_file"] = files[0], files[-1]
    args["dual_arm_embodied"] = len(kind) == 1
    if len(kind) == 3:
        args["embodiment_dis"] = kind[2]
    for side in ("left", "right"):
        args[f"{side}_embodiment_config"] = _yaml(os.path.join(args[f"{side}_robot_file"], "config.yml"))
    task_env = getattr(importlib.import_module(f"envs.{task}"), task)()
    return task_env, args, describer(task)


def describer(task):
    """describe(episode info, seed) -> one of the task's seen instructions for that episode (RoboTwin's generator)."""

    def describe(info, seed):
        from generate_episode_instructions import generate_episode_descriptions

        seen = generate_episode_descriptions(task, [info["info"]], 1)[0]["seen"]
        return str(np.random.default_rng(seed).choice(seen))

    return describe


class TaskEnvRunner:
    """One TASK_ENV as rl.py's loop drives a simulator: reset(seed, render) -> observation ({"skip": True} for a seed
    the expert does not solve), step(action, render) -> (reward 0/1, observation). An observation holds "qpos" (the
    joint vector), "images" {checkpoint camera: 240x320 RGB} (None when not rendered), "instruction" and "done"."""

    def __init__(self, task_env, setup, describe, cameras):
        self.env, self.setup, self.describe, self.cameras = task_env, setup, describe, cameras
        self.episodes, self.open, self.instruction = 0, False, None
        # seed -> the expert's episode info, or None where it failed: checked once per seed
        self.solved = {}

    def expert(self, seed):
        if seed not in self.solved:
            try:
                self.env.setup_demo(now_ep_num=self.episodes, seed=seed, is_test=True, **self.setup)
                info = self.env.play_once()
                ok = self.env.plan_success and self.env.check_success()
            # RoboTwin's UnStableError, or any failure of its expert: the seed is skipped, as its evaluation does
            except Exception:
                info, ok = None, False
            self.env.close_env()
            self.solved[seed] = info if ok else None
        return self.solved[seed]

    def reset(self, seed, render=True):
        if self.open:
            self.env.close_env()
            self.open = False
        info = self.expert(seed)
        if info is None:
            return {"skip": True}
        self.env.setup_demo(now_ep_num=self.episodes, seed=seed, is_test=True, **self.setup)
        self.open, self.episodes = True, self.episodes + 1
        self.instruction = self.describe(info, seed) if self.describe else None
        if self.instruction:
            self.env.set_instruction(instruction=self.instruction)
        return self.observe(True) | {"done": False}

    def step(self, action, render):
        self.env.take_action(np.asarray(action, dtype=np.float64), action_type="qpos")
        success = bool(self.env.eval_success)
        done = success or self.env.take_action_cnt >= self.env.step_lim
        obs = self.observe(render and not done) | {"done": done}
        if done:
            self.env.close_env()
            self.open = False
        return int(success), obs

    def observe(self, render):
        if not render:
            return {"qpos": None, "images": None, "instruction": self.instruction}
        obs = self.env.get_obs()
        missing = [theirs for theirs in self.cameras.values() if theirs not in obs["observation"]]
        if missing:
            raise ValueError(
                f"the task config renders no {', '.join(missing)} (the checkpoint reads {', '.join(self.cameras)})"
            )
        images = {ours: obs["observation"][theirs]["rgb"] for ours, theirs in self.cameras.items()}
        qpos = np.asarray(obs["joint_action"]["vector"], dtype=np.float64)
        return {"qpos": qpos, "images": images, "instruction": self.instruction}

    def close(self):
        if self.open:
            self.env.close_env()


def resolve(factory):
    module, name = factory.split(":")
    return getattr(importlib.import_module(module), name)


def worker(conn, factory, kwargs, cameras):
    """One TASK_ENV process: answers ("reset", (seed, render)), ("step", (action, render)) and ("close", None)."""
    runner = None
    while True:
        command, payload = conn.recv()
        try:
            if command == "close":
                if runner is not None:
                    runner.close()
                return
            if runner is None:
                runner = TaskEnvRunner(*resolve(factory)(**kwargs), cameras)
            answer = runner.reset(*payload) if command == "reset" else runner.step(*payload)
            conn.send(("ok", answer))
        except Exception:
            conn.send(("error", traceback.format_exc()))


class RoboTwinPool:
    """n TASK_ENVs in spawned processes (SAPIEN and CUDA want a fresh process), with aloha/envs.py SimPool's calls:
    reset({env: seed}, render) and step({env: action}, render); success is stage 1."""

    max_stage = 1

    def __init__(self, n, root, task, task_config, cameras, factory=FACTORY):
        context = multiprocessing.get_context("spawn")
        self.n, self.cameras, self.conns, self.procs = n, cameras, [], []
        kwargs = dict(root=os.path.abspath(root), task=task, task_config=task_config)
        for _ in range(n):
            parent, child = context.Pipe()
            proc = context.Process(target=worker, args=(child, factory, kwargs, cameras), daemon=True)
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)

    def _call(self, command, payloads):
        for i, payload in payloads.items():
            self.conns[i].send((command, payload))
        answers = {}
        for i in payloads:
            status, value = self.conns[i].recv()
            if status == "error":
                raise RuntimeError(f"RoboTwin environment {i} failed:\n{value}")
            answers[i] = value
        return answers

    def reset(self, seeds, render):
        return self._call("reset", {i: (seed, render[i]) for i, seed in seeds.items()})

    def step(self, actions, render):
        return self._call("step", {i: (action, render[i]) for i, action in actions.items()})

    def close(self):
        for conn in self.conns:
            try:
                conn.send(("close", None))
            except OSError:
                pass
        for proc in self.procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
