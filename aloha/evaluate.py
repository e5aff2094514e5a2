"""
Closed-loop success of a nanoOFT checkpoint in the ALOHA simulator, on seeds recording never used.

$ python aloha/evaluate.py --checkpoint out/aloha/run/step_010000 --task transfer_cube --episodes 100 --seed 1000
$ python aloha/evaluate.py --checkpoint CKPT --execute 4             # re-plan every 4 steps (default: 8)
$ python aloha/evaluate.py --checkpoint CKPT --ensemble              # ACT's temporal ensembling, a chunk per step
$ python aloha/evaluate.py --checkpoint CKPT --baseline out/aloha/tc200   # also the blind baseline, same seeds
$ python aloha/evaluate.py --checkpoints out/aloha/run --episodes 20 [--watch]   # every step_*: a success curve

Each episode starts from gym-aloha's reset(seed) pose, runs up to 400 control steps (50 Hz) and stops at reward 4,
as gym-aloha's env terminates. --envs N simulators step in lockstep in worker processes (physics and rendering in
parallel) and the policy predicts one batch for all of them that need a chunk at that step; a frame is rendered
only when the policy reads one. Every episode's physics depend on its seed alone, so --envs changes the speed, not
the episodes (the batched forward agrees with a single one within 1e-5). Frames are rendered at the checkpoint's
training frame size with the scene settings its demos were recorded with (record.py's attributes, which training
keeps in args.json as episode_attrs: fast or stock rendering, camera zoom), so the policy sees what it was trained
on; the state is the simulator's agent_pos (qpos) when the checkpoint was trained with --proprio. A checkpoint trained
on where the objects start (--state_key observations/object_xy: a located policy) is given what a locator
(aloha/locate.py: --locator, or locator.pt beside the checkpoint) reads from each episode's first frame, held for the
episode; with --oracle, the simulator's own positions instead (what a perfect locator would give). One trained on
observations/qpos_object_xy is given the joint state followed by that reading.
The baseline replays the mean of the demonstrations' action trajectories open loop: what a policy that never looks
scores.
Writes OUT/report.json after every episode (settings, every episode, success rate with its 95% Wilson interval, the
rate of reaching each reward stage): the same command run again resumes the seeds still missing. It also writes
OUT/rollout_N_seedS.gif for the first --gif policy episodes. With --checkpoints RUN_DIR, each step_NNNNNN goes to
OUT/step_NNNNNN/ (OUT defaults to RUN_DIR/closed_loop) and RUN_DIR/success_curve.json (+ .png) gathers them.
"""

import argparse
import glob
import json
import math
import os
import sys
import time
from collections import deque

import h5py
import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import envs  # noqa: E402  (the same folder: sys.path[0] when run as a script)
import infer  # noqa: E402
import locate  # noqa: E402
import model  # noqa: E402
import record  # noqa: E402
import train  # noqa: E402
from progress import Progress  # noqa: E402

# ACT's layout names a camera by its dataset path
IMAGE_PREFIX = "observations/images/"
STAGES = {
    "transfer_cube": [
        "right gripper touches the cube",
        "cube lifted",
        "left gripper touches it",
        "handed over (success)",
    ],
    "insertion": [
        "both grippers touch their objects",
        "both lifted",
        "peg touches the socket",
        "peg touches the pin (success)",
    ],
}
# settings that must match for a report to be resumed or extended (a baseline added beside a policy's results)
SHARED_SETTINGS = ["task", "seeds", "steps", "zoom", "stock_render"]


def wilson(k, n, z=1.96):
    """95% Wilson score interval of k successes in n trials (sound at 0/n and n/n, unlike the normal one)."""
    if n == 0:
        return [0.0, 1.0]
    p, d = k / n, 1 + z * z / n
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    centre = (p + z * z / (2 * n)) / d
    return [max(0.0, centre - half), min(1.0, centre + half)]


def summarize(episodes):
    n, stages = len(episodes), [e["max_reward"] for e in episodes]
    k = sum(e["success"] for e in episodes)
    return {
        "success": k,
        "episodes": n,
        "success_rate": k / n if n else 0.0,
        "success_ci95": wilson(k, n),
        "stage_rates": {str(s): sum(r >= s for r in stages) / max(n, 1) for s in range(1, 5)},
        "stage_histogram": {str(s): stages.count(s) for s in range(5)},
    }


# -----------------------------------------------------------------------------
# what the checkpoint needs from the simulator


def sim_cameras(task):
    physics, _ = record.make_sim(task)
    return record.camera_names(physics), physics


def check_policy_inputs(train_args, ckpt, task):
    """One-line errors for a checkpoint the simulator cannot feed, before the model is loaded.
    Returns {checkpoint camera: (simulator camera, (H, W))}."""
    names, physics = sim_cameras(task)
    limit = (physics.model.vis.global_.offheight, physics.model.vis.global_.offwidth)
    out = {}
    for cam in train_args["cameras"].split(","):
        sim_name = cam[len(IMAGE_PREFIX) :] if cam.startswith(IMAGE_PREFIX) else None
        if sim_name not in names:
            have = ", ".join(IMAGE_PREFIX + n for n in names)
            sys.exit(
                f"error: checkpoint {ckpt} needs camera {cam!r}, which the simulator does not render (it has {have})"
            )
        size = tuple(train_args["frame_sizes"][cam])
        if size[0] > limit[0] or size[1] > limit[1]:
            sys.exit(
                f"error: checkpoint {ckpt} was trained on {cam} frames of {size[0]}x{size[1]}, larger than the "
                f"simulator renders ({limit[0]}x{limit[1]})"
            )
        out[cam] = (sim_name, size)
    if train_args["action_dim"] != 14:
        sys.exit(f"error: checkpoint {ckpt} predicts {train_args['action_dim']} action dimensions; ALOHA takes 14")
    return out


# the states of a located policy: where the task's objects start (record.py stores it; aloha/locate.py reads it),
# alone or after the joint state (record.py stores that too: the joint state is what made insertion precise)
LOCATED_KEY = "observations/object_xy"
QPOS_LOCATED_KEY = "observations/qpos_object_xy"
STATE_KEYS = ("observations/qpos", LOCATED_KEY, QPOS_LOCATED_KEY)


def state_reader(train_args, args, ckpt, cameras, scene):
    """What the checkpoint is given as its state: -> (state(observation, episode), or None without --proprio; the
    source's name for the report). The simulator's joint state; for a located checkpoint where the objects start,
    read once per episode (from its first frame by the locator, or from the simulator with --oracle), after the
    joint state for one trained on QPOS_LOCATED_KEY."""
    key = train_args.get("state_key")
    located = train_args.get("proprio") and key in (LOCATED_KEY, QPOS_LOCATED_KEY)
    if (args.locator or args.oracle) and not located:
        sys.exit(
            f"error: --locator and --oracle are for a checkpoint trained on {LOCATED_KEY} or {QPOS_LOCATED_KEY}; "
            f"{ckpt} is not"
        )
    if not train_args.get("proprio"):
        return None, "none"
    if key not in STATE_KEYS:
        sys.exit(f"error: checkpoint {ckpt} takes {key} as its state; the simulator gives {', '.join(STATE_KEYS)}")
    if not located:
        return qpos_state, "qpos"
    where, name = start_reader(key, args, ckpt, cameras, scene)
    if key == QPOS_LOCATED_KEY:
        return after_qpos(where), "qpos + " + name
    return where, name


def start_reader(key, args, ckpt, cameras, scene):
    """Where the objects start, held per episode: -> (state(observation, episode), the source's name). The
    simulator's positions (--oracle) or the locator's reading of the first frame; refuses a locator that reads
    another task, camera, frame size or scene than this evaluation renders."""
    if args.oracle:
        return held(lambda obs, seed: record.object_xy(args.task, record.object_pose(args.task, seed))), "oracle"
    path = args.locator or os.path.join(ckpt, "locator.pt")
    if not os.path.exists(path):
        sys.exit(
            f"error: checkpoint {ckpt} is told where the objects start ({key}): give --locator (written by "
            "aloha/locate.py), or --oracle for the simulator's positions"
        )
    try:
        net, saved = locate.load(path)
    except ValueError as e:
        sys.exit(f"error: --locator {e}")
    camera, size = IMAGE_PREFIX + saved["camera"], tuple(saved["size"])
    if saved["task"] != args.task:
        sys.exit(f"error: --locator {path} reads {saved['task']} scenes, not {args.task}")
    if camera not in cameras or cameras[camera][1] != size:
        sees = ", ".join(f"{c} {h}x{w}" for c, (_, (h, w)) in cameras.items())
        sys.exit(f"error: --locator {path} reads {camera} {size[0]}x{size[1]}; checkpoint {ckpt} sees {sees}")
    if (saved["zoom"], saved["fast_render"]) != (scene[0], not scene[1]):
        sys.exit(
            f"error: --locator {path} read scenes of zoom {saved['zoom']}, fast render {saved['fast_render']}; this "
            f"evaluation renders zoom {scene[0]}, fast render {not scene[1]}"
        )

    @torch.no_grad()
    def read(obs, seed):
        return net(torch.from_numpy(np.ascontiguousarray(obs["images"][camera][None])))[0].numpy()

    error = ", ".join(f"{name} {e['mean']} cm" for name, e in saved["val_error_cm"].items())
    return held(read), f"locator {os.path.realpath(path)} ({error})"


def after_qpos(where):
    """The joint state, then where the objects start: the state of a checkpoint trained on QPOS_LOCATED_KEY."""

    def state(obs, episode):
        return np.concatenate([obs["qpos"], where(obs, episode)]).astype(np.float32)

    return state


def qpos_state(obs, episode):
    """The simulator's joint state, what a --proprio checkpoint trained on observations/qpos is given."""
    return obs["qpos"]


def held(read):
    """A state read at an episode's first step, read(observation, seed), and held for the rest of it."""

    def state(obs, episode):
        if episode.held_state is None:
            episode.held_state = read(obs, episode.seed)
        return episode.held_state

    return state


def as_set(value):
    """An episode attribute as args.json keeps it: one value (all episodes agree) or a list of the distinct ones."""
    if value is None:
        return set()
    return set(value) if isinstance(value, list) else {value}


def scene_settings(train_args, args, ckpt):
    """(zoom, stock render, the seeds of the training demos) from the episode attributes the checkpoint recorded.
    --zoom / --stock_render override; demos of mixed zooms need --zoom."""
    attrs = train_args.get("episode_attrs", {})
    if not attrs.get("sim"):
        print(f"note: {ckpt} was not trained on record.py's demos: stock view, fast render unless told otherwise")
    task = attrs.get("task")
    if task is not None and task != args.task:
        print(f"warning: {ckpt} was trained on {task} demos, evaluated on {args.task}")
    zooms = as_set(attrs.get("zoom"))
    if args.zoom is None and len(zooms) > 1:
        sys.exit(f"error: checkpoint {ckpt}'s demos mix zooms {sorted(zooms)}: give --zoom")
    zoom = args.zoom if args.zoom is not None else next(iter(zooms), 1.0)
    stock = args.stock_render or as_set(attrs.get("render")) == {"stock"}
    return zoom, stock, as_set(attrs.get("seed"))


def mean_demonstration(demos_dir, task):
    """The mean of the demonstrations' action trajectories (to the shortest one's length). Only record.py's
    simulator demos of this task qualify: another robot's episodes would make a meaningless baseline."""
    actions = []
    try:
        paths = data.list_episodes(demos_dir)
    except data.DataError as e:
        sys.exit(f"error: --baseline {e}")
    for p in paths:
        with h5py.File(data.split_ref(p)[0], "r") as f:
            if not f.attrs.get("sim", False) or "task" not in f.attrs:
                sys.exit(f"error: --baseline {p}: not a simulator demo of record.py (no sim/task attributes)")
            if f.attrs["task"] != task:
                sys.exit(f"error: --baseline {p}: a {f.attrs['task']} demonstration, not {task}")
            if "action" not in f or f["action"].ndim != 2 or f["action"].shape[1] != 14:
                sys.exit(f"error: --baseline {p}: needs an action dataset of shape (T, 14)")
            actions.append(f["action"][()])
    n = min(len(a) for a in actions)
    return np.mean([a[:n] for a in actions], axis=0), len(actions)


# -----------------------------------------------------------------------------
# episodes in lockstep


def annotate(frame, text):
    image = Image.fromarray(frame)
    image.thumbnail((320, 320))
    ImageDraw.Draw(image).text((4, 4), text, fill=(255, 255, 0))
    return image


def write_gif(frames, path):
    # 2 steps of 20 ms a frame: real time
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=40, loop=0)


class Episode:
    """One running episode of an environment: its seed, steps, best reward stage and GIF frames."""

    def __init__(self, index, seed, gif):
        self.index, self.seed, self.t, self.best, self.t0 = index, seed, 0, 0, time.time()
        self.gif = [] if gif else None
        self.chunk_seconds = []
        # a located policy's state, read at the first step (evaluate.held)
        self.held_state = None

    def result(self):
        r = {"seed": self.seed, "max_reward": int(self.best), "success": self.best == 4, "steps": self.t}
        r["seconds"] = round(time.time() - self.t0, 2)
        if self.chunk_seconds:
            # the first chunk of a run warms up
            r["ms_per_chunk"] = round(1000 * float(np.mean(self.chunk_seconds[1:] or self.chunk_seconds)), 1)
        return r


def run_episodes(seeds, pool, act, needs_frames, args, gifs=0, on_done=None):
    """Every seed's episode, pool.n at a time in lockstep: act(observations, envs) -> {env: action} for the running
    environments; needs_frames() -> per environment, whether act reads its frames at the next step. Calls
    on_done(result, episode) as each ends (reward 4 or --steps). -> the results, in the order they ended."""
    pending, running, results = deque(enumerate(seeds)), {}, []
    gif_camera = next(iter(pool.cameras))

    def start(envs_free):
        starts = {}
        for i in envs_free:
            if pending:
                index, seed = pending.popleft()
                running[i] = Episode(index, seed, index < gifs)
                starts[i] = seed
        return pool.reset(starts, {i: True for i in starts})

    observations = start(range(pool.n))
    while running:
        for i, episode in running.items():
            if episode.gif is not None and observations[i]["images"] and episode.t % 2 == 0:
                frame = observations[i]["images"][gif_camera]
                episode.gif.append(annotate(frame, f"seed {episode.seed}  t {episode.t}  stage {episode.best}"))
        actions = act(observations, running)
        need = needs_frames()
        # GIF episodes (the first few) render every step: their last frame shows how they ended
        render = {i: need[i] or running[i].gif is not None for i in running}
        stepped = pool.step(actions, render)
        observations = {}
        finished = []
        for i, (reward, obs) in stepped.items():
            episode = running[i]
            episode.t += 1
            episode.best = max(episode.best, reward)
            observations[i] = obs
            if reward == 4 or episode.t >= args.steps:
                finished.append(i)
        for i in finished:
            episode = running.pop(i)
            if episode.gif is not None:
                frame = observations[i]["images"][gif_camera]
                episode.gif.append(annotate(frame, f"seed {episode.seed}  t {episode.t}  stage {episode.best}"))
            result = episode.result()
            results.append(result)
            if on_done:
                on_done(result, episode)
        observations |= start(finished)
    return results


def policy_actor(policy, instruction, state, n):
    """act(observations, running) for run_episodes: one batched Policy.act over all environments (an environment
    without frames this step, or without an episode, is given None and skipped), timing each chunk it predicts.
    state(observation, episode) -> the state policy is given (state_reader), or None for none."""
    policy.reset(envs=n)
    started = {}

    def act(observations, running):
        images, states = [None] * n, [None] * n
        for i, episode in running.items():
            images[i] = observations[i]["images"]
            states[i] = state(observations[i], episode) if state else None
        for i, episode in running.items():
            # a new episode in this environment: its old plan must go
            if started.get(i) is not episode:
                policy.forget(i)
                started[i] = episode
        t0 = time.perf_counter()
        actions = policy.act(images, instruction, states)
        seconds = time.perf_counter() - t0
        predicted = [i for i in running if policy.last_chunks[i] is not None]
        for i in predicted:
            running[i].chunk_seconds.append(seconds)
        return {i: actions[i] for i in running}

    return act


def baseline_actor(mean):
    def act(observations, running):
        return {i: mean[min(episode.t, len(mean) - 1)] for i, episode in running.items()}

    return act


# -----------------------------------------------------------------------------
# reports that survive an interruption


def load_report(path, settings, entry, what, overwrite):
    """The report to continue: the one in OUT when its shared settings and this entry's subject agree (its other
    entry, a policy's results beside a baseline's, is kept); a new one otherwise, or a refusal in one line."""
    if overwrite or not os.path.exists(path):
        return {"settings": settings}
    try:
        with open(path) as f:
            report = json.load(f)
        saved = report["settings"]
    except (OSError, ValueError, KeyError) as e:
        sys.exit(f"error: --out {os.path.dirname(path)}: its report.json does not read ({e}): pass --overwrite")
    differ = [k for k in SHARED_SETTINGS if saved.get(k) != settings.get(k)]
    if entry in report and report[entry].get("what") != what:
        differ.append(f"{entry} ({report[entry].get('what')})")
    if differ:
        sys.exit(
            f"error: --out {os.path.dirname(path)} holds another evaluation (it differs in {', '.join(differ)}): "
            "pass another --out, or --overwrite to replace it"
        )
    # the settings stay those of the first evaluation written there; each entry's own subject is its "what"
    return report


def save_report(report, path):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, path)


def evaluate_entry(report, entry, what, seeds, pool, act, needs_frames, args, gifs, name):
    """Run the seeds this entry of the report still misses, saving the report after every episode, a line with an
    ETA per episode (a bar above them on a terminal)."""
    path = os.path.join(args.out, "report.json")
    done = report.get(entry, {}).get("per_episode", [])
    todo = [s for s in seeds if s not in {e["seed"] for e in done}]
    if done:
        print(f"{name}: {len(done)} of {len(seeds)} episodes already in {path}, resuming")

    def on_done(result, episode):
        done.append(result)
        report[entry] = summarize(done) | {"what": what, "per_episode": sorted(done, key=lambda e: e["seed"])}
        save_report(report, path)
        if episode.gif:
            gif_path = os.path.join(args.out, f"rollout_{episode.index}_seed{episode.seed}.gif")
            write_gif(episode.gif, gif_path)
            progress.write(f"wrote {gif_path}")
        k = sum(e["success"] for e in done)
        chunk = f"{result['ms_per_chunk']} ms per chunk | " if "ms_per_chunk" in result else ""
        outcome = "success" if result["success"] else "failure"
        progress.update(
            line=f"{name} | seed {result['seed']} | stage {result['max_reward']} | {outcome} | {result['steps']} "
            f"steps | {chunk}{result['seconds']} s | {k}/{len(done)} so far"
        )

    with Progress(total=len(seeds), done=len(seeds) - len(todo), unit="episode") as progress:
        if todo:
            run_episodes(todo, pool, act, needs_frames, args, gifs, on_done)
    return report


def print_summary(report):
    for name in ("policy", "baseline"):
        if name in report:
            s, (lo, hi) = report[name], report[name]["success_ci95"]
            print(
                f"{name}: {s['success']}/{s['episodes']} = {100 * s['success_rate']:.0f}% success "
                f"(95% CI {100 * lo:.0f}-{100 * hi:.0f}%) | reached stage 1-4: "
                + " ".join(f"{100 * v:.0f}%" for v in s["stage_rates"].values())
            )


# -----------------------------------------------------------------------------
# one checkpoint, or every checkpoint of a run


def evaluate_checkpoint(ckpt, args, seeds, out, baseline=None):
    """The policy (and, if asked, the blind baseline) on the seeds, into out/report.json. -> the report."""
    settings = {k: v for k, v in vars(args).items() if k not in ("checkpoints", "watch", "patience", "overwrite")}
    settings |= {"checkpoint": ckpt, "out": out, "seeds": seeds, "stages": STAGES[args.task]}
    args = argparse.Namespace(**vars(args) | {"out": out})
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "report.json")
    report = None
    # never more simulators than episodes: each is a process that imports MuJoCo (seconds of start-up for nothing)
    n_envs = min(args.envs, len(seeds))
    if ckpt:
        train_args = model.check_checkpoint(ckpt)
        cameras = check_policy_inputs(train_args, ckpt, args.task)
        instruction = args.instruction or train_args.get("instruction")
        if not instruction:
            sys.exit(f"error: checkpoint {ckpt} records no instruction: give --instruction")
        zoom, stock, demo_seeds = scene_settings(train_args, args, ckpt)
        settings |= {"zoom": zoom, "stock_render": stock, "instruction": instruction}
        settings |= {"cameras": {c: list(size) for c, (_, size) in cameras.items()}, "train_args": train_args}
        reused = sorted(demo_seeds & set(seeds))
        if reused:
            span = f"{reused[0]}..{reused[-1]}"
            print(f"warning: {len(reused)} of these seeds ({span}) made the checkpoint's training demos: not unseen")
        state, state_what = state_reader(train_args, args, ckpt, cameras, (zoom, stock))
        what = f"{os.path.realpath(ckpt)}, execute {args.execute}, ensemble {args.ensemble}, {instruction!r}"
        what += f", state {state_what}"
        report = load_report(path, settings, "policy", what, args.overwrite)
        print(f"camera zoom {zoom}, {'stock' if stock else 'fast'} render ({ckpt}'s demos)")
        with envs.SimPool(n_envs, args.task, cameras, not stock, zoom) as pool:
            policy = infer.Policy.from_checkpoint(
                ckpt, device=args.device, vla_path=args.vla_path, execute=args.execute, ensemble=args.ensemble
            )
            act = policy_actor(policy, instruction, state, n_envs)
            report = evaluate_entry(
                report, "policy", what, seeds, pool, act, policy.needs_frames, args, args.gif, "policy"
            )
    if baseline is not None:
        mean, n_demos = baseline
        what = f"mean action trajectory of {n_demos} demos in {os.path.realpath(args.baseline)}, open loop"
        if not ckpt:
            settings["zoom"] = args.zoom if args.zoom is not None else 1.0
        report = report or load_report(path, settings, "baseline", what, args.overwrite)
        gif_camera = {"top": ("top", (240, 320))}
        with envs.SimPool(n_envs, args.task, gif_camera, True, 1.0) as pool:

            def no_frames():
                return [False] * n_envs

            report = evaluate_entry(
                report, "baseline", what, seeds, pool, baseline_actor(mean), no_frames, args, 0, "baseline"
            )
    return report


def evaluate_run(args, seeds):
    """Every step_* of --checkpoints on the same seeds (with --watch each new one as it lands, until the run's last
    step), then the success-vs-step curve beside the run's metrics.jsonl."""
    run_dir = args.checkpoints
    out = args.out or os.path.join(run_dir, "closed_loop")
    done, tracker = {}, None
    while True:
        found = sorted(glob.glob(os.path.join(run_dir, "step_[0-9]*")))
        found = [d for d in found if os.path.basename(d)[5:].isdecimal()]
        if not found and not args.watch:
            sys.exit(f"error: --checkpoints {run_dir}: no step_NNNNNN checkpoints there")
        for ckpt in found:
            if ckpt in done:
                continue
            name = os.path.basename(ckpt)
            print(f"== {name}")
            done[ckpt] = evaluate_checkpoint(ckpt, args, seeds, os.path.join(out, name))
            write_curve(run_dir, done)
            if tracker is None:
                tracker = open_tracker(ckpt, run_dir)
            if tracker:
                tracker({"step": int(name[5:]), "closed_loop_success": done[ckpt]["policy"]["success_rate"]})
        last = max_steps(found)
        if not args.watch or (last is not None and any(d.endswith(f"step_{last:06d}") for d in done)):
            break
        # a run that died leaves no last checkpoint: give up after --patience minutes without a new one
        if time.time() - newest(found, run_dir) > 60 * args.patience:
            print(f"no new checkpoint in {run_dir} for {args.patience} minutes: stopping")
            break
        time.sleep(30)
    print(f"success curve: {os.path.join(run_dir, 'success_curve.json')}")


def open_tracker(ckpt, run_dir):
    """The success rates go where the run logs (train.py --log): its TensorBoard directory, or a W&B run of their
    own beside the run's. None when it logs to metrics.jsonl alone."""
    run = model.check_checkpoint(ckpt)
    if run.get("log", "none") == "none":
        return None
    return train.open_tracker(run["log"], run_dir, run | {"closed_loop": True})


def newest(found, run_dir):
    """When the run last showed life: its newest checkpoint's time, else the run directory's."""
    return max([os.path.getmtime(d) for d in found] + [os.path.getmtime(run_dir)])


def max_steps(found):
    """The run's last step, from a checkpoint's args.json (None while there is none)."""
    if not found:
        return None
    with open(os.path.join(found[-1], "args.json")) as f:
        return json.load(f)["max_steps"]


def write_curve(run_dir, reports):
    """success_curve.json (and .png, drawn by plot.py when matplotlib is installed) beside metrics.jsonl."""
    steps = sorted(reports, key=lambda d: int(os.path.basename(d)[5:]))
    curve = {
        "steps": [int(os.path.basename(d)[5:]) for d in steps],
        "success_rate": [reports[d]["policy"]["success_rate"] for d in steps],
        "ci95": [reports[d]["policy"]["success_ci95"] for d in steps],
        "episodes": [reports[d]["policy"]["episodes"] for d in steps],
        "seeds": reports[steps[0]]["settings"]["seeds"],
    }
    path = os.path.join(run_dir, "success_curve.json")
    save_report(curve, path)
    try:
        import plot

        plot.plot_run(run_dir, os.path.join(run_dir, "success_curve.png"))
    except ImportError as e:
        print(f"note: no success_curve.png ({e}): pip install -r requirements-plot.txt")
    except plot.PlotError as e:
        print(f"note: no success_curve.png: {e}")


# -----------------------------------------------------------------------------


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="a step_NNNNNN directory or a merged export")
    p.add_argument("--checkpoints", metavar="RUN_DIR", help="every step_NNNNNN of a training run, on the same seeds")
    p.add_argument("--watch", action="store_true", help="with --checkpoints: wait for new ones until the last step")
    p.add_argument(
        "--patience", type=float, default=60, help="--watch: minutes without a new checkpoint before it stops"
    )
    p.add_argument("--task", default="transfer_cube", help=" or ".join(record.TASKS))
    p.add_argument(
        "--episodes",
        type=int,
        default=100,
        help="seeds --seed, --seed+1, ... (50 alone mislead: one checkpoint scored 20%% on seeds 1000-1049 and 6%% "
        "on 1050-1099)",
    )
    p.add_argument("--seed", type=int, default=1000, help="first seed (record.py starts at 0: these are unseen)")
    p.add_argument("--steps", type=int, default=record.EPISODE_LEN, help="control steps per episode at most")
    p.add_argument(
        "--envs",
        type=int,
        default=default_envs(),
        help="simulators stepping in parallel (default: 4 a core; never more than --episodes)",
    )
    p.add_argument("--execute", type=int, default=8, help="actions executed per chunk before re-planning")
    p.add_argument("--ensemble", action="store_true", help="temporal ensembling over overlapping chunks (ACT)")
    p.add_argument(
        "--locator",
        help=f"a located checkpoint's (trained on {LOCATED_KEY}) aloha/locate.py file; default: CKPT/locator.pt",
    )
    p.add_argument("--oracle", action="store_true", help="a located checkpoint told the simulator's true positions")
    p.add_argument("--instruction", help="default: the one the checkpoint was trained with")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--vla_path", help="base model, overriding the one named in the checkpoint's args.json")
    p.add_argument(
        "--baseline",
        metavar="DEMOS_DIR",
        help="also replay these demonstrations' mean action trajectory open loop on the same seeds",
    )
    p.add_argument("--gif", type=int, default=2, help="write an animated GIF of the first N policy episodes")
    p.add_argument("--stock_render", action="store_true", help="render the stock scene (default: as the demos were)")
    p.add_argument("--zoom", type=float, help="camera zoom (record.py --zoom); default: the training demos'")
    p.add_argument("--out", help="default: out/aloha/eval (with --checkpoints: RUN_DIR/closed_loop)")
    p.add_argument("--overwrite", action="store_true", help="replace a report in --out that holds another evaluation")
    return p.parse_args(argv)


def default_envs():
    return 4 * len(os.sched_getaffinity(0))


def check_args(args):
    """One line for each kind of bad input, before any simulator or model starts."""
    if args.task not in record.TASKS:
        sys.exit(f"error: --task {args.task!r}: unknown task; use {', '.join(record.TASKS)}")
    if not (args.checkpoint or args.checkpoints or args.baseline):
        sys.exit("error: nothing to evaluate: give --checkpoint, --checkpoints, --baseline or a mix")
    if args.checkpoint and args.checkpoints:
        sys.exit("error: give --checkpoint (one) or --checkpoints (a run's), not both")
    if args.watch and not args.checkpoints:
        sys.exit("error: --watch goes with --checkpoints RUN_DIR")
    for flag in ("episodes", "steps", "execute", "envs"):
        if getattr(args, flag) < 1:
            sys.exit(f"error: --{flag} {getattr(args, flag)}: must be at least 1")
    if args.zoom is not None:
        record.check_zoom(args.zoom)
    if args.checkpoint and not os.path.isfile(os.path.join(args.checkpoint, "args.json")):
        inside = sorted(glob.glob(os.path.join(args.checkpoint, "step_[0-9]*")))
        if inside:
            names = f"{os.path.basename(inside[0])}..{os.path.basename(inside[-1])}"
            sys.exit(
                f"error: --checkpoint {args.checkpoint} is a training run holding {names}: pass one of them, or "
                f"--checkpoints {args.checkpoint} for all"
            )
    if args.checkpoints and not os.path.isdir(args.checkpoints):
        sys.exit(f"error: --checkpoints {args.checkpoints}: not a directory")
    if args.checkpoint:
        try:
            model.check_checkpoint(args.checkpoint)
        except (OSError, ValueError) as e:
            sys.exit(f"error: --checkpoint {e}")


def main(argv=None):
    args = get_args(argv)
    check_args(args)
    seeds = list(range(args.seed, args.seed + args.episodes))
    # the free cores, not torch's default of every core: the simulators take their turn between forward passes
    torch.set_num_threads(infer.cpu_threads())
    if args.checkpoints:
        evaluate_run(args, seeds)
        return
    baseline = mean_demonstration(args.baseline, args.task) if args.baseline else None
    out = args.out or "out/aloha/eval"
    report = evaluate_checkpoint(args.checkpoint, args, seeds, out, baseline)
    print_summary(report)
    print(f"report: {os.path.join(out, 'report.json')}")


if __name__ == "__main__":
    main()
