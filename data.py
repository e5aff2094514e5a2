"""
Robot episodes for nanoOFT: the chunked HDF5 dataset, action statistics and a data check.

It reads RoboTwin's OFT conversion, ACT's sim and real ALOHA episodes (JPEG frames too) and robomimic/LIBERO files
of many demos (each an episode FILE.hdf5:demo_N); `python data.py DIR` names the layout and the train.py flags.
$ python data.py /path/to/place_shoe --cameras head_camera_image,left_wrist_image --chunk 8 --action_dim 14
$ python data.py /path/to/place_shoe --vla_path openvla/openvla-7b --preview frame.png   # prompt lengths, colours
$ python data.py /path/to/act_sim_transfer_cube --instruction "transfer the cube to the left arm"
Synthetic episodes in RoboTwin's layout: python demo.py demo_data --episodes 48 --seed 0
"""

import argparse
import glob
import hashlib
import io
import json
import os
import re
import shlex
import sys
from collections import OrderedDict

import h5py
import numpy as np
import torch
from PIL import Image

ALL_CAMERAS = ["head_camera_image", "left_wrist_image", "right_wrist_image", "low_cam_image"]  # RoboTwin's
DEFAULT_CAMERAS = ["head_camera_image", "left_wrist_image"]
STATE_KEYS = ["state", "observations/qpos", "obs/joint_states,obs/gripper_states"]  # what --state_key auto tries
MAX_OPEN = 64  # episode files a loader process keeps open: 10,000 episodes must not hit `ulimit -n` (often 1024)
ACTION_NAMES = [f"{arm}_{j}" for arm in ("left", "right") for j in ("j1", "j2", "j3", "j4", "j5", "j6", "gripper")]
ACTION_OFFSET_HELP = (
    "the target of frame t is action[t+o : t+o+chunk]. RoboTwin's action[t] is the joint target "
    "recorded at frame t, close to the state the frame already shows, and RoboTwin's own converters "
    "train on action[t+1]: 1 may suit it"
)
STATE_KEY_HELP = (
    f"dataset(s) --proprio reads, comma-separated ones concatenated; default: the first of "
    f"{' | '.join(STATE_KEYS)} the episodes hold, else the action"
)


class DataError(ValueError):
    """Bad input data; the message holds one line per problem, each naming the file."""


def _natural(path):
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", str(path))]


def split_ref(ref):
    """FILE.hdf5:demo_N (a demo inside a robomimic/LIBERO file) -> (FILE.hdf5, demo_N); a plain file -> (it, None)."""
    m = re.fullmatch(r"(.+\.hdf5):([^/:]+)", str(ref))
    return (m[1], m[2]) if m else (str(ref), None)


def open_episode(ref):
    """The open file and the group that holds the episode's datasets: the root, or data/demo_N."""
    path, demo = split_ref(ref)
    f = h5py.File(path, "r")
    if demo is not None and not isinstance(f.get(f"data/{demo}"), h5py.Group):
        f.close()
        raise DataError(f"{ref}: {path} has no group data/{demo}")
    return f, f[f"data/{demo}"] if demo else f


def _demos(path):  # robomimic/LIBERO's data/demo_N groups; a broken file has none here (check_episodes names it)
    try:
        with h5py.File(path, "r") as f:
            return [f"{path}:{k}" for k, v in f["data"].items() if isinstance(v, h5py.Group)] if "data" in f else []
    except (OSError, AttributeError):
        return []


def list_episodes(data_dir_or_paths):
    """The episodes of directories (their episode_*.hdf5, else every *.hdf5) or files, a multi-demo file giving one
    FILE.hdf5:demo_N per demo, in natural order (episode_2 before episode_10)."""
    items = [data_dir_or_paths] if isinstance(data_dir_or_paths, (str, os.PathLike)) else list(data_dir_or_paths)
    refs = []
    for item in map(str, items):
        if not os.path.exists(split_ref(item)[0]):
            raise DataError(f"{item}: no such file or directory")
        files = [item]
        if os.path.isdir(item):
            files = glob.glob(os.path.join(item, "episode_*.hdf5")) or glob.glob(os.path.join(item, "*.hdf5"))
        refs += [r for p in files for r in (split_ref(p)[1] is None and _demos(p) or [p])]
    if not refs:
        raise DataError(
            f"{', '.join(map(str, items)) or '(no path given)'}: no episode_*.hdf5 (or other .hdf5) files found"
        )
    return sorted(refs, key=_natural)


def detect_layout(f, g):
    """(name, cameras, action key) of the layout an episode is stored in; None for a layout nanoOFT does not know."""
    if isinstance(g.get("observations/images"), h5py.Group):
        name = "real ALOHA, JPEG frames" if f.attrs.get("compress", False) else "ACT/ALOHA"
        return name, [f"observations/images/{c}" for c in g["observations/images"]], "action"
    if g is not f:
        return "robomimic/LIBERO", [f"obs/{k}" for k in g.get("obs", {}) if k.endswith(("rgb", "image"))], "actions"
    cameras = [c for c in DEFAULT_CAMERAS if c in g] or [c for c in ALL_CAMERAS if c in g]
    return ("RoboTwin (flat)", cameras, "action") if cameras else None


def _jpeg_lengths(f, d, name):
    """compress_len's rows follow the recorder's camera order, which HDF5 does not keep: this camera's row is the one
    whose lengths end its padded frames where their JPEGs end (FF D9, then zeros)."""
    rows = f["compress_len"][()] if "compress_len" in f else np.zeros((0, 0))
    ts = sorted({0, len(d) // 2, len(d) - 1})
    frames = d[ts]
    for row in rows.astype(int) if rows.ndim == 2 and rows.shape[1] == len(d) else []:
        if (
            2 <= row.min()
            and row.max() <= d.shape[1]
            and all(x[n - 2 : n].tobytes() == b"\xff\xd9" and not x[n:].any() for x, n in zip(frames, row[ts]))
        ):
            return row
    raise DataError(
        f"{name}: no row of compress_len {rows.shape} gives the lengths of its JPEG frames (missing, "
        f"longer than the {d.shape[1]} bytes stored per frame, or the frames are not JPEG)"
    )


def camera_reader(f, g, camera, ref):
    """Frame t of a camera as (H, W, 3) uint8 RGB. ALOHA's compressed files hold each frame as a zero-padded JPEG
    that cv2 encoded from the RGB array as if it were BGR, so PIL decodes it with red and blue reversed."""
    d = g[camera]
    if not (f.attrs.get("compress", False) and d.ndim == 2):
        return d.__getitem__
    lengths = _jpeg_lengths(f, d, f"{ref}: {camera}")
    return lambda t: np.asarray(Image.open(io.BytesIO(d[t][: lengths[t]].tobytes())).convert("RGB"))[..., ::-1]


def _filters(d):
    plist = d.id.get_create_plist()
    found = [plist.get_filter(i) for i in range(plist.get_nfilters())]
    return [f"{name.decode() or 'unnamed'} (id {fid})" for fid, _, _, name in found if not h5py.h5z.filter_avail(fid)]


def read_instructions(f, g, key="seen", instruction=None):
    """Instruction variants: the episode's `key` dataset (a vlen UTF-8 array, a fixed-length bytes array or one
    string); else, for seen, LIBERO's problem_info attribute, else [instruction] (train.py --instruction)."""
    if key in g:
        d = g[key]
        if d.dtype.kind not in "SOU" or d.ndim > 1:
            raise DataError(f"{key} holds {d.dtype} {d.shape}, not text (one string or a 1-D array of strings)")
        try:
            items = [x.decode() if isinstance(x, bytes) else x for x in ([d[()]] if d.ndim == 0 else d[()])]
        except UnicodeDecodeError as e:
            raise DataError(f"{key} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        return [s for s in items if isinstance(s, str) and s.strip()]
    try:
        info = f["data"].attrs.get("problem_info") if g is not f and key == "seen" else None
        return (
            [s for s in [json.loads(info)["language_instruction"]] if s.strip()]
            if info is not None
            else [instruction] * bool(instruction and key == "seen")
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        raise DataError("data.attrs['problem_info'] is not JSON with a language_instruction string") from None


def state_key_of(g, state_key=None, action_key="action"):
    """--state_key, else the first of STATE_KEYS the episode holds, else the action (RoboTwin's action[t] is the joint
    target recorded at frame t; its ACT/DP converters use it as the state); None: the episode lacks --state_key."""
    for key in [state_key] if state_key else STATE_KEYS + [action_key]:
        if all(k in g for k in key.split(",")):
            return key
    return None


def read_state(g, key):
    return np.concatenate([g[k][()].reshape(len(g[k]), -1) for k in key.split(",")], 1)


def _numbers(g, key, length):
    """A (T, D) dataset (comma-separated keys: side by side) read whole; refused unless finite numbers per frame."""
    sets = [g[k] for k in key.split(",")]
    if any(d.dtype.kind not in "iuf" for d in sets):
        raise DataError(f"{key} holds {', '.join(str(d.dtype) for d in sets)}, not numbers")
    if any(d.ndim != 2 or len(d) != length for d in sets):
        raise DataError(f"{key} has shape {' + '.join(str(d.shape) for d in sets)}, expected (T={length}, D)")
    if not np.isfinite(values := read_state(g, key)).all():
        raise DataError(f"{key} holds NaN or inf")
    return values


def _check_episode(ref, cameras, action_dim, action_key, state_key, instruction):
    """Length, frame shape and a fingerprint of the actions of one episode; a DataError says what is wrong."""
    f, g = open_episode(ref)
    with f:
        missing, layout = [k for k in [action_key, *cameras] if k not in g], detect_layout(f, g)
        if missing and layout is None:
            sets = [k for k in g if isinstance(g.get(k), h5py.Dataset)]
            raise DataError(
                f"no known episode layout (RoboTwin's flat datasets, ALOHA's observations/images, "
                f"robomimic's data/demo_N): it holds datasets {', '.join(sets) or 'none'} and groups "
                f"{', '.join(k for k in g if k not in sets) or 'none'}"
            )
        if missing:
            raise DataError(
                f"missing {', '.join(missing)} (a {layout[0]} episode: `python data.py DIR` prints the "
                "flags that read it)"
            )
        action, videos = g[action_key], [g[c] for c in cameras]
        if action.ndim == 2 and action.dtype.kind in "iuf" and action.shape[1] != action_dim:
            raise DataError(f"{action_key} has shape {action.shape}, expected (T, {action_dim}) (--action_dim)")
        values = _numbers(g, action_key, len(action))
        if any(
            v.dtype != np.uint8 or not (v.ndim == 4 and v.shape[3] == 3 or v.ndim == 2 and f.attrs.get("compress"))
            for v in videos
        ):
            found = ", ".join(f"{c} {v.dtype} {v.shape}" for c, v in zip(cameras, videos))
            raise DataError(
                f"camera frames must be uint8 (T, H, W, 3), or padded JPEGs (T, bytes) in a file with "
                f"compress set; found {found}"
            )
        if {len(v) for v in videos} != {len(action)}:
            raise DataError(
                f"cameras and action differ in length: {action_key} {len(action)}, "
                + ", ".join(f"{c} {len(v)}" for c, v in zip(cameras, videos))
            )
        key = state_key_of(g, state_key, action_key)
        if key is None:
            raise DataError(f"missing {state_key} (--state_key)")
        if key != action_key:
            _numbers(g, key, len(action))
        if not read_instructions(f, g, "seen", instruction):
            raise DataError(
                "seen instructions missing, empty or all blank"
                if "seen" in g
                else "no instructions (no "
                'seen dataset or LIBERO problem_info): pass --instruction "what the robot should do"'
            )
        if "unseen" in g and not read_instructions(f, g, "unseen"):
            raise DataError("unseen instructions missing, empty or all blank")
        shapes = set()  # of every camera's first and last frames: all of them, in every episode, must agree
        for c, v in zip(cameras, videos):
            read = camera_reader(f, g, c, ref)
            try:  # the last frame must decode: catches cut-off data, missing compression filters, broken JPEGs
                shapes |= {read(-1).shape, read(0).shape} if v.ndim == 2 else {read(-1).shape}
            except (OSError, ValueError) as e:
                why = (
                    f"stored with HDF5 filter {', '.join(_filters(v))}, not installed here"
                    if _filters(v)
                    else str(e).splitlines()[0]
                )
                raise DataError(f"{c}: its frames do not read ({why})") from None
        return len(action), shapes, hashlib.sha1(np.ascontiguousarray(values)).hexdigest()


def check_episodes(
    paths, cameras, chunk, action_dim, action_offset=0, action_key="action", state_key=None, instruction=None
):
    """Validate every episode up front (so a broken one fails now, not hours into training); return the usable ones."""
    if not cameras or not all(cameras):
        raise DataError(f"--cameras {','.join(cameras)}: give the camera datasets, comma-separated")
    if chunk < 1 or action_offset < 0 or action_dim < 1:
        raise DataError(
            f"need chunk >= 1, action_offset >= 0 and action_dim >= 1; got {chunk}, {action_offset}, {action_dim}"
        )
    problems, usable, frame_shapes, seen = [], [], set(), {}
    for p in paths:
        path, demo = split_ref(p)
        try:
            if not os.path.isfile(path):
                raise DataError("no such file or directory")
            length, shapes, digest = _check_episode(p, cameras, action_dim, action_key, state_key, instruction)
            if twin := seen.get((os.path.realpath(path), demo)) or seen.get(digest):
                raise DataError(f"the same episode as {twin} (same file or same actions): remove one")
            if len(shapes | frame_shapes) > 1:
                raise DataError(
                    f"frame sizes differ: {sorted(shapes | frame_shapes)} (all cameras, all episodes must agree)"
                )
        except DataError as e:
            problems.append(f"{p}: {str(e).removeprefix(f'{p}: ')}")
            continue
        except (OSError, ValueError) as e:
            problems.append(f"{p}: not a readable HDF5 file or truncated ({str(e).splitlines()[0]})")
            continue
        seen[(os.path.realpath(path), demo)] = seen[digest] = p
        frame_shapes = shapes
        if length >= chunk + action_offset:
            usable.append(p)
        else:
            print(
                f"warning: {p}: {length} frames, too short for one chunk of {chunk} at offset {action_offset}; skipped",
                file=sys.stderr,
            )
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
            longest = max(
                [longest]
                + [model.check_sequence_length(config, tokenizer, s, cameras, proprio, chunk) for s in set(ts)]
            )
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
    return {
        "mean": a.mean(0).tolist(),
        "std": a.std(0).tolist(),
        "max": a.max(0).tolist(),
        "min": a.min(0).tolist(),
        "q01": np.quantile(a, 0.01, axis=0).tolist(),
        "q99": np.quantile(a, 0.99, axis=0).tolist(),
        "mask": [True] * a.shape[1],
    }


def save_stats(
    path, action_stats, proprio_stats=None, dataset_name="place_shoe", num_transitions=None, num_trajectories=None
):
    """dataset_statistics.json in OpenVLA's norm_stats layout, so deployment finds the training normalization.
    The counts are informational (nothing reads them back); they are written when given."""
    counts = {"num_transitions": num_transitions, "num_trajectories": num_trajectories}
    entry = {
        "action": action_stats,
        **({"proprio": proprio_stats} if proprio_stats else {}),
        **{k: int(v) for k, v in counts.items() if v is not None},
    }
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
        raise DataError(
            f"{path}: expected OpenVLA norm_stats {{name: {{'{key}': {{'min', 'max', 'q01', 'q99'}}}}}} "
            f"with one dataset, or a dataset_name; found {list(stats)[:5]}, missing {sorted(missing)}"
        )
    n, v = dim or np.size(block["min"]), {k: np.array(block[k], dtype=float) for k in ("min", "max", "q01", "q99")}
    bad = [k for k, x in v.items() if x.shape != (n,) or not np.isfinite(x).all()] or [
        f"{lo} > {hi}" for lo, hi in (("min", "max"), ("q01", "q99")) if (v[lo] > v[hi]).any()
    ]
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

        def cast(v):
            return torch.as_tensor(v, dtype=dtype, device=actions.device)

        back, where = lambda y: y.to(out), torch.where
    else:
        out = np.result_type(np.asarray(actions).dtype, np.float32)

        def cast(v):
            return np.asarray(v, dtype=np.float64)

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


def normalize_state(state, stats):
    """OFT's proprioception: min/max bounds to [-1, 1], clipped (a live state may leave the training range)."""
    return normalize(state, stats, "bounds").clip(-1, 1)


def _frames(readers, t, swap_red_blue=False):
    x = np.stack([read(t) for read in readers])
    return torch.from_numpy((x[..., ::-1] if swap_red_blue else x).transpose(0, 3, 1, 2).copy())


def read_episode(
    ref, cameras=DEFAULT_CAMERAS, swap_red_blue=False, action_key="action", state_key=None, instruction=None
):
    """A whole episode to step through: actions and states in memory, frames(t) -> uint8 (N, 3, H, W) from disk."""
    f, g = open_episode(ref)
    readers = [camera_reader(f, g, c, ref) for c in cameras]
    return {
        "length": len(g[action_key]),
        "actions": g[action_key][()],
        "states": read_state(g, state_key_of(g, state_key, action_key) or action_key),
        "seen": read_instructions(f, g, "seen", instruction),
        "unseen": read_instructions(f, g, "unseen"),
        "frames": lambda t: _frames(readers, t, swap_red_blue),
        "close": f.close,
    }


class EpisodeDataset(torch.utils.data.Dataset):
    """One sample per frame t: its camera frames, an instruction, actions[t+o : t+o+chunk], the normalized state
    with proprio, uniform draws (cameras, 6) with image_aug; draws seeded per sample, for any resume or worker count."""

    def __init__(
        self,
        paths,
        cameras=DEFAULT_CAMERAS,
        chunk=8,
        action_dim=14,
        stats=None,
        norm="bounds",
        action_offset=0,
        instructions="seen",
        instruction_variant=None,
        seed=0,
        proprio=False,
        proprio_stats=None,
        image_aug=False,
        swap_red_blue=False,
        action_key="action",
        state_key=None,
        instruction=None,
    ):
        self.paths = check_episodes(
            list_episodes(paths), cameras, chunk, action_dim, action_offset, action_key, state_key, instruction
        )
        self.cameras, self.chunk, self.action_offset, self.norm = list(cameras), chunk, action_offset, norm
        self.instruction_variant, self.seed, self.epoch = instruction_variant, seed, 0
        self.image_aug, self.swap_red_blue = image_aug, swap_red_blue
        actions, states, keys, self.instructions = [], [], [], []
        for p in self.paths:  # actions, states and texts are small: keep them; frames stay on disk
            f, g = open_episode(p)
            with f:
                actions.append(g[action_key][()])
                keys.append(state_key_of(g, state_key, action_key))
                states += [read_state(g, keys[-1])] if proprio else []
                self.instructions.append(read_instructions(f, g, instructions, instruction))
                if p == self.paths[0]:  # the same in every file (checked)
                    self.frame_sizes = {c: list(camera_reader(f, g, c, p)(0).shape[:2]) for c in cameras}
        problems = [
            f"{p}: no '{instructions}' instructions" for p, texts in zip(self.paths, self.instructions) if not texts
        ]
        kinds = [(k, s.shape[1]) for k, s in zip(keys, states)]  # a state in milli-units beside one in radians, say
        if len(set(kinds)) > 1:
            problems.append(
                f"--proprio: {self.paths[0]} reads its state from {keys[0]} ({kinds[0][1]} wide), but "
                + ", ".join(f"{p} from {k} ({w} wide)" for p, (k, w) in zip(self.paths, kinds) if (k, w) != kinds[0])[
                    :400
                ]
                + ": pass --state_key"
            )
        if problems:
            raise DataError("\n".join(problems))
        self.state_key = keys[0] if proprio else None
        self.stats = stats if stats is not None else compute_stats(actions)
        if len(self.stats["min"]) != action_dim:
            raise DataError(f"the statistics have {len(self.stats['min'])} action dimensions, not {action_dim}")
        self.proprio_stats = (proprio_stats or compute_stats(states)) if proprio else None
        self.actions = [normalize(a, self.stats, norm).astype(np.float32) for a in actions]
        self.states = [normalize_state(s, self.proprio_stats).astype(np.float32) for s in states] if proprio else None
        self.proprio_dim = states[0].shape[1] if proprio else 0
        self.lengths = [len(a) for a in actions]
        self.index = [(e, t) for e, n in enumerate(self.lengths) for t in range(n - chunk - action_offset + 1)]
        self._files, self._pid = OrderedDict(), None

    def __getstate__(self):  # spawned workers get no h5py handles (they cannot be pickled); they open their own
        return {**self.__dict__, "_files": OrderedDict(), "_pid": None}

    def set_epoch(self, epoch):
        """New instruction draws each epoch (effective in workers that are re-created per epoch, the default)."""
        self.epoch = epoch

    def __len__(self):
        return len(self.index)

    def _readers(self, e):
        """The episode's camera readers; each process keeps the MAX_OPEN files it used last open."""
        if self._pid != os.getpid():  # h5py handles must not cross a fork: each worker opens its own
            self._files, self._pid = OrderedDict(), os.getpid()
        if e not in self._files:
            if len(self._files) >= MAX_OPEN:
                self._files.popitem(last=False)[1][0].close()
            f, g = open_episode(self.paths[e])
            self._files[e] = (f, [camera_reader(f, g, c, self.paths[e]) for c in self.cameras])
        self._files.move_to_end(e)
        return self._files[e][1]

    def __getitem__(self, i):
        i = range(len(self.index))[i]  # negative indices too: i seeds the instruction draw
        e, t = self.index[i]
        try:
            images = _frames(self._readers(e), t, self.swap_red_blue)
        except (OSError, ValueError, KeyError) as err:  # deleted, truncated or rewritten while training
            self._files.pop(e, None)
            raise DataError(f"{self.paths[e]}: frame {t} no longer reads ({str(err).splitlines()[0]})") from None
        texts, rng = self.instructions[e], np.random.default_rng([self.seed, self.epoch, i])
        k = rng.integers(len(texts)) if self.instruction_variant is None else self.instruction_variant % len(texts)
        start = t + self.action_offset
        sample = {
            "images": images,
            "instruction": texts[k],
            "actions": torch.from_numpy(self.actions[e][start : start + self.chunk]),
            "episode": e,
            "t": t,
        }
        if self.states is not None:
            sample["state"] = torch.from_numpy(self.states[e][t])
        if self.image_aug:
            sample["aug"] = torch.from_numpy(rng.random((len(self.cameras), 6)))
        return sample


ARM_WORDS = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def named_arm(instructions):
    """'left' or 'right' by majority of the instructions that name exactly one arm; None if none does, or a tie."""
    said = [
        words.pop() for words in ({w.lower() for w in ARM_WORDS.findall(s)} for s in instructions) if len(words) == 1
    ]
    return None if said.count("left") == said.count("right") else max(("left", "right"), key=said.count)


def moving_arm(action):
    """The arm whose six joints travel at least twice as far as the other's in a (T, 14) episode, else None (a
    handover moves both, and its instructions may name the receiving arm)."""
    travel = np.abs(np.diff(action, axis=0)).sum(0)
    left, right = travel[:6].sum(), travel[7:13].sum()
    return "left" if left > 2 * right else "right" if right > 2 * left else None


def check_arms(paths, actions, instructions):
    """Instructions that name the arm which does not move belong to another episode: RoboTwin's OFT conversion
    looked them up by shuffled position. Prints what it finds; returns the disagreeing files."""
    named = [
        (p, said, moved)
        for p, a, s in zip(paths, actions, instructions)
        if (said := named_arm(s)) and (moved := moving_arm(a))
    ]
    wrong = [os.path.basename(p) for p, said, moved in named if said != moved]
    if named and not wrong:
        print(f"arms: all {len(named)} episodes whose instructions name an arm move that arm most")
    elif wrong:
        print(
            f"arms: in {len(wrong)} of {len(named)} episodes the instructions name one arm and the other arm moves "
            "most: " + ", ".join(wrong)
        )
    if 2 * len(wrong) > len(named):
        print(
            "arms: most disagree, so these files look like RoboTwin's OFT conversion (instructions looked up by "
            "shuffled position; it also swapped red and blue); reconvert the raw episodes with "
            "python robotwin/convert.py RoboTwin/data/<task>/<config> OUT_DIR"
        )
    return wrong


def summarize(
    data_dir,
    cameras=None,
    chunk=8,
    action_dim=None,
    action_offset=0,
    swap_red_blue=False,
    preview=None,
    vla_path=None,
    proprio=False,
    action_key=None,
    state_key=None,
    instruction=None,
):
    """Print what the episodes hold and the train.py flags that read them; every problem is a DataError."""
    refs, layout, width, texts_inside = list_episodes(data_dir), None, None, True
    try:  # the first episode tells the layout; check_episodes names it when it is broken
        f, g = open_episode(refs[0])
        with f:
            layout = detect_layout(f, g)
            key = action_key or (layout[2] if layout else "action")
            width = g[key].shape[-1] if key in g and g[key].ndim == 2 else None
            texts_inside = "seen" in g or g is not f and "problem_info" in f["data"].attrs
    except (OSError, DataError):
        pass
    cameras = cameras or (layout[1] if layout and layout[1] else DEFAULT_CAMERAS)
    action_key, action_dim = action_key or (layout[2] if layout else "action"), action_dim or width or 14
    text = instruction or (None if texts_inside else "TEXT")  # TEXT stands for the instruction the files lack
    paths = check_episodes(refs, cameras, chunk, action_dim, action_offset, action_key, state_key, text)
    actions, texts, keys = [], {"seen": [], "unseen": []}, []
    for p in paths:
        f, g = open_episode(p)
        with f:
            actions.append(g[action_key][()])
            keys.append(state_key_of(g, state_key, action_key))
            for key in texts:
                texts[key].append(read_instructions(f, g, key, text))
    fits = vla_path and check_prompts(
        paths, [s + u for s, u in zip(*texts.values())], vla_path, len(cameras), proprio, chunk
    )
    stats, lengths = compute_stats(actions), [len(a) for a in actions]
    samples = sum(n - chunk - action_offset + 1 for n in lengths)
    files = len({split_ref(p)[0] for p in paths})
    demos = f", {len(paths)} demos in {files} files" if files < len(paths) else ""
    print(f"layout: {layout[0] if layout else 'unknown'}{demos}")
    print(
        f"{len(paths)} episodes, {sum(lengths)} frames (length {min(lengths)}-{max(lengths)}, "
        f"mean {np.mean(lengths):.0f}), {samples} samples (chunk {chunk}, action offset {action_offset})"
    )
    episode = read_episode(paths[0], cameras, swap_red_blue, action_key)
    shape = episode["frames"](0).shape[2:]
    print(f"cameras: {', '.join(cameras)} at {shape[0]}x{shape[1]}" + " (red and blue swapped on read)" * swap_red_blue)
    print("state for --proprio: " + ", ".join(f"{k} in {keys.count(k)} episodes" for k in dict.fromkeys(keys)))
    print(f"{action_key:<16}{'min':>9}{'max':>9}{'mean':>9}{'std':>9}")
    names = ACTION_NAMES if action_dim == len(ACTION_NAMES) else [f"dim_{i}" for i in range(action_dim)]
    for i, name in enumerate(names):
        print(f"{name:<16}" + "".join(f"{stats[k][i]:9.3f}" for k in ("min", "max", "mean", "std")))
    for key, per_episode in texts.items():
        counts, examples = [len(t) for t in per_episode], [s for t in per_episode for s in t][:2]
        print(
            f"{key}: {min(counts)}-{max(counts)} variants per episode, e.g. " + " | ".join(examples)
            if max(counts)
            else f"{key}: none"
        )
    if fits:
        print(f"prompts: the longest instruction fills {fits[0]} of the LLM's {fits[1]} positions")
    if action_dim == len(ACTION_NAMES):
        check_arms(paths, actions, texts["seen"])
    if preview:  # the first frame of every camera as training will read it: check the colours by eye
        Image.fromarray(np.concatenate(episode["frames"](0).permute(0, 2, 3, 1).numpy(), 1)).save(preview)
        print(f"wrote {preview}: frame 0 of {paths[0]}, cameras left to right")
    episode["close"]()
    flags = (
        [("--cameras", ",".join(cameras))]
        + [("--action_key", action_key)] * (action_key != "action")
        + [("--action_dim", str(action_dim))] * (action_dim != 14)
        + [("--state_key", state_key)] * bool(state_key)
        + [("--instruction", text)] * bool(text)
    )
    print(
        "flags: " + " ".join(f"{k} {shlex.quote(v)}" for k, v in flags) + "   # the files hold no instructions: "
        "put what the robot should do in place of TEXT" * (text == "TEXT")
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir", nargs="?", help="directory of episodes (episode_*.hdf5, or multi-demo .hdf5 files)")
    parser.add_argument("--cameras", help="comma-separated camera datasets, in order; default: the layout's")
    parser.add_argument("--action_key", help="the action dataset; default: the layout's (action, or actions)")
    parser.add_argument("--state_key", help=STATE_KEY_HELP)
    parser.add_argument("--instruction", help="the instruction of episodes that carry none (ACT, teleoperation data)")
    parser.add_argument("--chunk", type=int, default=8, help="actions per sample")
    parser.add_argument("--action_dim", type=int, help="action width every file must have; default: the first file's")
    parser.add_argument("--action_offset", type=int, default=0, help=ACTION_OFFSET_HELP)
    parser.add_argument(
        "--swap_red_blue",
        action="store_true",
        help="read frames with red and blue reversed, as "
        "train.py --swap_red_blue does (files known to hold them swapped)",
    )
    parser.add_argument("--preview", metavar="PNG", help="also write frame 0 of every camera, as training sees it")
    parser.add_argument(
        "--vla_path",
        help="also check that every instruction fits this model's LLM with the image and "
        "query tokens (reads its config.json and tokenizer only)",
    )
    parser.add_argument("--proprio", action="store_true", help="count the state token too, as train.py --proprio")
    args = parser.parse_args()
    if not args.data_dir:
        parser.error("give a directory to check (demo episodes: python demo.py DIR)")
    try:
        summarize(
            args.data_dir,
            args.cameras and args.cameras.split(","),
            args.chunk,
            args.action_dim,
            args.action_offset,
            args.swap_red_blue,
            args.preview,
            args.vla_path,
            args.proprio,
            args.action_key,
            args.state_key,
            args.instruction,
        )
    except DataError as e:
        sys.exit(str(e))
