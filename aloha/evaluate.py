"""
Closed-loop success of a nanoOFT checkpoint in the ALOHA simulator, on seeds recording never used.

$ python aloha/evaluate.py --checkpoint out/aloha/run/step_002400 --task transfer_cube --episodes 100 --seed 1000
$ python aloha/evaluate.py --checkpoint CKPT --execute 4             # re-plan every 4 steps (default: 8)
$ python aloha/evaluate.py --checkpoint CKPT --ensemble              # ACT's temporal ensembling, a chunk per step
$ python aloha/evaluate.py --checkpoint CKPT --baseline out/aloha/tc240   # also the blind baseline, same seeds

Each episode starts from gym-aloha's reset(seed) pose, runs up to 400 control steps (50 Hz) and stops at reward 4,
as gym-aloha's env terminates. Frames are rendered at the checkpoint's training frame size with the settings
record.py used (fast unless --stock_render; the camera zoom its demos were recorded with), so the policy sees what
it was trained on; the state is the simulator's agent_pos (qpos) when the checkpoint was trained with --proprio.
The baseline replays the mean of the demonstrations' action trajectories open loop: what a policy that never looks
scores.
Writes OUT/report.json (settings, every episode, success rate with its 95% Wilson interval, the rate of reaching
each reward stage) and OUT/rollout_N_seedS.gif for the first --gif episodes.
"""

import argparse
import glob
import json
import math
import os
import sys
import time

import h5py
import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import infer  # noqa: E402
import record  # noqa: E402  (the same folder: sys.path[0] when run as a script)

IMAGE_PREFIX = "observations/images/"  # ACT's layout names a camera by its dataset path
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
        "success_rate": k / n,
        "success_ci95": wilson(k, n),
        "stage_rates": {str(s): sum(r >= s for r in stages) / n for s in range(1, 5)},
        "stage_histogram": {str(s): stages.count(s) for s in range(5)},
    }


def sim_cameras(task):
    physics, _ = record.make_sim(task)
    return [physics.model.id2name(i, "camera") for i in range(physics.model.ncam)], physics


def check_policy_inputs(train_args, ckpt, task):
    """One-line errors for a checkpoint the simulator cannot feed, before the model is loaded.
    Returns {checkpoint camera: (simulator camera, (H, W))}."""
    names, physics = sim_cameras(task)
    limit = (physics.model.vis.global_.offheight, physics.model.vis.global_.offwidth)
    sizes, out = train_args.get("frame_sizes") or {}, {}
    for cam in train_args["cameras"].split(","):
        sim_name = cam[len(IMAGE_PREFIX) :] if cam.startswith(IMAGE_PREFIX) else None
        if sim_name not in names:
            sys.exit(
                f"error: checkpoint {ckpt} needs camera {cam!r}, which the simulator does not render (it has "
                f"{', '.join(IMAGE_PREFIX + n for n in names)})"
            )
        size = tuple(sizes.get(cam) or (480, 640))  # older checkpoints record no size: ACT's
        if size[0] > limit[0] or size[1] > limit[1]:
            sys.exit(
                f"error: checkpoint {ckpt} was trained on {cam} frames of {size[0]}x{size[1]}, larger than the "
                f"simulator renders ({limit[0]}x{limit[1]})"
            )
        out[cam] = (sim_name, size)
    if train_args["action_dim"] != 14:
        sys.exit(f"error: checkpoint {ckpt} predicts {train_args['action_dim']} action dimensions; ALOHA takes 14")
    return out


def rollout(task, seed, act, cameras, steps, fast_render=True, gif=None, zoom=1.0):
    """One episode from reset(seed): act(images, qpos, t) -> 14 joint targets, until reward 4 or `steps`.
    gif: a list that receives every other frame of the first camera and the last one (annotated), to animate."""
    physics, task_obj = record.make_sim(task, fast_render=fast_render, zoom=zoom)
    record.reset(physics, task_obj, record.object_pose(task, seed))
    best, t0 = 0, time.time()
    for t in range(steps):
        images = {cam: record.render(physics, size, name) for cam, (name, size) in cameras.items()}
        if gif is not None and t % 2 == 0 and images:
            gif.append(annotate(next(iter(images.values())), f"seed {seed}  t {t}  stage {best}"))
        reward = record.step(physics, task_obj, act(images, task_obj.get_qpos(physics), t))
        best = max(best, reward)
        if reward == 4:
            break
    if gif is not None and cameras:  # the last frame shows how the episode ended
        name, size = next(iter(cameras.values()))
        gif.append(annotate(record.render(physics, size, name), f"seed {seed}  t {t + 1}  stage {best}"))
    return {
        "seed": seed,
        "max_reward": int(best),
        "success": best == 4,
        "steps": t + 1,
        "seconds": round(time.time() - t0, 2),
    }


def annotate(frame, text):
    image = Image.fromarray(frame)
    image.thumbnail((320, 320))
    ImageDraw.Draw(image).text((4, 4), text, fill=(255, 255, 0))
    return image


def write_gif(frames, path):
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=40, loop=0)  # 2 steps of 20 ms: real time


def mean_demonstration(demos_dir, task):
    """The mean of the demonstrations' action trajectories (to the shortest one's length)."""
    actions = []
    try:
        paths = data.list_episodes(demos_dir)
    except data.DataError as e:
        sys.exit(f"error: --baseline {e}")
    for p in paths:
        with h5py.File(p, "r") as f:
            if "action" not in f or f["action"].ndim != 2 or f["action"].shape[1] != 14:
                sys.exit(f"error: --baseline {p}: needs an action dataset of shape (T, 14)")
            if f.attrs.get("task", task) != task:
                sys.exit(f"error: --baseline {p}: a {f.attrs['task']} demonstration, not {task}")
            actions.append(f["action"][()])
    n = min(len(a) for a in actions)
    return np.mean([a[:n] for a in actions], axis=0), len(actions)


def training_demos(train_args):
    """Seeds and zooms of the recorded demonstrations the checkpoint was trained on (record.py stores them), if
    readable: the zoom is an empty set when they are not."""
    seeds, zooms = set(), set()
    for p in glob.glob(os.path.join(str(train_args.get("data_dir", "")), "episode_*.hdf5")):
        with h5py.File(p, "r") as f:
            seeds |= {int(f.attrs["seed"])} if "seed" in f.attrs else set()
            zooms.add(float(f.attrs.get("zoom", 1.0)))
    return seeds, zooms


def run(name, seeds, task, act, cameras, args, gif_count=0, on_start=None):
    results = []
    for i, seed in enumerate(seeds):
        frames = [] if i < gif_count else None
        if on_start:
            on_start()
        r = rollout(task, seed, act, cameras, args.steps, not args.stock_render, frames, args.zoom or 1.0)
        if act.latency:
            r["ms_per_chunk"] = round(1000 * float(np.mean(act.latency[1:] or act.latency)), 1)  # first call warms up
            act.latency.clear()
        results.append(r)
        if frames:
            write_gif(frames, os.path.join(args.out, f"rollout_{i}_seed{seed}.gif"))
        k = sum(e["success"] for e in results)
        print(
            f"{name} | seed {seed} | stage {r['max_reward']} | {'success' if r['success'] else 'failure'} | "
            f"{r['steps']} steps | "
            + (f"{r['ms_per_chunk']} ms per chunk | " if "ms_per_chunk" in r else "")
            + f"{r['seconds']} s | {k}/{len(results)} so far",
            flush=True,
        )
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="a step_NNNNNN directory or a merged export")
    p.add_argument("--task", default="transfer_cube", help=" or ".join(record.TASKS))
    p.add_argument(
        "--episodes",
        type=int,
        default=100,
        help="seeds --seed, --seed+1, ... (50 alone mislead: one "
        "checkpoint scored 20%% on seeds 1000-1049 and 6%% on 1050-1099)",
    )
    p.add_argument("--seed", type=int, default=1000, help="first seed (record.py starts at 0: these are unseen)")
    p.add_argument("--steps", type=int, default=record.EPISODE_LEN, help="control steps per episode at most")
    p.add_argument("--execute", type=int, default=8, help="actions executed per chunk before re-planning")
    p.add_argument("--ensemble", action="store_true", help="temporal ensembling over overlapping chunks (ACT)")
    p.add_argument("--instruction", help="default: the one the checkpoint was trained with")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--vla_path", help="base model, overriding the one named in the checkpoint's args.json")
    p.add_argument(
        "--baseline",
        metavar="DEMOS_DIR",
        help="also replay these demonstrations' mean action trajectory open loop on the same seeds",
    )
    p.add_argument("--gif", type=int, default=2, help="write an animated GIF of the first N policy episodes")
    p.add_argument(
        "--stock_render",
        action="store_true",
        help="render the stock scene (for checkpoints trained on record.py --stock_render demos)",
    )
    p.add_argument(
        "--zoom",
        type=float,
        help="camera zoom (record.py --zoom); default: the one the checkpoint's training demos were recorded with",
    )
    p.add_argument("--out", default="out/aloha/eval")
    args = p.parse_args(argv)
    if args.task not in record.TASKS:
        sys.exit(f"error: --task {args.task!r}: unknown task; use {', '.join(record.TASKS)}")
    if not args.checkpoint and not args.baseline:
        sys.exit("error: nothing to evaluate: give --checkpoint, --baseline or both")
    if args.zoom is not None:
        record.check_zoom(args.zoom)
    if args.episodes < 1 or args.steps < 1 or args.execute < 1:
        sys.exit("error: --episodes, --steps and --execute must be at least 1")
    seeds = list(range(args.seed, args.seed + args.episodes))
    report = {"settings": vars(args) | {"seeds": seeds, "stages": STAGES[args.task]}}
    baseline = mean_demonstration(args.baseline, args.task) if args.baseline else None
    if args.checkpoint:
        train_args = infer.check_checkpoint(args.checkpoint)
        cameras = check_policy_inputs(train_args, args.checkpoint, args.task)
        instruction = args.instruction or train_args.get("instruction")
        if not instruction:
            sys.exit(f"error: checkpoint {args.checkpoint} records no instruction: give --instruction")
        demo_seeds, zooms = training_demos(train_args)
        if args.zoom is None and len(zooms) > 1:
            sys.exit(
                f"error: checkpoint {args.checkpoint}'s demos in {train_args['data_dir']} mix zooms "
                f"{sorted(zooms)}: give --zoom"
            )
        if args.zoom is None:
            args.zoom = next(iter(zooms), 1.0)
            print(f"camera zoom {args.zoom} ({'as the training demos' if zooms else 'training demos not found'})")
        reused = sorted(demo_seeds & set(seeds))
        if reused:
            print(
                f"warning: {len(reused)} of these seeds ({reused[0]}..{reused[-1]}) made the checkpoint's training "
                f"demos: not unseen"
            )
    os.makedirs(args.out, exist_ok=True)
    if args.checkpoint:
        policy = infer.Policy.from_checkpoint(
            args.checkpoint, device=args.device, vla_path=args.vla_path, execute=args.execute, ensemble=args.ensemble
        )
        proprio = bool(policy.vla.proprio_dim)

        def act(images, qpos, t):
            replans = policy.ensemble or not policy.plan
            t0 = time.perf_counter()
            action = policy.act(images, instruction, qpos if proprio else None)
            if replans:
                act.latency.append(time.perf_counter() - t0)
            return action

        act.latency = []
        report["settings"] |= {
            "instruction": instruction,
            "cameras": {c: list(s) for c, (_, s) in cameras.items()},
            "proprio": proprio,
            "zoom": args.zoom,
            "train_args": train_args,
        }
        report["policy"] = summarize(
            episodes := run("policy", seeds, args.task, act, cameras, args, args.gif, policy.reset)
        )
        report["policy"]["per_episode"] = episodes
    if baseline is not None:
        mean, n_demos = baseline

        def blind(images, qpos, t):
            return mean[min(t, len(mean) - 1)]

        blind.latency = []
        report["baseline"] = summarize(episodes := run("baseline", seeds, args.task, blind, {}, args))
        report["baseline"] |= {
            "per_episode": episodes,
            "what": f"mean action trajectory of {n_demos} demos in {args.baseline}, open loop",
        }
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    for name in ("policy", "baseline"):
        if name in report:
            s, (lo, hi) = report[name], report[name]["success_ci95"]
            print(
                f"{name}: {s['success']}/{s['episodes']} = {100 * s['success_rate']:.0f}% success "
                f"(95% CI {100 * lo:.0f}-{100 * hi:.0f}%) | reached stage 1-4: "
                + " ".join(f"{100 * v:.0f}%" for v in s["stage_rates"].values())
            )
    print(f"report: {os.path.join(args.out, 'report.json')}")


if __name__ == "__main__":
    main()
