"""
record.py's demonstrations (ACT's HDF5 layout) written as a LeRobot v3.0 data set by LeRobot's own writer, for
training LeRobot's ACT on the very demos nanoOFT trains on. Runs in the lerobot venv (aloha/act/README.md):

$ /work/lerobot-venv/bin/python aloha/act/to_lerobot.py out/aloha/tc200 out/act/tc200_lerobot
$ /work/lerobot-venv/bin/python aloha/act/to_lerobot.py DEMOS OUT --episodes 3 --check 2      # a smoke test

Each DEMOS/episode_N.hdf5, in the order of N, becomes LeRobot episode N (its index among the converted ones) through
LeRobotDataset.create / add_frame / save_episode / finalize: observation.images.top (a video, LeRobot's default
encoder: AV1 by libsvtav1, yuv420p, a keyframe every 2 frames, crf 30), observation.state = observations/qpos and
action = action (float32, copied exactly), task "transfer the cube", fps 50 (the simulator's control rate). Frame t
is the observation before action[t], as LeRobot's own ALOHA data sets hold it.
The demos' record.py attributes (seed, task, zoom, render) go to OUT/meta/nanooft_episodes.json, which LeRobot does
not read: evaluate_act.py takes the camera zoom and render settings from it, and warns when an evaluation seed made
a training demo.
The data set is written to OUT.partial and renamed to OUT when finished and checked: an interrupted run leaves
OUT.partial, which the next run removes. With --check K (default 2) the first K episodes are read back through
LeRobotDataset (the path lerobot-train reads them by): states and actions must equal the HDF5's exactly, every
frame must decode to within the codec's tolerance (PSNR >= 30 dB, mean error <= 3 of 255) and closer to its own
frame than to its neighbours.
"""

import argparse
import glob
import json
import os
import re
import shutil
import sys
import time

import h5py
import numpy as np

IMAGES, QPOS, ACTION = "observations/images/top", "observations/qpos", "action"
FPS = 50  # one control step of the simulator is 20 ms
# LeRobot's default decoder, torchcodec, needs the system's FFmpeg 4-7 libraries (absent here); PyAV's wheels bundle
# their own FFmpeg. train_act.sh passes the same --dataset.video_backend.
VIDEO_BACKEND = "pyav"
MIN_PSNR, MAX_MEAN_ERROR = 30.0, 3.0
# the record.py attributes kept beside the data set
ATTRS = ("seed", "task", "zoom", "render")


def episode_files(demos, limit):
    """DEMOS/episode_N.hdf5 in the order of N (the first `limit` of them when limit > 0)."""
    found = []
    for path in glob.glob(os.path.join(demos, "episode_*.hdf5")):
        match = re.fullmatch(r"episode_(\d+)\.hdf5", os.path.basename(path))
        if match:
            found.append((int(match.group(1)), path))
    if not found:
        sys.exit(f"error: {demos}: no episode_N.hdf5 files")
    paths = [path for _, path in sorted(found)]
    if limit > len(paths):
        sys.exit(f"error: --episodes {limit}: {demos} holds only {len(paths)} episodes")
    return paths[:limit] if limit > 0 else paths


def check_episode(path, shape):
    """One line for a file that is not a record.py demo of the first file's frame size, before any writing.
    -> the file's frame shape (H, W, 3)."""
    with h5py.File(path, "r") as f:
        for key in (IMAGES, QPOS, ACTION):
            if key not in f:
                sys.exit(f"error: {path}: no {key} dataset (not ACT's layout as record.py writes it)")
        frames, qpos, action = f[IMAGES], f[QPOS], f[ACTION]
        if frames.ndim != 4 or frames.shape[3] != 3 or frames.dtype != np.uint8:
            sys.exit(f"error: {path}: {IMAGES} is {frames.shape} {frames.dtype}, expected (T, H, W, 3) uint8")
        if qpos.shape != (len(frames), 14) or action.shape != (len(frames), 14):
            sys.exit(f"error: {path}: qpos {qpos.shape} and action {action.shape} must both be ({len(frames)}, 14)")
        if shape is not None and frames.shape[1:] != shape:
            sys.exit(f"error: {path}: frames of {frames.shape[1:]}, the first episode's are {shape}")
        return frames.shape[1:]


def features(shape):
    """LeRobot's feature dictionary: the top camera as a video, the 14 joints as state and action."""
    joints = [
        f"{arm}_{joint}"
        for arm in ("left", "right")
        for joint in ("waist", "shoulder", "elbow", "forearm_roll", "wrist_angle", "wrist_rotate", "gripper")
    ]
    return {
        "observation.images.top": {"dtype": "video", "shape": shape, "names": ["height", "width", "channels"]},
        "observation.state": {"dtype": "float32", "shape": (14,), "names": joints},
        "action": {"dtype": "float32", "shape": (14,), "names": joints},
    }


def read_episode(path):
    """(frames (T, H, W, 3) uint8, qpos (T, 14) float32, action (T, 14) float32, record.py's attributes)."""
    with h5py.File(path, "r") as f:
        attrs = {k: f.attrs[k].item() if hasattr(f.attrs[k], "item") else f.attrs[k] for k in ATTRS if k in f.attrs}
        return f[IMAGES][()], f[QPOS][()].astype(np.float32), f[ACTION][()].astype(np.float32), attrs


def write_dataset(paths, root, repo_id, task, shape):
    """Every episode through LeRobot's writer, one line each. -> record.py's attributes per episode."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    dataset = LeRobotDataset.create(repo_id, FPS, features(shape), root=root, robot_type="aloha", use_videos=True)
    sources, t_start = [], time.time()
    for index, path in enumerate(paths):
        frames, qpos, action, attrs = read_episode(path)
        for t in range(len(frames)):
            dataset.add_frame(
                {"observation.images.top": frames[t], "observation.state": qpos[t], "action": action[t], "task": task}
            )
        dataset.save_episode()
        sources.append({"episode_index": index, "source": os.path.realpath(path), **attrs})
        eta = (time.time() - t_start) / (index + 1) * (len(paths) - index - 1)
        print(f"episode {index + 1}/{len(paths)} | {path} | {len(frames)} frames | eta {eta / 60:.1f} min", flush=True)
    # v3.0 keeps its parquet writers open until this call
    dataset.finalize()
    return sources


def psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def check_round_trip(root, repo_id, paths):
    """Read the first episodes back as lerobot-train does and compare them with their HDF5 files (module docstring).
    -> a summary per episode; exits with one line on the first mismatch."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    dataset = LeRobotDataset(repo_id, root=root, video_backend=VIDEO_BACKEND)
    results = []
    for index, path in enumerate(paths):
        frames, qpos, action, _ = read_episode(path)
        start = int(dataset.meta.episodes["dataset_from_index"][index])
        decoded = np.empty_like(frames)
        for t in range(len(frames)):
            item = dataset[start + t]
            if int(item["episode_index"]) != index or int(item["frame_index"]) != t:
                sys.exit(f"error: round trip: row {start + t} is episode {item['episode_index']} frame {t}")
            if not np.array_equal(item["observation.state"].numpy(), qpos[t]):
                sys.exit(f"error: round trip: episode {index} frame {t}: observation.state differs from {path}")
            if not np.array_equal(item["action"].numpy(), action[t]):
                sys.exit(f"error: round trip: episode {index} frame {t}: action differs from {path}")
            # LeRobot returns (3, H, W) float in [0, 1]
            image = item["observation.images.top"].permute(1, 2, 0).numpy()
            decoded[t] = np.clip(np.round(image * 255), 0, 255).astype(np.uint8)
        results.append(compare_frames(index, path, frames, decoded))
    return results


def compare_frames(index, path, frames, decoded):
    """PSNR and mean error of the decoded frames, and the mean error against the frames one step earlier and later:
    a decode shifted in time would match a neighbour better than its own frame."""
    errors = np.abs(decoded.astype(np.int16) - frames.astype(np.int16))
    worst_psnr = min(psnr(frames[t], decoded[t]) for t in range(len(frames)))
    mean_error = float(errors.mean())
    earlier = float(np.abs(decoded[1:].astype(np.int16) - frames[:-1]).mean())
    later = float(np.abs(decoded[:-1].astype(np.int16) - frames[1:]).mean())
    line = (
        f"round trip episode {index} ({path}): {len(frames)} frames, states and actions exact, frames: worst PSNR "
        f"{worst_psnr:.1f} dB, mean error {mean_error:.2f}/255 (max {int(errors.max())}), against the frame before "
        f"{earlier:.2f}, after {later:.2f}"
    )
    print(line)
    if worst_psnr < MIN_PSNR or mean_error > MAX_MEAN_ERROR or min(earlier, later) <= mean_error:
        sys.exit(f"error: {line}: outside the codec's tolerance")
    return {"episode": index, "worst_psnr": worst_psnr, "mean_error": mean_error, "max_error": int(errors.max())}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("demos", help="directory of record.py's episode_N.hdf5")
    p.add_argument("out", help="the LeRobot data set's root directory (must not exist)")
    p.add_argument("--episodes", type=int, default=0, help="convert the first N episodes (0: all)")
    p.add_argument("--repo_id", default="nanooft/aloha_transfer_cube", help="the data set's name inside LeRobot")
    p.add_argument("--task", default="transfer the cube", help="the task string of every frame")
    p.add_argument("--check", type=int, default=2, help="read back the first K episodes and compare (0: none)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    args = p.parse_args(argv)
    if args.episodes < 0 or args.check < 0:
        sys.exit("error: --episodes and --check must be 0 or more")
    out = os.path.abspath(args.out)
    if os.path.exists(out) and not args.overwrite:
        sys.exit(f"error: {args.out} exists: pass --overwrite to replace it, or another OUT")
    paths = episode_files(args.demos, args.episodes)
    if args.check > len(paths):
        sys.exit(f"error: --check {args.check}: only {len(paths)} episodes are converted")
    shape = None
    for path in paths:
        shape = check_episode(path, shape)
    partial = out + ".partial"
    if os.path.exists(partial):
        print(f"removing {partial}, an interrupted run's")
        shutil.rmtree(partial)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    t0 = time.time()
    sources = write_dataset(paths, partial, args.repo_id, args.task, shape)
    with open(os.path.join(partial, "meta", "nanooft_episodes.json"), "w") as f:
        json.dump(sources, f, indent=1)
    t1 = time.time()
    check_round_trip(partial, args.repo_id, paths[: args.check])
    t2 = time.time()
    if os.path.exists(out):
        shutil.rmtree(out)
    os.replace(partial, out)
    size = sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(out) for n in names)
    print(
        f"{out}: {len(paths)} episodes, {size / 1e6:.1f} MB | written in {t1 - t0:.0f} s, "
        f"{args.check} checked in {t2 - t1:.0f} s | train: bash aloha/act/train_act.sh {args.out} OUT_DIR"
    )


if __name__ == "__main__":
    main()
