"""
Check RoboTwin episodes for instructions that belong to other episodes: RoboTwin's OpenVLA-OFT conversion looked
each file's instructions up by shuffled position, so most of its files name an arm that does not move (it also
swapped red and blue). Reconverted episodes (robotwin/convert.py) pass.

$ python robotwin/check.py data/place_shoe
arms: all 48 episodes whose instructions name an arm move that arm most

An instruction names an arm when it says "left" or "right" (the majority of an episode's variants decides); an
arm moves when its six joints travel at least twice as far as the other's. Episodes where neither holds (a handover
moves both arms) are not counted. Exit status 1 when most checked episodes disagree.
"""

import argparse
import os
import re
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402

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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_dir", help="directory of RoboTwin episodes (episode_*.hdf5 with action (T, 14) and seen)")
    p.add_argument("--action_key", default="action", help="the (T, 14) joint dataset")
    args = p.parse_args(argv)
    actions, instructions = [], []
    try:
        paths = data.list_episodes(args.data_dir)
        for path in paths:
            f, g = data.open_episode(path)
            with f:
                if args.action_key not in g or g[args.action_key].ndim != 2 or g[args.action_key].shape[1] != 14:
                    raise data.DataError(f"{path}: no {args.action_key} of shape (T, 14): not a RoboTwin episode")
                actions.append(g[args.action_key][()])
                instructions.append(data.read_instructions(f, g, "seen"))
    except (data.DataError, OSError) as e:
        sys.exit(f"error: {e}")
    named = [1 for a, s in zip(actions, instructions) if named_arm(s) and moving_arm(a)]
    wrong = check_arms(paths, actions, instructions)
    if 2 * len(wrong) > len(named):
        sys.exit(1)


if __name__ == "__main__":
    main()
