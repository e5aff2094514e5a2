"""
Convert raw RoboTwin 2.0 episodes into nanoOFT's flat episode files, with true colours and each episode's own
instructions (RoboTwin's OpenVLA-OFT converter swaps red and blue and gives most files another episode's texts).

$ python robotwin/convert.py RoboTwin/data/place_shoe/demo_clean data/place_shoe [--size 256] [--workers 4]

SRC is one task/config directory in either layout RoboTwin writes, told apart by the file names:
  A (the released data sets): data/episode{N}.hdf5, instructions in instructions/episode{N}.json
  B (XPolicyLab v1.0, RoboTwin's current collector): data/episode_{N:07d}.hdf5, seen instructions inside
Episode N becomes OUT/episode_{N}.hdf5: head_camera_image, left_wrist_image, right_wrist_image, low_cam_image (the
front camera) as (T, size, size, 3) uint8 RGB, action (T, 14) = the joint vector recorded at frame t,
relative_action, seen and unseen (layout B: seen only). A file is written under a temporary name and renamed when
whole, so a re-run skips finished episodes and redoes an interrupted one. Broken raw episodes are named, one line
per problem, and the rest are still converted. A line per episode; on a terminal a progress bar with the ETA under
them, in a log file each line ends with the time elapsed and the ETA.
"""

import argparse
import io
import json
import multiprocessing
import os
import re
import sys
import time

import h5py
import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # before RoboTwin's own data/
import data  # noqa: E402
from progress import Progress  # noqa: E402

# nanoOFT's camera: (layout A's dataset, layout B's dataset)
CAMERAS = dict(
    zip(
        data.ALL_CAMERAS,
        [
            ("observation/head_camera/rgb", "vision/cam_head/colors"),
            ("observation/left_camera/rgb", "vision/cam_left_wrist/colors"),
            ("observation/right_camera/rgb", "vision/cam_right_wrist/colors"),
            ("observation/front_camera/rgb", "vision/cam_third_view/colors"),
        ],
    )
)
JOINTS = {
    "A": ["joint_action/vector"],  # [left arm 6, left gripper, right arm 6, right gripper]
    "B": [
        f"state/{k}"
        for k in ("left_arm_joint_states", "left_ee_joint_states", "right_arm_joint_states", "right_ee_joint_states")
    ],
}
NAMES = {"A": re.compile(r"episode(\d+)\.hdf5"), "B": re.compile(r"episode_(\d+)\.hdf5")}


def find_episodes(src):
    """[(N, layout, raw file)] of a task/config directory, by N."""
    folder, found = os.path.join(src, "data"), {}
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        for layout, pattern in NAMES.items():
            if match := pattern.fullmatch(name):
                n = int(match[1])
                if n in found:
                    raise data.DataError(f"{folder}: episode {n} is there twice: {found[n][1]}, {name}")
                found[n] = (layout, os.path.join(folder, name))
    if not found:
        raise data.DataError(
            f"{src}: no raw RoboTwin episodes: expected data/episode{{N}}.hdf5 (with "
            "instructions/episode{N}.json) or data/episode_{N:07d}.hdf5 in it"
        )
    return [(n, *found[n]) for n in sorted(found)]


def decode(jpegs, size):
    """(T,) JPEGs -> (T, size, size, 3) uint8 true RGB, or the first frame index that does not decode and why.
    The collector encoded RGB arrays with cv2.imencode, which takes them for BGR, so any standard decoder gives
    BGR back: decode with PIL and squash with its bicubic resize exactly as RoboTwin's converter does, then reverse
    the channels (the resize treats each channel alike, so the order of the two steps does not matter)."""
    frames = np.empty((len(jpegs), size, size, 3), np.uint8)
    for t, jpeg in enumerate(jpegs):
        try:
            frames[t] = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB").resize((size, size), Image.BICUBIC))
        except (OSError, ValueError) as e:
            return None, f"frame {t} does not decode ({e})"
    return np.ascontiguousarray(frames[..., ::-1]), None


def read_episode(path, layout, instructions, size):
    """Frames by nanoOFT camera, joints (T, 14) float64 and {seen, unseen} of one raw episode, or problem lines."""
    problems, texts = [], {}
    if layout == "A":
        try:
            with open(instructions) as f:
                texts = json.load(f)
            texts = {key: [str(s) for s in texts.get(key, [])] for key in ("seen", "unseen")}
        except FileNotFoundError:
            problems.append(f"{instructions}: missing (the instructions of {path})")
        except (OSError, ValueError, AttributeError, TypeError) as e:
            problems.append(f"{instructions}: not a JSON object of seen and unseen lists ({e})")
    try:
        with h5py.File(path, "r") as f:
            sources = {ours: names["AB".index(layout)] for ours, names in CAMERAS.items()}
            needed = [*sources.values(), *JOINTS[layout]] + (["instructions"] if layout == "B" else [])
            missing = [k for k in needed if k not in f]
            if missing:
                return [*problems, f"{path}: missing {', '.join(missing)}"]
            if layout == "B":
                try:
                    seen = json.loads(f["instructions"][()])
                except (ValueError, TypeError):
                    seen = None
                if isinstance(seen, list):
                    texts = {"seen": [str(s) for s in seen]}
                else:
                    problems.append(f"{path}: instructions is not one string holding a JSON list")
            parts = [f[k][()] for k in JOINTS[layout]]
            lengths = {k: len(p) for k, p in zip(JOINTS[layout], parts)} | {k: len(f[k]) for k in sources.values()}
            if len(set(lengths.values())) > 1:
                return [
                    *problems,
                    f"{path}: cameras and joints differ in length: "
                    + ", ".join(f"{k} {n}" for k, n in lengths.items()),
                ]
            joints = np.concatenate([p[:, None] if p.ndim == 1 else p for p in parts], 1).astype(np.float64)
            if joints.shape[1] != len(data.ACTION_NAMES) or len(joints) < 2:
                return [*problems, f"{path}: joints have shape {joints.shape}, expected (T >= 2, 14)"]
            frames = {}
            for ours, name in sources.items():
                frames[ours], problem = decode(f[name][()], size)
                if problem:
                    problems.append(f"{path}: {name}: {problem}")
    except OSError as e:  # h5py's word for a file that is not HDF5, or cut short
        problems.append(f"{path}: not a readable HDF5 file or truncated ({str(e).splitlines()[0]})")
    return problems or (frames, joints, texts)


def convert_episode(job):
    """One raw episode -> OUT/episode_{N}.hdf5 (run in a worker). Returns (progress line, problem lines)."""
    n, layout, path, instructions, out, size = job
    t0, target = time.time(), os.path.join(out, f"episode_{n}.hdf5")
    result = read_episode(path, layout, instructions, size)
    if isinstance(result, list):
        return f"{path}: failed", result
    frames, joints, texts = result
    tmp = target + ".tmp"  # outside list_episodes' episode_*.hdf5, so a half-written file is never read
    with h5py.File(tmp, "w") as f:
        for name, video in frames.items():  # uncompressed, as RoboTwin's conversion: see README "RoboTwin data"
            f.create_dataset(name, data=video, chunks=(1, size, size, 3))
        relative = np.diff(joints, axis=0, append=joints[-1:])
        relative[-1] = relative[-2]  # as RoboTwin computes it: the last row repeats the one before
        f["action"], f["relative_action"] = joints, relative
        for key, items in texts.items():
            f.create_dataset(key, data=items, dtype=h5py.string_dtype())
    try:
        data.check_episodes([tmp], data.ALL_CAMERAS, 1, len(data.ACTION_NAMES))
    except data.DataError as e:
        os.remove(tmp)
        return f"{path}: failed", [
            f"{path}: its conversion fails data.py's check: {line.split(': ', 1)[-1]}" for line in str(e).splitlines()
        ]
    os.replace(tmp, target)
    counts = ", ".join(f"{len(items)} {key}" for key, items in texts.items())
    return f"{path} -> {target}: {len(joints)} frames, {counts} instructions ({time.time() - t0:.1f}s)", []


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="a RoboTwin task/config directory, e.g. RoboTwin/data/place_shoe/demo_clean")
    parser.add_argument("out", help="directory for the episode_{N}.hdf5 files (created when missing)")
    parser.add_argument(
        "--size",
        type=int,
        default=256,
        help="frames are squashed to size x size, as RoboTwin's OpenVLA-OFT converter does (256)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="worker processes, one episode each at a time (about 0.2 GB of memory each)",
    )
    args = parser.parse_args(argv)
    if args.size < 1 or args.workers < 1:
        parser.error(f"--size and --workers must be at least 1, got {args.size} and {args.workers}")
    try:
        episodes = find_episodes(args.src)
    except (data.DataError, OSError) as e:
        sys.exit(str(e))
    os.makedirs(args.out, exist_ok=True)
    jobs, skipped, failed = [], 0, 0
    for n, layout, path in episodes:
        if os.path.exists(os.path.join(args.out, f"episode_{n}.hdf5")):
            skipped += 1
            print(f"[{skipped}/{len(episodes)}] {path}: already converted, skipped")
        else:
            instructions = os.path.join(args.src, "instructions", f"episode{n}.json") if layout == "A" else None
            jobs.append((n, layout, path, instructions, args.out, args.size))
    # spawn, not Linux's default fork: a process that already runs threads (torch's, a tracker's, a test runner's)
    # can fork a child that waits forever on a lock some other thread held at the fork
    context = multiprocessing.get_context("spawn")
    try:
        with (
            context.Pool(max(1, min(args.workers, len(jobs)))) as pool,
            Progress(total=len(episodes), done=skipped, unit="episode") as progress,
        ):
            for k, (line, problems) in enumerate(pool.imap_unordered(convert_episode, jobs), skipped + 1):
                progress.update(line=f"[{k}/{len(episodes)}] {line}")
                for problem in problems:
                    progress.write(problem, file=sys.stderr)
                failed += bool(problems)
    except KeyboardInterrupt:
        sys.exit("interrupted; run the same command again to convert the rest")
    if failed < len(episodes):  # files from an earlier run at another --size would not mix with these
        try:
            data.check_episodes(data.list_episodes(args.out), data.ALL_CAMERAS, 1, len(data.ACTION_NAMES))
        except data.DataError as e:
            sys.exit(str(e))
    summary = f"{args.out}: {len(jobs) - failed} converted, {skipped} already there, {failed} failed"
    if failed:
        sys.exit(summary)
    print(summary)


if __name__ == "__main__":
    main()
