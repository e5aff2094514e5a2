"""
The data check: what a directory of episodes holds, every problem one line naming its file, and the train.py flags
that read it. Run it before a long training run.

$ python check_data.py /path/to/place_shoe --cameras head_camera_image,left_wrist_image --chunk 8 --action_dim 14
$ python check_data.py /path/to/place_shoe --vla_path openvla/openvla-7b --preview frame.png   # prompt lengths, colours
$ python check_data.py /path/to/act_sim_transfer_cube --instruction "transfer the cube to the left arm"

It names the layout (RoboTwin's OFT conversion, ACT's sim and real ALOHA episodes with JPEG frames, robomimic/LIBERO
files of many demos), counts episodes, frames and samples, prints the action statistics and instruction variants,
and ends with a `flags:` line to paste into train.py. Synthetic episodes to try it on: python demo.py demo_data
"""

import argparse
import shlex
import sys

import numpy as np
from PIL import Image

from data import (
    ACTION_OFFSET_HELP,
    DEFAULT_CAMERAS,
    STATE_KEY_HELP,
    DataError,
    action_names,
    check_episodes,
    check_prompts,
    compute_stats,
    detect_layout,
    list_episodes,
    open_episode,
    read_episode,
    read_instructions,
    split_ref,
    state_key_of,
)


def first_layout(refs, action_key):
    """(layout, action width, whether the files hold instructions) of the first episode in a known layout (a broken
    one or an empty robomimic file may come first: check_episodes names those)."""
    for ref in refs:
        try:
            f, g = open_episode(ref)
            with f:
                layout = detect_layout(f, g)
                if layout is None:
                    continue
                key = action_key or layout[2]
                width = g[key].shape[-1] if key in g and g[key].ndim == 2 else None
                texts = "seen" in g or (g is not f and "problem_info" in f["data"].attrs)
                return layout, width, texts
        except (OSError, DataError):
            continue
    return None, None, True


def summary_flags(cameras, action_key, action_dim, state_key, text):
    """The train.py flags that read these files (the defaults left out)."""
    flags = [("--cameras", ",".join(cameras))]
    if action_key != "action":
        flags.append(("--action_key", action_key))
    if action_dim != 14:
        flags.append(("--action_dim", str(action_dim)))
    if state_key:
        flags.append(("--state_key", state_key))
    if text:
        flags.append(("--instruction", text))
    line = "flags: " + " ".join(f"{k} {shlex.quote(v)}" for k, v in flags)
    if text == "TEXT":
        line += "   # the files hold no instructions: put what the robot should do in place of TEXT"
    return line


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
    refs = list_episodes(data_dir)
    layout, width, texts_inside = first_layout(refs, action_key)
    if not cameras:
        cameras = layout[1] if layout and layout[1] else DEFAULT_CAMERAS
    action_key = action_key or (layout[2] if layout else "action")
    action_dim = action_dim or width or 14
    # TEXT stands for the instruction the files lack
    text = instruction or (None if texts_inside else "TEXT")
    paths = check_episodes(refs, cameras, chunk, action_dim, action_offset, action_key, state_key, text)
    actions, texts, keys = [], {"seen": [], "unseen": []}, []
    for p in paths:
        f, g = open_episode(p)
        with f:
            actions.append(g[action_key][()])
            keys.append(state_key_of(g, state_key, action_key))
            for key in texts:
                texts[key].append(read_instructions(f, g, key, text))
    fits = None
    if vla_path:
        every = [s + u for s, u in zip(texts["seen"], texts["unseen"])]
        fits = check_prompts(paths, every, vla_path, len(cameras), proprio, chunk)
    lengths = [len(a) for a in actions]
    samples = sum(n - chunk - action_offset + 1 for n in lengths)
    files = len({split_ref(p)[0] for p in paths})
    demos = f", {len(paths)} demos in {files} files" if files < len(paths) else ""
    print(f"layout: {layout[0] if layout else 'unknown'}{demos}")
    print(
        f"{len(paths)} episodes, {sum(lengths)} frames (length {min(lengths)}-{max(lengths)}, "
        f"mean {np.mean(lengths):.0f}), {samples} samples (chunk {chunk}, action offset {action_offset})"
    )
    episode = read_episode(paths[0], cameras, swap_red_blue, action_key)
    print_summary(episode, cameras, swap_red_blue, keys, action_key, compute_stats(actions), texts, fits)
    if layout and layout[0].startswith("RoboTwin") and action_dim == 14:
        print(f"arms: to check that instructions name the arm that moves: python robotwin/check.py {data_dir}")
    # the first frame of every camera as training will read it: check the colours by eye
    if preview:
        Image.fromarray(np.concatenate(episode["frames"](0).permute(0, 2, 3, 1).numpy(), 1)).save(preview)
        print(f"wrote {preview}: frame 0 of {paths[0]}, cameras left to right")
    episode["close"]()
    print(summary_flags(cameras, action_key, action_dim, state_key, text))


def print_summary(episode, cameras, swap_red_blue, keys, action_key, stats, texts, fits):
    shape = episode["frames"](0).shape[2:]
    swapped = " (red and blue swapped on read)" if swap_red_blue else ""
    print(f"cameras: {', '.join(cameras)} at {shape[0]}x{shape[1]}{swapped}")
    print("state for --proprio: " + ", ".join(f"{k} in {keys.count(k)} episodes" for k in dict.fromkeys(keys)))
    print(f"{action_key:<16}{'min':>9}{'max':>9}{'mean':>9}{'std':>9}")
    for i, name in enumerate(action_names(len(stats["min"]))):
        print(f"{name:<16}" + "".join(f"{stats[k][i]:9.3f}" for k in ("min", "max", "mean", "std")))
    for key, per_episode in texts.items():
        counts, examples = [len(t) for t in per_episode], [s for t in per_episode for s in t][:2]
        if max(counts):
            print(f"{key}: {min(counts)}-{max(counts)} variants per episode, e.g. " + " | ".join(examples))
        else:
            print(f"{key}: none")
    if fits:
        print(f"prompts: the longest instruction fills {fits[0]} of the LLM's {fits[1]} positions")


def main():
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
        help="read frames with red and blue reversed, as train.py --swap_red_blue does (files known to hold them "
        "swapped)",
    )
    parser.add_argument("--preview", metavar="PNG", help="also write frame 0 of every camera, as training sees it")
    parser.add_argument(
        "--vla_path",
        help="also check that every instruction fits this model's LLM with the image and query tokens (reads its "
        "config.json and tokenizer only)",
    )
    parser.add_argument("--proprio", action="store_true", help="count the state token too, as train.py --proprio")
    args = parser.parse_args()
    if not args.data_dir:
        parser.error("give a directory to check (demo episodes: python demo.py DIR)")
    cameras = args.cameras.split(",") if args.cameras else None
    try:
        summarize(
            args.data_dir,
            cameras,
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


if __name__ == "__main__":
    main()
