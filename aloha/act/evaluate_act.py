"""
Closed-loop success of a LeRobot ACT checkpoint (train_act.sh) in the ALOHA simulator, rendered and scored exactly
as aloha/evaluate.py scores nanoOFT, so that aloha/compare.py pairs the two reports seed by seed. Runs in the lerobot
venv (aloha/act/README.md):

$ /work/lerobot-venv/bin/python aloha/act/evaluate_act.py --checkpoint out/act/run/checkpoints/last/pretrained_model \
      --episodes 100 --seed 1000 --out out/act/eval
$ ... --ensemble          # ACT's temporal ensembling (coefficient 0.01): a chunk every step, 1 action executed
$ ... --execute 50        # re-plan every 50 steps (default: the checkpoint's n_action_steps, 100)
$ python aloha/compare.py out/aloha/eval/report.json out/act/eval/report.json          # in the project's venv

Each episode starts from gym-aloha's reset(seed) pose (record.py's make_sim/reset/step, the simulator aloha/evaluate.py
steps), runs up to 400 control steps (50 Hz) and stops at reward 4 (success). The policy sees the top camera rendered
at the checkpoint's input size (240x320 for record.py's demos) with the scene settings the training demos were
recorded with (record.py's fast render, zoom 1: read from the data set's meta/nanooft_episodes.json, which
to_lerobot.py writes; --zoom and --stock_render override), and the joint state (agent_pos = qpos) as
observation.state. Frames and states go through LeRobot's own preprocess_observation and the checkpoint's saved
pre- and post-processors (normalization), the chunks come from ACTPolicy.predict_action_chunk, and --ensemble
averages them with LeRobot's ACTTemporalEnsembler, one per environment: what ACTPolicy.select_action does for one
environment, kept per environment so that --envs N simulators (aloha/envs.py SimPool, in worker processes) can start
and end episodes independently while the policy predicts one batch for all that need a chunk.
Writes OUT/report.json after every episode in aloha/evaluate.py's format (settings.task, settings.seeds,
policy.per_episode with seed, max_reward, success, steps; the success rate with its 95% Wilson interval and the rate
of reaching each reward stage); the same command run again resumes the seeds still missing. Also writes
OUT/rollout_N_seedS.gif for the first --gif episodes.
"""

import argparse
import json
import math
import os
import sys
import time
from collections import deque

import numpy as np
import torch
from PIL import Image, ImageDraw

ALOHA = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ALOHA)
import envs  # noqa: E402  (aloha/envs.py: simulators in worker processes; imports only record.py)
import record  # noqa: E402

CAMERA = "observation.images.top"
STATE = "observation.state"
ENSEMBLE_COEFF = 0.01  # ACT's temporal ensembling weight, exp(-0.01 i) for the i-th oldest prediction
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
SHARED_SETTINGS = ["task", "seeds", "steps", "zoom", "stock_render"]


# -----------------------------------------------------------------------------
# aloha/evaluate.py's summary (copied: evaluate.py imports the nanoOFT core, which this venv does not have)


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
# the checkpoint


def find_checkpoint(path):
    """The pretrained_model directory inside what was given: itself, a checkpoint step, or a training run's last."""
    for candidate in (
        path,
        os.path.join(path, "pretrained_model"),
        os.path.join(path, "checkpoints/last/pretrained_model"),
    ):
        if os.path.isfile(os.path.join(candidate, "config.json")) and os.path.isfile(
            os.path.join(candidate, "model.safetensors")
        ):
            return candidate
    sys.exit(f"error: --checkpoint {path}: no config.json and model.safetensors there (a LeRobot pretrained_model)")


def load_config(ckpt, args):
    """The checkpoint's ACTConfig with --execute / --ensemble applied; one line for what the simulator cannot feed.
    -> (config, (H, W) of the camera)."""
    from lerobot.configs.policies import PreTrainedConfig
    from lerobot.policies.act.configuration_act import ACTConfig  # noqa: F401  (registers the "act" type)

    config = PreTrainedConfig.from_pretrained(ckpt)
    if config.type != "act":
        sys.exit(f"error: --checkpoint {ckpt}: a {config.type!r} policy, not LeRobot's ACT")
    inputs, outputs = config.input_features, config.output_features
    images = [k for k in inputs if k.startswith("observation.image")]
    if images != [CAMERA]:
        sys.exit(f"error: --checkpoint {ckpt} reads cameras {images}; the simulator renders only {CAMERA}")
    if STATE in inputs and tuple(inputs[STATE].shape) != (14,):
        sys.exit(f"error: --checkpoint {ckpt}: {STATE} of shape {inputs[STATE].shape}, ALOHA's is (14,)")
    if tuple(outputs["action"].shape) != (14,):
        sys.exit(f"error: --checkpoint {ckpt} predicts actions of shape {outputs['action'].shape}; ALOHA takes 14")
    if args.ensemble:
        config.temporal_ensemble_coeff, config.n_action_steps = ENSEMBLE_COEFF, 1
    elif args.execute:
        if args.execute > config.chunk_size:
            sys.exit(f"error: --execute {args.execute}: more than the checkpoint's chunk of {config.chunk_size}")
        config.n_action_steps = args.execute
    config.device = "cpu"
    _, height, width = inputs[CAMERA].shape
    return config, (height, width)


def training_demos(ckpt):
    """record.py's attributes of the demos the checkpoint was trained on ([] when they cannot be found): from the
    data set's meta/nanooft_episodes.json, which to_lerobot.py writes, found through train_config.json."""
    try:
        with open(os.path.join(ckpt, "train_config.json")) as f:
            root = json.load(f)["dataset"]["root"]
        # train_act.sh runs from the repository root, so a relative root is relative to it
        with open(os.path.join(os.path.dirname(ALOHA), root, "meta", "nanooft_episodes.json")) as f:
            return json.load(f)
    except (OSError, ValueError, KeyError, TypeError):
        return []


def scene_settings(demos, args, ckpt):
    """(zoom, stock render) as the training demos were recorded, unless --zoom / --stock_render say otherwise."""
    if not demos:
        print(f"note: the demos of {ckpt} are not found: zoom 1 and the fast render unless told otherwise")
    zooms = {d.get("zoom", 1.0) for d in demos}
    if args.zoom is None and len(zooms) > 1:
        sys.exit(f"error: checkpoint {ckpt}'s demos mix zooms {sorted(zooms)}: give --zoom")
    tasks = {d.get("task") for d in demos} - {None}
    if tasks and tasks != {args.task}:
        print(f"warning: {ckpt} was trained on {', '.join(sorted(tasks))} demos, evaluated on {args.task}")
    zoom = args.zoom if args.zoom is not None else next(iter(zooms), 1.0)
    stock = args.stock_render or {d.get("render") for d in demos} == {"stock"}
    return zoom, stock


def load_policy(ckpt, config):
    """ACTPolicy with the checkpoint's weights, and its saved pre- and post-processors (normalization)."""
    from lerobot.policies.act.modeling_act import ACTPolicy
    from lerobot.policies.factory import make_pre_post_processors

    policy = ACTPolicy.from_pretrained(ckpt, config=config)
    policy.eval()
    preprocessor, postprocessor = make_pre_post_processors(config, pretrained_path=ckpt)
    return policy, preprocessor, postprocessor


# -----------------------------------------------------------------------------
# episodes in lockstep


class Episode:
    """One running episode of an environment: its seed, steps, best reward stage, plan and GIF frames."""

    def __init__(self, index, seed, gif, ensembler):
        self.index, self.seed, self.t, self.best, self.t0 = index, seed, 0, 0, time.time()
        self.gif = [] if gif else None
        self.queue = deque()
        self.ensembler = ensembler
        self.chunk_seconds = []

    def needs_chunk(self):
        return self.ensembler is not None or not self.queue

    def result(self):
        r = {"seed": self.seed, "max_reward": int(self.best), "success": self.best == 4, "steps": self.t}
        r["seconds"] = round(time.time() - self.t0, 2)
        if self.chunk_seconds:
            # the first chunk of a run warms up (as aloha/evaluate.py counts it)
            r["ms_per_chunk"] = round(1000 * float(np.mean(self.chunk_seconds[1:] or self.chunk_seconds)), 1)
        return r


class Actor:
    """Chunks for the environments whose plan ran out (every step with --ensemble), one batched forward."""

    def __init__(self, policy, preprocessor, postprocessor, config):
        from lerobot.envs.utils import preprocess_observation

        self.policy, self.pre, self.post, self.config = policy, preprocessor, postprocessor, config
        self.preprocess_observation = preprocess_observation
        self.uses_state = STATE in config.input_features

    def new_ensembler(self):
        from lerobot.policies.act.modeling_act import ACTTemporalEnsembler

        if self.config.temporal_ensemble_coeff is None:
            return None
        return ACTTemporalEnsembler(self.config.temporal_ensemble_coeff, self.config.chunk_size)

    def act(self, observations, running):
        """{env: 14 joint targets} for every running environment."""
        due = [i for i, episode in running.items() if episode.needs_chunk()]
        if due:
            t0 = time.perf_counter()
            raw = {"pixels": {"top": np.stack([observations[i]["images"][CAMERA] for i in due])}}
            if self.uses_state:
                raw["agent_pos"] = np.stack([observations[i]["qpos"] for i in due]).astype(np.float32)
            with torch.inference_mode():
                batch = self.pre(self.preprocess_observation(raw))
                # (B, chunk, 14), normalized as the policy was trained
                chunks = self.policy.predict_action_chunk(batch)
                for j, i in enumerate(due):
                    self.plan(running[i], chunks[j : j + 1])
            seconds = time.perf_counter() - t0
            for i in due:
                running[i].chunk_seconds.append(seconds)
        return {i: episode.queue.popleft() for i, episode in running.items()}

    def plan(self, episode, chunk):
        """Queue the next actions of one environment, as ACTPolicy.select_action would for it alone."""
        if episode.ensembler is not None:
            actions = episode.ensembler.update(chunk)
        else:
            actions = chunk[0, : self.config.n_action_steps]
        episode.queue.extend(self.post(actions).cpu().numpy().astype(np.float64))


def annotate(frame, text):
    image = Image.fromarray(frame)
    image.thumbnail((320, 320))
    ImageDraw.Draw(image).text((4, 4), text, fill=(255, 255, 0))
    return image


def run_episodes(seeds, pool, actor, args, on_done):
    """Every seed's episode, pool.n at a time in lockstep; a frame is rendered only where a chunk is due next step
    (or for a GIF). Calls on_done(result, episode) as each ends (reward 4 or --steps)."""
    pending, running = deque(enumerate(seeds)), {}

    def start(free):
        starts = {}
        for i in free:
            if pending:
                index, seed = pending.popleft()
                running[i] = Episode(index, seed, index < args.gif, actor.new_ensembler())
                starts[i] = seed
        return pool.reset(starts, {i: True for i in starts})

    def snapshot(episode, obs, last=False):
        if episode.gif is not None and obs["images"] and (last or episode.t % 2 == 0):
            text = f"seed {episode.seed}  t {episode.t}  stage {episode.best}"
            episode.gif.append(annotate(obs["images"][CAMERA], text))

    observations = start(range(pool.n))
    while running:
        for i, episode in running.items():
            snapshot(episode, observations[i])
        actions = actor.act(observations, running)
        render = {i: running[i].needs_chunk() or running[i].gif is not None for i in running}
        stepped = pool.step(actions, render)
        observations, finished = {}, []
        for i, (reward, obs) in stepped.items():
            episode = running[i]
            episode.t += 1
            episode.best = max(episode.best, reward)
            observations[i] = obs
            if reward == 4 or episode.t >= args.steps:
                finished.append(i)
        for i in finished:
            episode = running.pop(i)
            # the last frame shows how it ended
            snapshot(episode, observations[i], last=True)
            on_done(episode.result(), episode)
        observations |= start(finished)


# -----------------------------------------------------------------------------
# the report


def load_report(path, settings, what, overwrite):
    """The report to continue when its settings and subject agree; a new one otherwise, or a refusal in one line."""
    if overwrite or not os.path.exists(path):
        return {"settings": settings}
    try:
        with open(path) as f:
            report = json.load(f)
        saved = report["settings"]
    except (OSError, ValueError, KeyError) as e:
        sys.exit(f"error: --out {os.path.dirname(path)}: its report.json does not read ({e}): pass --overwrite")
    differ = [k for k in SHARED_SETTINGS if saved.get(k) != settings.get(k)]
    if "policy" in report and report["policy"].get("what") != what:
        differ.append(f"policy ({report['policy'].get('what')})")
    if differ:
        sys.exit(
            f"error: --out {os.path.dirname(path)} holds another evaluation (it differs in {', '.join(differ)}): "
            "pass another --out, or --overwrite to replace it"
        )
    report["settings"] |= settings
    return report


def policy_entry(done, what):
    """The report's "policy" entry, as aloha/evaluate.py writes it: the summary, what was evaluated, every episode."""
    return summarize(done) | {"what": what, "per_episode": sorted(done, key=lambda e: e["seed"])}


def save_report(report, path):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, path)


def evaluate(args, ckpt, seeds):
    config, size = load_config(ckpt, args)
    demos = training_demos(ckpt)
    zoom, stock = scene_settings(demos, args, ckpt)
    reused = sorted({d["seed"] for d in demos if "seed" in d} & set(seeds))
    if reused:
        print(f"warning: {len(reused)} of these seeds ({reused[0]}..{reused[-1]}) made the training demos: not unseen")
    settings = {k: v for k, v in vars(args).items() if k != "overwrite"}
    settings |= {"checkpoint": ckpt, "seeds": seeds, "zoom": zoom, "stock_render": stock, "stages": STAGES[args.task]}
    settings |= {
        "policy_config": {k: getattr(config, k) for k in ("chunk_size", "n_action_steps", "temporal_ensemble_coeff")}
    }
    plan = f"ensemble {ENSEMBLE_COEFF}" if args.ensemble else f"execute {config.n_action_steps}"
    what = f"LeRobot ACT {os.path.realpath(ckpt)}, {plan}"
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "report.json")
    report = load_report(path, settings, what, args.overwrite)
    done = report.get("policy", {}).get("per_episode", [])
    todo = [s for s in seeds if s not in {e["seed"] for e in done}]
    if done:
        print(f"{len(done)} of {len(seeds)} episodes already in {path}, resuming")
    scene = f"{size[0]}x{size[1]} top camera, zoom {zoom}, {'stock' if stock else 'fast'} render"
    print(f"{what} | {scene} | {args.envs} simulators, {args.threads} torch threads")
    t_start, total = time.time(), len(todo)

    def on_done(result, episode):
        done.append(result)
        report["policy"] = policy_entry(done, what)
        save_report(report, path)
        if episode.gif:
            gif_path = os.path.join(args.out, f"rollout_{episode.index}_seed{episode.seed}.gif")
            # 2 steps of 20 ms a frame: real time
            episode.gif[0].save(gif_path, save_all=True, append_images=episode.gif[1:], duration=40, loop=0)
            print(f"wrote {gif_path}")
        finished = len(done) - (len(seeds) - total)
        eta = (time.time() - t_start) / finished * (total - finished)
        k = sum(e["success"] for e in done)
        print(
            f"seed {result['seed']} | stage {result['max_reward']} | {'success' if result['success'] else 'failure'} "
            f"| {result['steps']} steps | {result.get('ms_per_chunk', '-')} ms per chunk | {result['seconds']} s | "
            f"{k}/{len(done)} so far | eta {eta / 60:.1f} min",
            flush=True,
        )

    if todo:
        cameras = {CAMERA: ("top", size)}
        # the simulators fork before the policy is loaded: they never touch torch
        with envs.SimPool(args.envs, args.task, cameras, not stock, zoom) as pool:
            policy, pre, post = load_policy(ckpt, config)
            run_episodes(todo, pool, Actor(policy, pre, post, config), args, on_done)
    return report, path


def free_cores():
    """The cores this process may use less those the load average says are busy, at least 1 (infer.cpu_threads'
    rule): beside other busy processes torch's default of every core oversubscribes them. Measured here under load:
    an ensembled batch-8 chunk took 2.0 s on 1 thread and 6.5 s on 2."""
    return max(1, len(os.sched_getaffinity(0)) - round(os.getloadavg()[0]))


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a pretrained_model directory (or a run, for its last one)")
    p.add_argument("--task", default="transfer_cube", help=" or ".join(record.TASKS))
    p.add_argument("--episodes", type=int, default=100, help="seeds --seed, --seed+1, ...")
    p.add_argument("--seed", type=int, default=1000, help="first seed (record.py starts at 0: these are unseen)")
    p.add_argument("--steps", type=int, default=record.EPISODE_LEN, help="control steps per episode at most")
    p.add_argument("--envs", type=int, default=4 * len(os.sched_getaffinity(0)), help="simulators in parallel")
    p.add_argument("--execute", type=int, help="actions executed per chunk (default: the checkpoint's n_action_steps)")
    p.add_argument("--ensemble", action="store_true", help="ACT's temporal ensembling: a chunk every step")
    p.add_argument("--threads", type=int, help="torch threads (default: the cores the load average leaves free)")
    p.add_argument("--gif", type=int, default=1, help="write an animated GIF of the first N episodes")
    p.add_argument("--stock_render", action="store_true", help="render the stock scene (default: as the demos were)")
    p.add_argument("--zoom", type=float, help="camera zoom (record.py --zoom); default: the training demos'")
    p.add_argument("--out", default="out/act/eval", help="directory for report.json and the GIFs")
    p.add_argument("--overwrite", action="store_true", help="replace a report in --out that holds another evaluation")
    args = p.parse_args(argv)
    if args.task not in record.TASKS:
        sys.exit(f"error: --task {args.task!r}: unknown task; use {', '.join(record.TASKS)}")
    if args.threads is None:
        args.threads = free_cores()
    for flag in ("episodes", "steps", "envs", "threads"):
        if getattr(args, flag) < 1:
            sys.exit(f"error: --{flag} {getattr(args, flag)}: must be at least 1")
    if args.execute is not None and (args.execute < 1 or args.ensemble):
        sys.exit(f"error: --execute {args.execute}: must be at least 1, and not with --ensemble (which executes 1)")
    if args.zoom is not None:
        record.check_zoom(args.zoom)
    return args


def main(argv=None):
    args = get_args(argv)
    ckpt = find_checkpoint(args.checkpoint)
    torch.set_num_threads(args.threads)
    seeds = list(range(args.seed, args.seed + args.episodes))
    report, path = evaluate(args, ckpt, seeds)
    s, (lo, hi) = report["policy"], report["policy"]["success_ci95"]
    print(
        f"policy: {s['success']}/{s['episodes']} = {100 * s['success_rate']:.0f}% success "
        f"(95% CI {100 * lo:.0f}-{100 * hi:.0f}%) | reached stage 1-4: "
        + " ".join(f"{100 * v:.0f}%" for v in s["stage_rates"].values())
    )
    print(f"report: {path}")


if __name__ == "__main__":
    main()
