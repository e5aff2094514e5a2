"""
ALOHA simulators in worker processes, stepped in lockstep: the physics and rendering of N environments run in
parallel while the policy predicts for all of them in one batch (evaluate.py, rl.py).

    pool = SimPool(4, "transfer_cube", {"observations/images/top": ("top", (240, 320))})
    obs = pool.reset({0: 1000, 1: 1001}, render={0: True, 1: True})   # {env: {"qpos": (14,), "images": {...}}}
    out = pool.step({0: action0, 1: action1}, render={0: True, 1: False})   # {env: (reward, obs)}; images None
    pool.close()

Each episode gets a fresh simulator, as evaluate.py's single-process loop made one, so that an episode's physics
depend on its seed alone, not on which worker ran it or what ran before: --envs 1 and --envs N step every episode
through the same states. Frames are rendered only when asked (the policy needs one, or a GIF does).
"""

import multiprocessing
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import record  # noqa: E402  (the same folder)


def observe(physics, task_obj, cameras, render):
    """The joint state and, if asked, every camera's frame (HxWx3 uint8) at the training size."""
    images = None
    if render:
        images = {cam: record.render(physics, size, name) for cam, (name, size) in cameras.items()}
    return {"qpos": task_obj.get_qpos(physics), "images": images}


def worker(conn, task, cameras, fast_render, zoom):
    """One simulator process: answers ("reset", (seed, render)), ("step", (action, render)) and ("close", None)."""
    physics = task_obj = None
    while True:
        command, payload = conn.recv()
        try:
            if command == "close":
                return
            if command == "reset":
                seed, render = payload
                physics, task_obj = record.make_sim(task, fast_render=fast_render, zoom=zoom)
                record.reset(physics, task_obj, record.object_pose(task, seed))
                conn.send(("ok", observe(physics, task_obj, cameras, render)))
            else:
                action, render = payload
                reward = record.step(physics, task_obj, action)
                conn.send(("ok", (reward, observe(physics, task_obj, cameras, render))))
        except Exception:
            conn.send(("error", traceback.format_exc()))


class SimPool:
    """n simulators of one task, each in its own process; reset and step address them by index (0..n-1), and the
    ones addressed in one call run in parallel."""

    def __init__(self, n, task, cameras, fast_render=True, zoom=1.0):
        # spawn, not fork: a forked child of a process that has rendered (an EGL context) or runs torch's threads
        # can hang; a spawned one imports the simulator afresh (a second or two, once per pool)
        context = multiprocessing.get_context("spawn")
        self.n, self.cameras, self.conns, self.procs = n, cameras, [], []
        for _ in range(n):
            parent, child = context.Pipe()
            proc = context.Process(target=worker, args=(child, task, cameras, fast_render, zoom), daemon=True)
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)

    def _call(self, command, payloads):
        """Send each addressed worker its payload, then collect the answers: {env: answer}."""
        for i, payload in payloads.items():
            self.conns[i].send((command, payload))
        answers = {}
        for i in payloads:
            status, value = self.conns[i].recv()
            if status == "error":
                raise RuntimeError(f"simulator {i} failed:\n{value}")
            answers[i] = value
        return answers

    def reset(self, seeds, render):
        """New episodes: {env: seed} -> {env: observation}."""
        return self._call("reset", {i: (seed, render[i]) for i, seed in seeds.items()})

    def step(self, actions, render):
        """One 50 Hz control step: {env: 14 joint targets} -> {env: (reward, observation)}."""
        return self._call("step", {i: (action, render[i]) for i, action in actions.items()})

    def close(self):
        for conn in self.conns:
            try:
                conn.send(("close", None))
            except OSError:
                pass
        for proc in self.procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
