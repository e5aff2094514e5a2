"""
Robot episodes for nanoOFT: the chunked HDF5 dataset, action statistics and a data check.

Check a directory of RoboTwin episodes (episode_*.hdf5) before a long run starts:
$ python data.py /path/to/place_shoe --cameras head_camera_image,left_wrist_image --chunk 8 --action_dim 14
$ python data.py /path/to/place_shoe --vla_path openvla/openvla-7b --preview frame.png   # prompt lengths, colours
Synthetic episodes in the same layout: python demo.py demo_data --episodes 48 --seed 0
"""
import argparse
import glob
import json
import os
import re
import sys

import h5py
import numpy as np
import torch
from PIL import Image

ALL_CAMERAS = ["head_camera_image", "left_wrist_image", "right_wrist_image", "low_cam_image"]
DEFAULT_CAMERAS = ["head_camera_image", "left_wrist_image"]
ACTION_NAMES = [f"{arm}_{j}" for arm in ("left", "right") for j in ("j1", "j2", "j3", "j4", "j5", "j6", "gripper")]
ACTION_OFFSET_HELP = ("the target of frame t is action[t+o : t+o+chunk]. RoboTwin's action[t] is the joint target "
                      "recorded at frame t, close to the state the frame already shows, and RoboTwin's own converters "
                      "train on action[t+1]: 1 may suit it")


class DataError(ValueError):
    """Bad input data; the message holds one line per problem, each naming the file."""


def _natural(path):
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", str(path))]


def list_episodes(data_dir_or_paths):
    """episode_*.hdf5 files of a directory (or of several, or explicit files), episode_2 before episode_10."""
    items = [data_dir_or_paths] if isinstance(data_dir_or_paths, (str, os.PathLike)) else list(data_dir_or_paths)
    paths = []
    for item in map(str, items):
        if not os.path.exists(item):
            raise DataError(f"{item}: no such file or directory")
        paths += glob.glob(os.path.join(item, "episode_*.hdf5")) if os.path.isdir(item) else [item]
    if not paths:
        raise DataError(f"{', '.join(map(str, items)) or '(no path given)'}: no episode_*.hdf5 files found")
    return sorted(paths, key=_natural)


def check_episodes(paths, cameras, chunk, action_dim, action_offset=0):
    """Validate every file up front (so a broken one fails now, not hours into training); return the usable ones."""
    unknown = [c for c in cameras if c not in ALL_CAMERAS]
    if unknown or not cameras:
        raise DataError(f"unknown camera(s) {', '.join(unknown) or '(none given)'}; use {', '.join(ALL_CAMERAS)}")
    if chunk < 1 or action_offset < 0 or action_dim < 1:
        raise DataError(f"need chunk >= 1, action_offset >= 0 and action_dim >= 1; got {chunk}, {action_offset}, "
                        f"{action_dim}")
    problems, usable, frame_shape = [], [], None
    for p in paths:
        if not os.path.isfile(p):
            problems.append(f"{p}: no such file or directory")
            continue
        try:
            with h5py.File(p, "r") as f:
                missing = [k for k in ["action", *cameras] if k not in f]
                if missing:
                    problems.append(f"{p}: missing {', '.join(missing)}")
                    continue
                action, videos = f["action"][()], [f[c] for c in cameras]
                lengths, shapes = [len(v) for v in videos], {v.shape[1:] for v in videos} | ({frame_shape} - {None})
                if action.ndim != 2 or action.shape[1] != action_dim:
                    problems.append(f"{p}: action has shape {action.shape}, expected (T, {action_dim}) (--action_dim)")
                elif any(v.ndim != 4 or v.shape[3] != 3 or v.dtype != np.uint8 for v in videos):
                    problems.append(f"{p}: camera frames must be uint8 (T, H, W, 3), found "
                                    + ", ".join(f"{c} {v.dtype} {v.shape}" for c, v in zip(cameras, videos)))
                elif set(lengths) != {len(action)}:
                    problems.append(f"{p}: cameras and action differ in length: action {len(action)}, "
                                    + ", ".join(f"{c} {n}" for c, n in zip(cameras, lengths)))
                elif len(shapes) > 1:
                    problems.append(f"{p}: frame sizes differ: {sorted(shapes)} (all cameras, all episodes must agree)")
                elif not np.isfinite(action).all():
                    problems.append(f"{p}: action holds NaN or inf")
                elif "state" in f and (f["state"].ndim != 2 or len(f["state"]) != len(action)
                                       or not np.isfinite(f["state"][()]).all()):
                    problems.append(f"{p}: state has shape {f['state'].shape} or non-finite values; expected "
                                    f"(T={len(action)}, D), finite")
                elif empty := [k for k in ("seen", "unseen") if k in ("seen", *f) and not read_instructions(f, k)]:
                    problems.append(f"{p}: {' and '.join(empty)} instructions missing, empty or all blank")
                else:
                    frame_shape = shapes.pop()
                    for v in videos:
                        v[-1:]  # the last frame must decode: catches cut-off data and missing compression filters
                    if len(action) >= chunk + action_offset:
                        usable.append(p)
                    else:
                        print(f"warning: {p}: {len(action)} frames, too short for one chunk of {chunk} at offset "
                              f"{action_offset}; skipped", file=sys.stderr)
        except (OSError, ValueError) as e:
            problems.append(f"{p}: not a readable HDF5 file or truncated ({str(e).splitlines()[0]})")
    if problems:
        raise DataError("\n".join(problems))
    if not usable:
        raise DataError(f"{os.path.dirname(paths[0]) or '.'}: no episode is long enough for one chunk of {chunk}")
    return usable


def check_prompts(paths, texts, vla_path, cameras, proprio, chunk):
    """Every instruction (texts: one list per file) must fit the LLM of vla_path with the image, state and query
    tokens; one line per file that does not. Returns the longest sequence."""
    import model  # here only: the rest of data.py needs no model code, and importing it is slow
    try:
        config, tokenizer = model.load_tokenizer(vla_path)
    except (OSError, ValueError, RuntimeError) as e:
        raise DataError(f"--vla_path: {e}") from None
    problems, longest = [], 0
    for p, ts in zip(paths, texts):
        try:
            longest = max([longest] + [model.check_sequence_length(config, tokenizer, s, cameras, proprio, chunk)
                                       for s in set(ts)])
        except ValueError as e:
            problems.append(f"{p}: {e}")
    if problems:
        raise DataError("\n".join(problems))
    return longest, model.max_positions(config)


def split_episodes(paths, val_episodes, seed):
    """Hold out whole episodes (frames of one episode are near copies, so a frame split would leak)."""
    paths = sorted(paths, key=_natural)
    if not 0 <= val_episodes < len(paths):
        raise DataError(f"--val_episodes {val_episodes}: need 0 <= N < {len(paths)} (the number of episodes)")
    val = set(np.random.default_rng(seed).permutation(len(paths))[:val_episodes].tolist())
    return [p for i, p in enumerate(paths) if i not in val], [p for i, p in enumerate(paths) if i in val]


def compute_stats(arrays):
    """Per-dimension statistics of (T, D) arrays (actions or states) over all their rows, in OpenVLA's layout."""
    a = np.concatenate(arrays)
    return {"mean": a.mean(0).tolist(), "std": a.std(0).tolist(), "max": a.max(0).tolist(), "min": a.min(0).tolist(),
            "q01": np.quantile(a, 0.01, axis=0).tolist(), "q99": np.quantile(a, 0.99, axis=0).tolist(),
            "mask": [True] * a.shape[1]}


def save_stats(path, action_stats, proprio_stats=None, dataset_name="place_shoe", num_transitions=None,
               num_trajectories=None):
    """dataset_statistics.json in OpenVLA's norm_stats layout, so deployment finds the training normalization.
    The counts are informational (nothing reads them back); they are written when given."""
    counts = {"num_transitions": num_transitions, "num_trajectories": num_trajectories}
    entry = {"action": action_stats, **({"proprio": proprio_stats} if proprio_stats else {}),
             **{k: int(v) for k, v in counts.items() if v is not None}}
    with open(path, "w") as f:
        json.dump({dataset_name: entry}, f, indent=2)


def load_stats(path, dataset_name=None, key="action", dim=None):
    """The action (or proprio) block of a dataset_statistics.json; dataset_name picks one when it holds several.
    Its min, max, q01 and q99 must be `dim` (default: as many as min) finite values each, min <= max, q01 <= q99."""
    with open(path) as f:
        stats = json.load(f)
    if dataset_name is None and len(stats) == 1:
        dataset_name = next(iter(stats))
    entry = stats.get(dataset_name) if isinstance(stats.get(dataset_name), dict) else {}
    block = entry.get(key, {})
    missing = {"min", "max", "q01", "q99"} - set(block)
    if missing:
        raise DataError(f"{path}: expected OpenVLA norm_stats {{name: {{'{key}': {{'min', 'max', 'q01', 'q99'}}}}}} "
                        f"with one dataset, or a dataset_name; found {list(stats)[:5]}, missing {sorted(missing)}")
    n, v = dim or np.size(block["min"]), {k: np.array(block[k], dtype=float) for k in ("min", "max", "q01", "q99")}
    bad = [k for k, x in v.items() if x.shape != (n,) or not np.isfinite(x).all()] or \
        [f"{lo} > {hi}" for lo, hi in (("min", "max"), ("q01", "q99")) if (v[lo] > v[hi]).any()]
    if bad:  # min > max would make every action a constant, NaN every action NaN
        raise DataError(f"{path}: {key} {', '.join(bad)}: expected {n} finite values each, min <= max, q01 <= q99")
    return block


def _prepare(actions, stats, mode):
    if mode not in ("bounds", "q99"):
        raise ValueError(f"unknown normalization {mode!r}: use bounds or q99")
    lo, hi = (stats["min"], stats["max"]) if mode == "bounds" else (stats["q01"], stats["q99"])
    if torch.is_tensor(actions):
        dtype = torch.float64 if actions.dtype == torch.float64 else torch.float32
        out = actions.dtype if actions.is_floating_point() else torch.float32
        cast = lambda v: torch.as_tensor(v, dtype=dtype, device=actions.device)
        back, where = lambda y: y.to(out), torch.where
    else:
        out = np.result_type(np.asarray(actions).dtype, np.float32)
        cast = lambda v: np.asarray(v, dtype=np.float64)
        back, where = lambda y: y.astype(out), np.where
    lo, hi = cast(lo), cast(hi)
    raw = cast(stats.get("mask", [True] * len(lo))) == 0  # OpenVLA's mask: False dims pass through untouched
    return cast(actions), lo, hi - lo, (hi - lo) < 1e-8, raw, where, back


def normalize(actions, stats, mode="bounds"):
    """Actions to [-1, 1]: bounds maps min/max (absolute joints are never clipped); q99 maps q01/q99 and clips."""
    x, lo, span, flat, raw, where, back = _prepare(actions, stats, mode)
    y = 2 * (x - lo) / where(flat, 1.0, span) - 1
    if mode == "q99":
        y = y.clip(-1, 1)
    return back(where(raw, x, where(flat, 0.0, y)))


def unnormalize(actions, stats, mode="bounds"):
    y, lo, span, flat, raw, where, back = _prepare(actions, stats, mode)
    return back(where(raw, y, where(flat, lo, (y + 1) / 2 * span + lo)))


def read_instructions(f, key):
    """Instruction variants stored as a vlen UTF-8 array, a fixed-length bytes array or a single string."""
    if key not in f:
        return []
    v = f[key][()]
    items = [v] if f[key].shape == () else list(v)
    return [s for s in (x.decode() if isinstance(x, bytes) else str(x) for x in items) if s.strip()]


def read_state(f):
    """Proprioception per frame: the file's `state` (T, D) when it has one, else the recorded joint vector
    `action` (RoboTwin's action[t] is the joint target recorded at frame t; its ACT/DP converters use it as state)."""
    return f["state" if "state" in f else "action"][()]


def normalize_state(state, stats):
    """OFT's proprioception: min/max bounds to [-1, 1], clipped (a live state may leave the training range)."""
    return normalize(state, stats, "bounds").clip(-1, 1)


def _frames(dsets, t, swap_red_blue=False):
    x = np.stack([d[t] for d in dsets])
    return torch.from_numpy((x[..., ::-1] if swap_red_blue else x).transpose(0, 3, 1, 2).copy())


def read_episode(path, cameras=DEFAULT_CAMERAS, swap_red_blue=False):
    """A whole episode for stepping through it: actions and states in memory, frames(t) -> uint8 (N, 3, H, W) read
    on demand (red and blue reversed for files known to hold them swapped)."""
    f = h5py.File(path, "r")
    dsets = [f[c] for c in cameras]
    return {"length": len(f["action"]), "actions": f["action"][()], "states": read_state(f),
            "seen": read_instructions(f, "seen"), "unseen": read_instructions(f, "unseen"),
            "frames": lambda t: _frames(dsets, t, swap_red_blue), "close": f.close}


class EpisodeDataset(torch.utils.data.Dataset):
    """One sample per frame t with a full chunk: camera frames at t, an instruction, actions[t+o : t+o+chunk];
    with proprio, the normalized state at t; with image_aug, uniform draws (cameras, 6) for the model's augmentation.
    Instruction and augmentation draws are seeded per sample, so resumed runs and any worker count see the same."""

    def __init__(self, paths, cameras=DEFAULT_CAMERAS, chunk=8, action_dim=14, stats=None, norm="bounds",
                 action_offset=0, instructions="seen", instruction_variant=None, seed=0, proprio=False,
                 proprio_stats=None, image_aug=False, swap_red_blue=False):
        self.paths = check_episodes(list_episodes(paths), cameras, chunk, action_dim, action_offset)
        self.cameras, self.chunk, self.action_offset, self.norm = list(cameras), chunk, action_offset, norm
        self.instruction_variant, self.seed, self.epoch = instruction_variant, seed, 0
        self.image_aug, self.swap_red_blue = image_aug, swap_red_blue
        actions, states, self.instructions, problems = [], [], [], []
        for p in self.paths:  # actions, states and texts are small: keep them; frames stay on disk
            with h5py.File(p, "r") as f:
                actions.append(f["action"][()])
                states += [read_state(f)] if proprio else []
                self.instructions.append(read_instructions(f, instructions))
                self.frame_sizes = {c: list(f[c].shape[1:3]) for c in cameras}  # the same in every file (checked)
            if not self.instructions[-1]:
                problems.append(f"{p}: no '{instructions}' instructions")
            if proprio and states[-1].shape != (len(actions[-1]), states[0].shape[1]):
                problems.append(f"{p}: state has shape {states[-1].shape}, expected ({len(actions[-1])}, "
                                f"{states[0].shape[1]}) like {self.paths[0]}")
        if problems:
            raise DataError("\n".join(problems))
        self.stats = stats if stats is not None else compute_stats(actions)
        if len(self.stats["min"]) != action_dim:
            raise DataError(f"the statistics have {len(self.stats['min'])} action dimensions, not {action_dim}")
        self.proprio_stats = (proprio_stats or compute_stats(states)) if proprio else None
        self.actions = [normalize(a, self.stats, norm).astype(np.float32) for a in actions]
        self.states = [normalize_state(s, self.proprio_stats).astype(np.float32) for s in states] if proprio else None
        self.proprio_dim = states[0].shape[1] if proprio else 0
        self.lengths = [len(a) for a in actions]
        self.index = [(e, t) for e, n in enumerate(self.lengths) for t in range(n - chunk - action_offset + 1)]
        self._files, self._pid = {}, None

    def __getstate__(self):  # spawned workers get no h5py handles (they cannot be pickled); they open their own
        return {**self.__dict__, "_files": {}, "_pid": None}

    def set_epoch(self, epoch):
        """New instruction draws each epoch (effective in workers that are re-created per epoch, the default)."""
        self.epoch = epoch

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        i = range(len(self.index))[i]  # negative indices too: i seeds the instruction draw
        e, t = self.index[i]
        if self._pid != os.getpid():  # h5py handles must not cross a fork: each worker opens its own, once
            self._files, self._pid = {}, os.getpid()
        if e not in self._files:
            f = h5py.File(self.paths[e], "r")
            self._files[e] = (f, [f[c] for c in self.cameras])
        texts, rng = self.instructions[e], np.random.default_rng([self.seed, self.epoch, i])
        k = rng.integers(len(texts)) if self.instruction_variant is None else self.instruction_variant % len(texts)
        start = t + self.action_offset
        sample = {"images": _frames(self._files[e][1], t, self.swap_red_blue), "instruction": texts[k],
                  "actions": torch.from_numpy(self.actions[e][start:start + self.chunk]), "episode": e, "t": t}
        if self.states is not None:
            sample["state"] = torch.from_numpy(self.states[e][t])
        if self.image_aug:
            sample["aug"] = torch.from_numpy(rng.random((len(self.cameras), 6)))
        return sample


ARM_WORDS = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def named_arm(instructions):
    """'left' or 'right' by majority of the instructions that name exactly one arm; None if none does, or a tie."""
    said = [words.pop() for words in ({w.lower() for w in ARM_WORDS.findall(s)} for s in instructions)
            if len(words) == 1]
    return None if said.count("left") == said.count("right") else max(("left", "right"), key=said.count)


def moving_arm(action):
    """The arm whose six joints travel furthest over a (T, 14) episode in ACTION_NAMES' order; None if a tie."""
    travel = np.abs(np.diff(action, axis=0)).sum(0)
    left, right = travel[:6].sum(), travel[7:13].sum()
    return None if left == right else "left" if left > right else "right"


def check_arms(paths, actions, instructions):
    """Instructions that name the arm which does not move belong to another episode: RoboTwin's OFT conversion
    looked them up by shuffled position. Prints what it finds; returns the disagreeing files."""
    named = [(p, said, moved) for p, a, s in zip(paths, actions, instructions)
             if (said := named_arm(s)) and (moved := moving_arm(a))]
    wrong = [os.path.basename(p) for p, said, moved in named if said != moved]
    if named and not wrong:
        print(f"arms: all {len(named)} episodes whose instructions name an arm move that arm most")
    elif wrong:
        print(f"arms: in {len(wrong)} of {len(named)} episodes the instructions name one arm and the other arm moves "
              "most: " + ", ".join(wrong))
    if 2 * len(wrong) > len(named):
        print("arms: most disagree, so these files look like RoboTwin's OFT conversion (instructions looked up by "
              "shuffled position; it also swapped red and blue); reconvert the raw episodes with "
              "python robotwin/convert.py RoboTwin/data/<task>/<config> OUT_DIR")
    return wrong


def summarize(data_dir, cameras, chunk, action_dim, action_offset, swap_red_blue=False, preview=None, vla_path=None,
              proprio=False):
    paths = check_episodes(list_episodes(data_dir), cameras, chunk, action_dim, action_offset)
    actions, texts, has_state = [], {"seen": [], "unseen": []}, []
    for p in paths:
        with h5py.File(p, "r") as f:
            actions.append(f["action"][()])
            has_state.append("state" in f)
            shape = f[cameras[0]].shape[1:3]
            for key in texts:
                texts[key].append(read_instructions(f, key))
    fits = vla_path and check_prompts(paths, [s + u for s, u in zip(*texts.values())], vla_path, len(cameras), proprio,
                                      chunk)
    stats, lengths = compute_stats(actions), [len(a) for a in actions]
    samples = sum(n - chunk - action_offset + 1 for n in lengths)
    print(f"{len(paths)} episodes, {sum(lengths)} frames (length {min(lengths)}-{max(lengths)}, "
          f"mean {np.mean(lengths):.0f}), {samples} samples (chunk {chunk}, action offset {action_offset})")
    print(f"cameras: {', '.join(cameras)} at {shape[0]}x{shape[1]}" + " (red and blue swapped on read)" * swap_red_blue)
    print(f"state for --proprio: {sum(has_state)} episodes have a `state` dataset; the others use `action`")
    print(f"{'action':<16}{'min':>9}{'max':>9}{'mean':>9}{'std':>9}")
    names = ACTION_NAMES if action_dim == len(ACTION_NAMES) else [f"dim_{i}" for i in range(action_dim)]
    for i, name in enumerate(names):
        print(f"{name:<16}" + "".join(f"{stats[k][i]:9.3f}" for k in ("min", "max", "mean", "std")))
    for key, per_episode in texts.items():
        counts, examples = [len(t) for t in per_episode], [s for t in per_episode for s in t][:2]
        print(f"{key}: {min(counts)}-{max(counts)} variants per episode, e.g. " + " | ".join(examples) if max(counts)
              else f"{key}: none")
    if fits:
        print(f"prompts: the longest instruction fills {fits[0]} of the LLM's {fits[1]} positions")
    if action_dim == len(ACTION_NAMES):
        check_arms(paths, actions, texts["seen"])
    if preview:  # the first frame of every camera as training will read it: check the colours by eye
        episode = read_episode(paths[0], cameras, swap_red_blue)
        Image.fromarray(np.concatenate(episode["frames"](0).permute(0, 2, 3, 1).numpy(), 1)).save(preview)
        print(f"wrote {preview}: frame 0 of {paths[0]}, cameras left to right")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir", nargs="?", help="directory of episode_*.hdf5 files to check")
    parser.add_argument("--cameras", default=",".join(DEFAULT_CAMERAS),
                        help="comma-separated, in order, any of " + ", ".join(ALL_CAMERAS))
    parser.add_argument("--chunk", type=int, default=8, help="actions per sample")
    parser.add_argument("--action_dim", type=int, default=14, help="action width every file must have")
    parser.add_argument("--action_offset", type=int, default=0, help=ACTION_OFFSET_HELP)
    parser.add_argument("--swap_red_blue", action="store_true", help="read frames with red and blue reversed, as "
                        "train.py --swap_red_blue does (files known to hold them swapped)")
    parser.add_argument("--preview", metavar="PNG", help="also write frame 0 of every camera, as training sees it")
    parser.add_argument("--vla_path", help="also check that every instruction fits this model's LLM with the image and "
                        "query tokens (reads its config.json and tokenizer only)")
    parser.add_argument("--proprio", action="store_true", help="count the state token too, as train.py --proprio")
    args = parser.parse_args()
    try:
        if args.data_dir:
            summarize(args.data_dir, args.cameras.split(","), args.chunk, args.action_dim, args.action_offset,
                      args.swap_red_blue, args.preview, args.vla_path, args.proprio)
        else:
            parser.error("give a directory to check (demo episodes: python demo.py DIR)")
    except DataError as e:
        sys.exit(str(e))
