"""
Ship a trained policy inside the repository, as LeRobot publishes its trained policies: the files a policy needs
(LoRA, head, statistics, args.json: about 2 MB), not the optimizer state, into aloha/policies/NAME/, with args.json
pointing at the tiny base by a path relative to the policy itself, so that in a fresh clone, after

    python demo.py --tiny out/tiny-openvla        # writes the same tiny twin on every machine (seeded)

    python aloha/evaluate.py --checkpoint aloha/policies/transfer_cube --episodes 100 --seed 1000 --ensemble
    Policy.from_checkpoint("aloha/policies/transfer_cube")        # from any working directory

The base's config fingerprint, which the head records, must match the base found there (check_base refuses another).

$ python aloha/ship.py out/aloha/s10k_r/step_010000 transfer_cube --base out/tiny-openvla [--demos out/aloha/tc200]

--locator FILE ships a located policy's aloha/locate.py file beside it (locator.pt, which evaluate.py reads by
default). --demos records the demos' episode attributes (task, scene settings, seeds) when the checkpoint predates their
record in args.json. Nothing already shipped under NAME is replaced without --overwrite.
"""

import argparse
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import locate  # noqa: E402  (the same folder: sys.path[0] when run as a script)
import model  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POLICIES = os.path.join(ROOT, "aloha", "policies")


def demo_attrs(demos):
    """The shared episode attributes of a directory of demos, as train.py records them (data.shared_attrs)."""
    attrs = []
    for ref in data.list_episodes(demos):
        f, _ = data.open_episode(ref)
        with f:
            attrs.append(data.episode_attrs(f))
    return data.shared_attrs(attrs)


def in_repository(path):
    """A path inside the repository as relative to its root; any other as it is."""
    if path and os.path.isabs(path) and os.path.commonpath([path, ROOT]) == ROOT:
        return os.path.relpath(path, ROOT)
    return path


def ship(ckpt, name, base, demos=None, overwrite=False, policies=POLICIES, locator=None):
    """Copy ckpt's policy files (and a located policy's locator, as locator.pt) to policies/name; -> that
    directory."""
    run = model.check_checkpoint(ckpt)
    model.check_base(ckpt, base)
    if locator:
        locate.load(locator)
    out = os.path.join(policies, name)
    if os.path.exists(out) and os.listdir(out) and not overwrite:
        raise ValueError(f"{out} already holds a policy: pass --overwrite to replace it")
    os.makedirs(out, exist_ok=True)
    for f in model.ADAPTER_FILES + model.POLICY_FILES:
        shutil.copy(os.path.join(ckpt, f), out)
    if locator:
        shutil.copy(locator, os.path.join(out, "locator.pt"))
    # the base by a path relative to the policy; the run's own paths relative to the repository, not this machine
    run["vla_path"] = os.path.relpath(os.path.abspath(base), out)
    for key in ("data_dir", "out_dir", "val_data_dir"):
        run[key] = in_repository(run.get(key))
    run["val_episode_files"] = [in_repository(p) for p in run.get("val_episode_files", [])]
    run["shipped_from"] = in_repository(os.path.abspath(ckpt))
    if demos:
        run["episode_attrs"] = demo_attrs(demos)
    with open(os.path.join(out, "args.json"), "w") as f:
        json.dump(run, f, indent=1)
    # the shipped copy must load as it is
    model.check_checkpoint(out)
    model.check_base(out, model.trained_base(out, run))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a step_NNNNNN directory of a training run")
    p.add_argument("name", help="the policy's name: aloha/policies/NAME")
    p.add_argument("--base", default=os.path.join(ROOT, "out", "tiny-openvla"), help="the base it trained on")
    p.add_argument("--demos", help="record these demos' episode attributes in args.json")
    p.add_argument("--overwrite", action="store_true", help="replace a policy already shipped under NAME")
    p.add_argument("--locator", help="a located policy's aloha/locate.py file, shipped beside it as locator.pt")
    args = p.parse_args(argv)
    try:
        out = ship(args.checkpoint, args.name, args.base, args.demos, args.overwrite, locator=args.locator)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    print(f"shipped {args.checkpoint} to {out} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
