"""
Robot episodes for nanoOFT: the chunked HDF5 dataset, action statistics and the checks that run before training.

It reads RoboTwin's OFT conversion, ACT's sim and real ALOHA episodes (JPEG frames too) and robomimic/LIBERO files
of many demos (each an episode FILE.hdf5:demo_N). Every episode is checked up front (check_episodes), so a broken
file fails in one line naming it before a run starts, not hours into it.

    import data
    train = data.EpisodeDataset(data.list_episodes("out/demo_data"), cameras=["head_camera_image"], chunk=8)
    sample = train[0]   # images uint8 (cameras, 3, H, W), instruction, actions (8, 14) in [-1, 1]

The data check, which prints the layout and the train.py flags that read a directory, is a leaf beside the core:
    python check_data.py /path/to/place_shoe
Synthetic episodes in RoboTwin's layout: python demo.py demo_data --episodes 48 --seed 0
"""

import functools
import glob
import hashlib
import io
import json
import os
import re
import sys
from collections import OrderedDict

import h5py
import numpy as np
import torch
from PIL import Image

# RoboTwin's
ALL_CAMERAS = ["head_camera_image", "left_wrist_image", "right_wrist_image", "low_cam_image"]
DEFAULT_CAMERAS = ["head_camera_image", "left_wrist_image"]
# what --state_key auto tries
STATE_KEYS = ["state", "observations/qpos", "obs/joint_states,obs/gripper_states"]
# episode files a loader process keeps open: 10,000 episodes must not hit `ulimit -n` (often 1024)
MAX_OPEN = 64
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


def action_names(dim):
    """Names of the action dimensions: RoboTwin's and ALOHA's 14 joints, else dim_0, dim_1, ..."""
    if dim == len(ACTION_NAMES):
        return ACTION_NAMES
    return [f"dim_{i}" for i in range(dim)]


# -----------------------------------------------------------------------------
# finding and opening episodes


def open_episode(ref):
    """The open file and the group that holds the episode's datasets: the root, or data/demo_N."""
    path, demo = split_ref(ref)
    f = h5py.File(path, "r")
    if demo is None:
        return f, f
    if not isinstance(f.get(f"data/{demo}"), h5py.Group):
        f.close()
        raise DataError(f"{ref}: {path} has no group data/{demo}")
    return f, f[f"data/{demo}"]


def _demos(path):
    """FILE.hdf5:demo_N for each of a robomimic/LIBERO file's data/demo_N groups; [path] itself for any other file
    (a broken one too: check_episodes names it), and for a data/ group without demos, which check_episodes then
    refuses by name rather than let it pass as another layout."""
    try:
        with h5py.File(path, "r") as f:
            group = f.get("data")
            if isinstance(group, h5py.Group):
                demos = [f"{path}:{k}" for k, v in group.items() if isinstance(v, h5py.Group)]
                if demos:
                    return demos
    except (OSError, AttributeError):
        pass
    return [path]


def list_episodes(data_dir_or_paths):
    """The episodes of directories (their episode_*.hdf5, else every *.hdf5) or files, a multi-demo file giving one
    FILE.hdf5:demo_N per demo, in natural order (episode_2 before episode_10)."""
    if isinstance(data_dir_or_paths, (str, os.PathLike)):
        items = [data_dir_or_paths]
    else:
        items = list(data_dir_or_paths)
    refs = []
    for item in map(str, items):
        path, demo = split_ref(item)
        if not os.path.exists(path):
            raise DataError(f"{item}: no such file or directory")
        if demo is not None:
            refs.append(item)
            continue
        files = [item]
        if os.path.isdir(item):
            files = glob.glob(os.path.join(item, "episode_*.hdf5")) or glob.glob(os.path.join(item, "*.hdf5"))
        refs += [ref for p in files for ref in _demos(p)]
    if not refs:
        given = ", ".join(map(str, items)) or "(no path given)"
        raise DataError(f"{given}: no episode_*.hdf5 (or other .hdf5) files found")
    return sorted(refs, key=_natural)


def detect_layout(f, g):
    """(name, cameras, action key) of the layout an episode is stored in; None for a layout nanoOFT does not know."""
    if isinstance(g.get("observations/images"), h5py.Group):
        name = "real ALOHA, JPEG frames" if f.attrs.get("compress", False) else "ACT/ALOHA"
        return name, [f"observations/images/{c}" for c in g["observations/images"]], "action"
    if g is not f:
        return "robomimic/LIBERO", [f"obs/{k}" for k in g.get("obs", {}) if k.endswith(("rgb", "image"))], "actions"
    cameras = [c for c in DEFAULT_CAMERAS if c in g] or [c for c in ALL_CAMERAS if c in g]
    if not cameras:
        return None
    return "RoboTwin (flat)", cameras, "action"


# -----------------------------------------------------------------------------
# real ALOHA's JPEG frames

# bytes at the start of a frame that hold its JPEG header up to the frame size (SOF): libjpeg writes SOF before the
# Huffman tables, within the first ~200 bytes
JPEG_HEADER = 1024
# the start-of-frame markers (baseline, progressive, ...) that carry the image size; C4, C8 and CC are other segments
JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def jpeg_size(header):
    """(height, width) from a JPEG's first bytes, read off its start-of-frame segment; None if they are no JPEG
    header."""
    b = bytes(header)
    if b[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 9 <= len(b) and b[i] == 0xFF:
        marker, length = b[i + 1], int.from_bytes(b[i + 2 : i + 4], "big")
        if marker in JPEG_SOF:
            return int.from_bytes(b[i + 5 : i + 7], "big"), int.from_bytes(b[i + 7 : i + 9], "big")
        i += 2 + length
    return None


def _jpeg_lengths(f, d, name):
    """compress_len's rows follow the recorder's camera order, which HDF5 does not keep: this camera's row is the one
    whose lengths end its padded frames where their JPEGs end (FF D9, then zeros)."""
    rows = f["compress_len"][()] if "compress_len" in f else np.zeros((0, 0))
    if rows.ndim != 2 or rows.shape[1] != len(d):
        rows = np.zeros((0, len(d)))
    ts = sorted({0, len(d) // 2, len(d) - 1})
    frames = d[ts]
    for row in rows.astype(int):
        if row.min() < 2 or row.max() > d.shape[1]:
            continue
        if all(x[n - 2 : n].tobytes() == b"\xff\xd9" and not x[n:].any() for x, n in zip(frames, row[ts])):
            return row
    raise DataError(
        f"{name}: no row of compress_len {rows.shape} gives the lengths of its JPEG frames (missing, "
        f"longer than the {d.shape[1]} bytes stored per frame, or the frames are not JPEG)"
    )


def check_jpeg_frames(d, lengths, name):
    """Every padded JPEG frame of a camera, checked without decoding (markers and size: cheap): it starts with a
    JPEG header of the first frame's size and ends at its compress_len with the end marker FF D9. Decoding only
    the first and last frames would let a broken frame in the middle fail hours into training. -> (H, W, 3)."""
    headers = d[:, : min(JPEG_HEADER, d.shape[1])]
    first = jpeg_size(headers[0])
    for t, (header, n) in enumerate(zip(headers, lengths)):
        size = jpeg_size(header)
        if size is None:
            raise DataError(f"{name}: frame {t} is not a JPEG (no JPEG header)")
        if size != first:
            raise DataError(f"{name}: frame {t} is {size[0]}x{size[1]}, frame 0 {first[0]}x{first[1]}")
        if d[t, n - 2 : n].tobytes() != b"\xff\xd9":
            raise DataError(f"{name}: frame {t} does not end at its compress_len {n} (cut off, or a wrong length)")
    return (*first, 3)


def camera_reader(f, g, camera, ref):
    """Frame t of a camera as (H, W, 3) uint8 RGB. ALOHA's compressed files hold each frame as a zero-padded JPEG
    that cv2 encoded from the RGB array as if it were BGR, so PIL decodes it with red and blue reversed."""
    d = g[camera]
    if not (f.attrs.get("compress", False) and d.ndim == 2):
        return d.__getitem__
    lengths = _jpeg_lengths(f, d, f"{ref}: {camera}")

    def read(t):
        jpeg = io.BytesIO(d[t][: lengths[t]].tobytes())
        return np.asarray(Image.open(jpeg).convert("RGB"))[..., ::-1]

    read.lengths = lengths
    return read


def _filters(d):
    """The HDF5 filters a dataset needs that this h5py lacks (a plugin such as blosc or bitshuffle)."""
    plist = d.id.get_create_plist()
    found = [plist.get_filter(i) for i in range(plist.get_nfilters())]
    return [f"{name.decode() or 'unnamed'} (id {fid})" for fid, _, _, name in found if not h5py.h5z.filter_avail(fid)]


# -----------------------------------------------------------------------------
# instructions and states


def read_instructions(f, g, key="seen", instruction=None):
    """Instruction variants: the episode's `key` dataset (a vlen UTF-8 array, a fixed-length bytes array or one
    string); else, for seen, LIBERO's problem_info attribute, else [instruction] (train.py --instruction)."""
    if key in g:
        d = g[key]
        if d.dtype.kind not in "SOU" or d.ndim > 1:
            raise DataError(f"{key} holds {d.dtype} {d.shape}, not text (one string or a 1-D array of strings)")
        values = [d[()]] if d.ndim == 0 else d[()]
        try:
            items = [x.decode() if isinstance(x, bytes) else x for x in values]
        except UnicodeDecodeError as e:
            raise DataError(f"{key} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        return [s for s in items if isinstance(s, str) and s.strip()]
    if key != "seen":
        return []
    if g is not f and "problem_info" in f["data"].attrs:
        try:
            text = json.loads(f["data"].attrs["problem_info"])["language_instruction"]
            return [text] if text.strip() else []
        except (ValueError, KeyError, TypeError, AttributeError):
            raise DataError("data.attrs['problem_info'] is not JSON with a language_instruction string") from None
    if instruction:
        return [instruction]
    return []


def state_key_of(g, state_key=None, action_key="action"):
    """--state_key, else the first of STATE_KEYS the episode holds, else the action (RoboTwin's action[t] is the joint
    target recorded at frame t; its ACT/DP converters use it as the state); None: the episode lacks --state_key."""
    candidates = [state_key] if state_key else STATE_KEYS + [action_key]
    for key in candidates:
        if all(k in g for k in key.split(",")):
            return key
    return None


def read_state(g, key):
    """The state datasets of `key` (comma-separated: side by side) as one (T, D) array."""
    return np.concatenate([g[k][()].reshape(len(g[k]), -1) for k in key.split(",")], 1)


def _numbers(g, key, length):
    """A (T, D) dataset (comma-separated keys: side by side) read whole; refused unless finite numbers per frame."""
    sets = [g[k] for k in key.split(",")]
    if any(d.dtype.kind not in "iuf" for d in sets):
        raise DataError(f"{key} holds {', '.join(str(d.dtype) for d in sets)}, not numbers")
    if any(d.ndim != 2 or len(d) != length for d in sets):
        raise DataError(f"{key} has shape {' + '.join(str(d.shape) for d in sets)}, expected (T={length}, D)")
    values = read_state(g, key)
    if not np.isfinite(values).all():
        raise DataError(f"{key} holds NaN or inf")
    return values


def episode_attrs(f):
    """The episode file's scalar root attributes (a simulator's task, seed, scene settings, ...)."""
    out = {}
    for k, v in f.attrs.items():
        if isinstance(v, bytes):
            v = v.decode(errors="replace")
        if isinstance(v, np.generic):
            v = v.item()
        if isinstance(v, (str, bool, int, float)):
            out[k] = v
    return out


def shared_attrs(attrs):
    """Episodes' attributes in one dict: a value all of them agree on, else the sorted distinct values (seeds)."""
    out = {}
    for k in sorted(set().union(*attrs)):
        values = sorted({a[k] for a in attrs if k in a}, key=_natural)
        out[k] = values[0] if len(values) == 1 else values
    return out


# -----------------------------------------------------------------------------
# checking episodes before a run


def _check_keys(f, g, keys):
    """The datasets a run reads (action, cameras) must be there: otherwise say which layout the file is in."""
    missing = [k for k in keys if k not in g]
    layout = detect_layout(f, g)
    if missing and layout is None and isinstance(g.get("data"), h5py.Group):
        raise DataError("a robomimic/LIBERO file whose data/ group holds no demo_N groups")
    if missing and layout is None:
        sets = [k for k in g if isinstance(g.get(k), h5py.Dataset)]
        groups = [k for k in g if k not in sets]
        raise DataError(
            f"no known episode layout (RoboTwin's flat datasets, ALOHA's observations/images, "
            f"robomimic's data/demo_N): it holds datasets {', '.join(sets) or 'none'} and groups "
            f"{', '.join(groups) or 'none'}"
        )
    if missing:
        raise DataError(
            f"missing {', '.join(missing)} (a {layout[0]} episode: `python check_data.py DIR` prints the flags "
            "that read it)"
        )
    groups = [k for k in keys if not isinstance(g[k], h5py.Dataset)]
    if groups:
        inside = ", ".join(f"{groups[0]}/{k}" for k in list(g[groups[0]])[:3])
        raise DataError(f"{groups[0]} is a group, not a dataset: name the datasets inside it (e.g. {inside})")


def _check_frames_format(f, cameras, videos):
    """uint8 (T, H, W, 3) frames, or padded JPEGs (T, bytes) in a file that says it holds them (compress)."""
    for v in videos:
        plain = v.ndim == 4 and v.shape[3] == 3
        jpeg = v.ndim == 2 and bool(f.attrs.get("compress", False))
        if v.dtype != np.uint8 or not (plain or jpeg):
            found = ", ".join(f"{c} {v.dtype} {v.shape}" for c, v in zip(cameras, videos))
            raise DataError(
                f"camera frames must be uint8 (T, H, W, 3), or padded JPEGs (T, bytes) in a file with "
                f"compress set; found {found}"
            )


def _frame_shapes(f, g, cameras, ref):
    """The frame shapes of every camera (all must agree, in every episode). Plain frames: the last one must read
    (cut-off data, a missing compression filter); JPEG frames: every frame's header and end marker."""
    shapes = set()
    for c in cameras:
        read, v = camera_reader(f, g, c, ref), g[c]
        try:
            if v.ndim == 2:
                shapes.add(check_jpeg_frames(v, read.lengths, c))
                shapes.add(read(len(v) - 1).shape)
            else:
                shapes.add(read(-1).shape)
        except DataError:
            raise
        except (OSError, ValueError) as e:
            why = str(e).splitlines()[0]
            if _filters(v):
                why = f"stored with HDF5 filter {', '.join(_filters(v))}, not installed here"
            raise DataError(f"{c}: its frames do not read ({why})") from None
    return shapes


def _check_texts(f, g, instruction):
    if not read_instructions(f, g, "seen", instruction):
        if "seen" in g:
            raise DataError("seen instructions missing, empty or all blank")
        raise DataError(
            'no instructions (no seen dataset or LIBERO problem_info): pass --instruction "what the robot should do"'
        )
    if "unseen" in g and not read_instructions(f, g, "unseen"):
        raise DataError("unseen instructions missing, empty or all blank")


def _check_episode(ref, cameras, action_dim, action_key, state_key, instruction):
    """Length, frame shapes and a fingerprint of the actions of one episode; a DataError says what is wrong."""
    f, g = open_episode(ref)
    with f:
        _check_keys(f, g, [action_key, *cameras])
        action, videos = g[action_key], [g[c] for c in cameras]
        if action.ndim == 2 and action.dtype.kind in "iuf" and action.shape[1] != action_dim:
            raise DataError(f"{action_key} has shape {action.shape}, expected (T, {action_dim}) (--action_dim)")
        values = _numbers(g, action_key, len(action))
        _check_frames_format(f, cameras, videos)
        if {len(v) for v in videos} != {len(action)}:
            lengths = ", ".join(f"{c} {len(v)}" for c, v in zip(cameras, videos))
            raise DataError(f"cameras and action differ in length: {action_key} {len(action)}, {lengths}")
        key = state_key_of(g, state_key, action_key)
        if key is None:
            raise DataError(f"missing {state_key} (--state_key)")
        if key != action_key:
            _numbers(g, key, len(action))
        _check_texts(f, g, instruction)
        shapes = _frame_shapes(f, g, cameras, ref)
        return len(action), shapes, hashlib.sha1(np.ascontiguousarray(values)).hexdigest()


def check_episodes(
    paths, cameras, chunk, action_dim, action_offset=0, action_key="action", state_key=None, instruction=None
):
    """Validate every episode up front (so a broken one fails now, not hours into training); return the usable ones.
    Every problem is one line naming its file, all of them in one DataError."""
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
            twin = seen.get((os.path.realpath(path), demo)) or seen.get(digest)
            if twin:
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
        seen[(os.path.realpath(path), demo)] = p
        seen[digest] = p
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
    tokens; one line per file that does not. Returns the longest sequence and the LLM's limit."""
    # here only: the rest of data.py needs no model code, and importing it is slow
    import model

    try:
        config, tokenizer = model.load_tokenizer(vla_path)
    except (OSError, ValueError, RuntimeError) as e:
        raise DataError(f"--vla_path: {e}") from None
    problems, longest = [], 0
    for p, ts in zip(paths, texts):
        try:
            for s in set(ts):
                n = model.check_sequence_length(config, tokenizer, s, cameras, proprio, chunk)
                longest = max(longest, n)
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


# -----------------------------------------------------------------------------
# statistics and normalization


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
    entry = {"action": action_stats}
    if proprio_stats:
        entry["proprio"] = proprio_stats
    for name, value in (("num_transitions", num_transitions), ("num_trajectories", num_trajectories)):
        if value is not None:
            entry[name] = int(value)
    with open(path, "w") as f:
        json.dump({dataset_name: entry}, f, indent=2)


def load_stats(path, dataset_name=None, key="action", dim=None):
    """The action (or proprio) block of a dataset_statistics.json; dataset_name picks one when it holds several.
    Its min, max, q01 and q99 must be `dim` (default: as many as min) finite values each, min <= max, q01 <= q99."""
    with open(path) as f:
        try:
            stats = json.load(f)
        # a JSONDecodeError does not name the file
        except ValueError as e:
            raise DataError(f"{path}: not JSON ({e})") from None
    if dataset_name is None and len(stats) == 1:
        dataset_name = next(iter(stats))
    entry = stats.get(dataset_name)
    block = entry.get(key, {}) if isinstance(entry, dict) else {}
    missing = {"min", "max", "q01", "q99"} - set(block)
    if missing:
        raise DataError(
            f"{path}: expected OpenVLA norm_stats {{name: {{'{key}': {{'min', 'max', 'q01', 'q99'}}}}}} "
            f"with one dataset, or a dataset_name; found {list(stats)[:5]}, missing {sorted(missing)}"
        )
    n = dim or np.size(block["min"])
    values = {k: np.array(block[k], dtype=float) for k in ("min", "max", "q01", "q99")}
    bad = [k for k, x in values.items() if x.shape != (n,) or not np.isfinite(x).all()]
    if not bad:
        # min > max would make every action a constant, NaN every action NaN
        bad = [f"{lo} > {hi}" for lo, hi in (("min", "max"), ("q01", "q99")) if (values[lo] > values[hi]).any()]
    if bad:
        raise DataError(f"{path}: {key} {', '.join(bad)}: expected {n} finite values each, min <= max, q01 <= q99")
    return block


def _affine(stats, mode, inverse=False):
    """Per-dimension (scale, shift, clippable) of normalizing, y = scale * x + shift, or (inverse) of undoing it:
    [low, high] maps to [-1, 1], low and high being min and max (bounds) or q01 and q99. A dimension with one value
    in all the data maps to 0 (and back to that value); OpenVLA's mask False passes a dimension through untouched."""
    if mode not in ("bounds", "q99"):
        raise ValueError(f"unknown normalization {mode!r}: use bounds or q99")
    keys = ("min", "max") if mode == "bounds" else ("q01", "q99")
    lo, hi = (np.asarray(stats[k], np.float64) for k in keys)
    span = hi - lo
    flat = span < 1e-8
    raw = ~np.asarray(stats.get("mask", [True] * len(lo)), bool)
    if inverse:
        half = np.where(flat, 0.0, span / 2)
        scale, shift = half, lo + half
    else:
        safe = np.where(flat, 1.0, span)
        scale, shift = np.where(flat, 0.0, 2 / safe), np.where(flat, 0.0, -2 * lo / safe - 1)
    return np.where(raw, 1.0, scale), np.where(raw, 0.0, shift), ~raw & ~flat


def _apply(x, scale, shift, clip=None):
    """scale * x + shift per dimension, computed in float64, the result float32 (float64 if x is); clip: the
    dimensions clipped to [-1, 1]."""
    x = np.asarray(x)
    y = x * scale + shift
    if clip is not None:
        y = np.where(clip, y.clip(-1, 1), y)
    return y.astype(np.result_type(x.dtype, np.float32))


def normalize(actions, stats, mode="bounds"):
    """Actions (numpy, (..., D)) to [-1, 1]: bounds maps min/max (absolute joints are never clipped); q99 maps
    q01/q99 and clips."""
    scale, shift, clippable = _affine(stats, mode)
    return _apply(actions, scale, shift, clippable if mode == "q99" else None)


def unnormalize(actions, stats, mode="bounds"):
    """normalize's inverse (within the clipped range for q99)."""
    scale, shift, _ = _affine(stats, mode, inverse=True)
    return _apply(actions, scale, shift)


def normalize_state(state, stats):
    """OFT's proprioception: min/max bounds to [-1, 1], clipped (a live state may leave the training range)."""
    return normalize(state, stats, "bounds").clip(-1, 1)


# -----------------------------------------------------------------------------
# episodes as samples


def _frames(readers, t, swap_red_blue=False):
    """Frame t of every camera -> uint8 (N, 3, H, W)."""
    x = np.stack([read(t) for read in readers])
    if swap_red_blue:
        x = x[..., ::-1]
    return torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


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
        "frames": functools.partial(_frames, readers, swap_red_blue=swap_red_blue),
        "close": f.close,
    }


class EpisodeDataset(torch.utils.data.Dataset):
    """One sample per frame t: its camera frames, an instruction, actions[t+o : t+o+chunk], the normalized state
    with proprio, uniform draws (cameras, 6) with image_aug; draws seeded per sample, for any resume or worker count.
    Actions, states and instructions are read once and kept (they are small); frames stay on disk."""

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
        actions, states, keys = self._read(action_key, state_key, proprio, instructions, instruction)
        self._check_read(instructions, keys, states)
        self.state_key = keys[0] if proprio else None
        self.stats = stats if stats is not None else compute_stats(actions)
        if len(self.stats["min"]) != action_dim:
            raise DataError(f"the statistics have {len(self.stats['min'])} action dimensions, not {action_dim}")
        self.actions = [normalize(a, self.stats, norm).astype(np.float32) for a in actions]
        self.proprio_stats, self.states, self.proprio_dim = None, None, 0
        if proprio:
            self.proprio_stats = proprio_stats or compute_stats(states)
            self.states = [normalize_state(s, self.proprio_stats).astype(np.float32) for s in states]
            self.proprio_dim = states[0].shape[1]
        self.lengths = [len(a) for a in actions]
        self.index = [(e, t) for e, n in enumerate(self.lengths) for t in range(n - chunk - action_offset + 1)]
        self._files, self._pid = OrderedDict(), None

    def _read(self, action_key, state_key, proprio, instructions, instruction):
        """Every episode's actions, states (with proprio) and the key they came from; sets the instructions, the
        frame sizes (the same in every file: checked) and the attributes all files share, or the distinct values
        of those that differ (seeds, say)."""
        actions, states, keys, self.instructions, attrs = [], [], [], [], []
        for p in self.paths:
            f, g = open_episode(p)
            with f:
                actions.append(g[action_key][()])
                keys.append(state_key_of(g, state_key, action_key))
                if proprio:
                    states.append(read_state(g, keys[-1]))
                self.instructions.append(read_instructions(f, g, instructions, instruction))
                attrs.append(episode_attrs(f))
                if p == self.paths[0]:
                    self.frame_sizes = {c: list(camera_reader(f, g, c, p)(0).shape[:2]) for c in self.cameras}
        self.attrs = shared_attrs(attrs)
        return actions, states, keys

    def _check_read(self, instructions, keys, states):
        problems = [f"{p}: no '{instructions}' instructions" for p, t in zip(self.paths, self.instructions) if not t]
        # a state in milli-units beside one in radians, say
        kinds = [(k, s.shape[1]) for k, s in zip(keys, states)]
        if len(set(kinds)) > 1:
            others = [f"{p} from {k} ({w} wide)" for p, (k, w) in zip(self.paths, kinds) if (k, w) != kinds[0]]
            problems.append(
                f"--proprio: {self.paths[0]} reads its state from {keys[0]} ({kinds[0][1]} wide), but "
                f"{', '.join(others)[:400]}: pass --state_key"
            )
        if problems:
            raise DataError("\n".join(problems))

    def __getstate__(self):
        """Spawned workers get no h5py handles (they cannot be pickled): they open their own."""
        return {**self.__dict__, "_files": OrderedDict(), "_pid": None}

    def set_epoch(self, epoch):
        """New instruction draws each epoch (effective in workers that are re-created per epoch, the default)."""
        self.epoch = epoch

    def __len__(self):
        return len(self.index)

    def _readers(self, e):
        """The episode's camera readers; each process keeps the MAX_OPEN files it used last open."""
        # h5py handles must not cross a fork: each worker opens its own
        if self._pid != os.getpid():
            self._files, self._pid = OrderedDict(), os.getpid()
        if e not in self._files:
            if len(self._files) >= MAX_OPEN:
                self._files.popitem(last=False)[1][0].close()
            f, g = open_episode(self.paths[e])
            self._files[e] = (f, [camera_reader(f, g, c, self.paths[e]) for c in self.cameras])
        self._files.move_to_end(e)
        return self._files[e][1]

    def __getitem__(self, i):
        # negative indices too: i seeds the instruction draw
        i = range(len(self.index))[i]
        e, t = self.index[i]
        try:
            images = _frames(self._readers(e), t, self.swap_red_blue)
        # deleted, truncated or rewritten while training
        except (OSError, ValueError, KeyError) as err:
            self._files.pop(e, None)
            raise DataError(f"{self.paths[e]}: frame {t} no longer reads ({str(err).splitlines()[0]})") from None
        texts, rng = self.instructions[e], np.random.default_rng([self.seed, self.epoch, i])
        if self.instruction_variant is None:
            k = rng.integers(len(texts))
        else:
            k = self.instruction_variant % len(texts)
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
