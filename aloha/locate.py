"""
Where the objects start, read from a camera frame: the first stage of the two-stage (located) ALOHA policy.

$ python aloha/locate.py out/aloha/locator.pt --task transfer_cube          # 4,000 scenes, 6,000 steps: ~14 min
$ python aloha/locate.py out/aloha/locator_ins.pt --task insertion         # 32 keypoints: ~40 min beside other work
$ python aloha/locate.py out/aloha/locator.pt --scenes 200 --steps 300      # a quick look (several cm off)

A policy trained with `--proprio --state_key observations/object_xy` is told where the task's objects start
(record.py stores their x, y in every frame; transfer cube: the cube, insertion: the peg and the socket). The
simulator knows that, a robot's cameras do not: this trains a small CNN that reads it from the first frame of an
episode, and evaluate.py feeds a located checkpoint what the CNN reads (--locator, or locator.pt beside the
checkpoint). The labels are free: each scene is a fresh reset of the simulator (seeds --first_scene upward, never
the seeds of record.py's demos or evaluate.py's episodes), its first frame rendered as evaluate.py renders it and
labelled with record.object_xy. After training, the error per object on --val_scenes further fresh scenes is
printed and kept in the file, with a blind reader's (each object's mean position) beside it: an object read no better
than blind has not been found.

The network (32k parameters): four convolutions to K heat maps at a quarter of the frame's half-resolution, a
spatial soft-argmax (each map's expected image x, y: a keypoint), a linear map from the 2K keypoint coordinates to
the objects' x, y normalized to [-1, 1] over the range gym-aloha draws them from. Measured (docs/simulation.md):
4,000 scenes and 6,000 steps read the cube to 1.4 cm on average; 3,000 steps to 3.3 cm; the demos' own frames
(200 scenes) to 6.5 cm. The located policy scored 96/100 fed the first, 41/100 fed the second. Insertion's peg, a
thin red bar, needs more keypoints than the cube (KEYPOINTS below).

OUT (a torch.save dict): state_dict, the task, the camera and frame size it reads, the scene settings (zoom,
render), the training settings, and the validation error per object in cm beside a blind reader's.
"""

import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import envs  # noqa: E402  (the same folder: sys.path[0] when run as a script)
import record  # noqa: E402

# the range gym-aloha's reset draws each object's x, y from (gym_aloha/utils.py: sample_box_pose,
# sample_insertion_pose), in record.object_xy's order: the network predicts positions normalized over it
RANGES = {
    "transfer_cube": ([0.0, 0.4], [0.2, 0.6]),
    "insertion": ([0.1, 0.4, -0.2, 0.4], [0.2, 0.6, -0.1, 0.6]),
}
# the objects record.object_xy gives, in its order: the error is measured and reported per object (pooled, a locator
# that reads the socket to 0.3 cm and misses the peg by 6 cm showed a 0.8 cm median)
OBJECTS = {"transfer_cube": ("cube",), "insertion": ("peg", "socket")}
# heat maps (keypoints) per task, measured (docs/simulation.md): 8 read the cube to 0.56 cm; on insertion 8 read the
# socket and never the thin peg (5.8 cm, the blind reader's error), 16 read the peg to 1.05 cm and 32 to 0.33 cm
KEYPOINTS = {"transfer_cube": 8, "insertion": 32}
# record.py's demos start at seed 0 and evaluate.py's episodes at 1000: a locator's scenes start far above both
FIRST_SCENE = 30000
LOWEST_SCENE = 10000
# Adam's lr, dropped 10x for the last part of training (the fraction of the steps before the drop)
LR, LR_DROP_AT = 1e-3, 0.73


class Locator(nn.Module):
    """frames (B, H, W, 3) uint8 -> (B, 2 per object) x, y in metres on the table."""

    def __init__(self, task, keypoints=None):
        super().__init__()
        if keypoints is None:
            keypoints = KEYPOINTS[task]
        lo, hi = RANGES[task]
        self.register_buffer("lo", torch.tensor(lo))
        self.register_buffer("hi", torch.tensor(hi))
        self.convs = nn.Sequential(
            nn.Conv2d(3, 16, 5, stride=2, padding=2),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, keypoints, 1),
        )
        self.out = nn.Linear(2 * keypoints, len(lo))

    def normalized(self, frames):
        # frames (B, H, W, 3) uint8, at half resolution: enough to place a 2 cm cube, 4x fewer pixels to convolve
        x = frames[:, ::2, ::2].permute(0, 3, 1, 2).float() / 255 - 0.5  # (B, 3, H/2, W/2)
        maps = self.convs(x)  # (B, K, H/8, W/8)
        b, k, h, w = maps.shape
        # spatial soft-argmax: each map a distribution over positions, its mean a keypoint in [-1, 1]^2
        p = torch.softmax(maps.flatten(2), dim=-1).view(b, k, h, w)
        kx = (p.sum(2) * torch.linspace(-1, 1, w)).sum(-1)  # (B, K)
        ky = (p.sum(3) * torch.linspace(-1, 1, h)).sum(-1)  # (B, K)
        return self.out(torch.cat([kx, ky], dim=1))  # (B, 2 per object), normalized

    def normalize(self, xy):
        return (xy - self.lo) / (self.hi - self.lo) * 2 - 1

    def forward(self, frames):
        return (self.normalized(frames) + 1) / 2 * (self.hi - self.lo) + self.lo


def render_scenes(task, seeds, camera, size, fast_render, zoom, envs_n=8):
    """The first frame of a fresh scene per seed, as evaluate.py renders it, and where its objects are.
    -> frames (N, H, W, 3) uint8, xy (N, 2 per object) float32."""
    frames, xy = [], []
    envs_n = min(envs_n, len(seeds))
    with envs.SimPool(envs_n, task, {"cam": (camera, size)}, fast_render, zoom) as pool:
        for start in range(0, len(seeds), envs_n):
            batch = seeds[start : start + envs_n]
            obs = pool.reset(dict(enumerate(batch)), {i: True for i in range(len(batch))})
            frames += [obs[i]["images"]["cam"] for i in range(len(batch))]
            xy += [record.object_xy(task, record.object_pose(task, s)) for s in batch]
    return np.stack(frames), np.stack(xy).astype(np.float32)


def fit(net, frames, xy, steps, batch_size, seed, log_every=500):
    """L1 on the normalized positions, Adam, lr dropped 10x at LR_DROP_AT of the steps. -> the last loss."""
    g = torch.Generator().manual_seed(seed)
    frames, target = torch.from_numpy(frames), net.normalize(torch.from_numpy(xy))
    opt = torch.optim.Adam(net.parameters(), LR)
    t0, loss = time.time(), None
    for step in range(steps):
        if step == int(steps * LR_DROP_AT):
            opt.param_groups[0]["lr"] = LR / 10
        i = torch.randint(len(frames), (batch_size,), generator=g)
        loss = (net.normalized(frames[i]) - target[i]).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            print(f"step {step + 1}/{steps} | loss {loss.item():.4f} | {time.time() - t0:.0f} s", flush=True)
    return loss.item()


@torch.no_grad()
def errors_cm(net, frames, xy):
    """Per scene and object, the distance in cm between where the net reads it and where it is."""
    read = torch.cat([net(torch.from_numpy(frames[i : i + 64])) for i in range(0, len(frames), 64)]).numpy()
    per_object = np.hypot(read[:, 0::2] - xy[:, 0::2], read[:, 1::2] - xy[:, 1::2])
    return 100 * per_object


def error_summary(errors, task):
    """errors (N scenes, objects) in cm -> per object of the task, its mean, median, 90th percentile and max."""
    summary = {}
    for i, name in enumerate(OBJECTS[task]):
        e = errors[:, i]
        summary[name] = {
            "mean": round(float(e.mean()), 2),
            "median": round(float(np.median(e)), 2),
            "p90": round(float(np.percentile(e, 90)), 2),
            "max": round(float(e.max()), 2),
        }
    return summary


def save(path, net, task, settings):
    """The locator and its settings (camera, size, zoom, fast_render at least: what evaluate.py checks), whole or
    not at all."""
    saved = {"state_dict": net.state_dict(), "task": task, "keypoints": net.out.in_features // 2} | settings
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(saved, path + ".tmp")
    os.replace(path + ".tmp", path)


def load(path):
    """-> (the Locator, in eval mode, and its file's settings); ValueError in one line for a file that is not one."""
    try:
        saved = torch.load(path, weights_only=True)
        net = Locator(saved["task"], saved["keypoints"])
        net.load_state_dict(saved["state_dict"])
    except (OSError, KeyError, RuntimeError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a locator written by aloha/locate.py ({str(e).splitlines()[0]})") from e
    return net.eval(), saved


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="the locator file to write (.pt)")
    p.add_argument("--task", default="transfer_cube", help=" or ".join(record.TASKS))
    p.add_argument("--scenes", type=int, default=4000, help="fresh scenes to train on (a first frame each)")
    p.add_argument("--first_scene", type=int, default=FIRST_SCENE, help="their first seed (at least 10000)")
    p.add_argument("--val_scenes", type=int, default=200, help="further scenes, after those, to measure the error")
    p.add_argument("--steps", type=int, default=6000, help="Adam steps")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--keypoints", type=int, help="heat maps, each an image x, y (default: the task's KEYPOINTS)")
    p.add_argument("--seed", type=int, default=0, help="the network's initialization and batches")
    p.add_argument("--camera", default="top", help="the simulator camera it reads (the policy must see it too)")
    p.add_argument("--size", default="240x320", help="frame HxW: the checkpoint's for that camera")
    p.add_argument("--zoom", type=float, default=1.0, help="camera zoom: the checkpoint's demos' (record.py --zoom)")
    p.add_argument("--stock_render", action="store_true", help="the stock scene (default: record.py's fast one)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    return p.parse_args(argv)


def check_args(args):
    """One line for each kind of bad input, before any scene is rendered. -> the frame size (H, W)."""
    if args.task not in record.TASKS:
        sys.exit(f"error: --task {args.task!r}: unknown task; use {', '.join(record.TASKS)}")
    if os.path.exists(args.out) and not args.overwrite:
        sys.exit(f"error: {args.out} exists: pass --overwrite to replace it, or another path")
    for flag in ("scenes", "val_scenes", "steps", "batch_size", "keypoints"):
        value = getattr(args, flag)
        # --keypoints None: the task's default (KEYPOINTS)
        if value is not None and value < 1:
            sys.exit(f"error: --{flag} {value}: must be at least 1")
    if args.first_scene < LOWEST_SCENE:
        sys.exit(
            f"error: --first_scene {args.first_scene}: below {LOWEST_SCENE}, where record.py's demos and "
            "evaluate.py's episodes draw their seeds (the locator would have seen the evaluation's scenes)"
        )
    physics, _ = record.make_sim(args.task)
    have = record.camera_names(physics)
    if args.camera not in have:
        sys.exit(f"error: --camera {args.camera!r}: the scene has no such camera (it has {', '.join(have)})")
    record.check_zoom(args.zoom)
    return record.parse_size(args.size)


def main(argv=None):
    args = get_args(argv)
    size = check_args(args)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    scene = (args.camera, size, not args.stock_render, args.zoom)
    train_seeds = list(range(args.first_scene, args.first_scene + args.scenes))
    val_seeds = list(range(train_seeds[-1] + 1, train_seeds[-1] + 1 + args.val_scenes))
    t0 = time.time()
    frames, xy = render_scenes(args.task, train_seeds + val_seeds, *scene)
    print(f"rendered {len(frames)} scenes ({args.camera}, {size[0]}x{size[1]}) in {time.time() - t0:.0f} s")
    n = len(train_seeds)
    torch.manual_seed(args.seed)
    net = Locator(args.task, args.keypoints)
    fit(net, frames[:n], xy[:n], args.steps, args.batch_size, args.seed)
    error = error_summary(errors_cm(net.eval(), frames[n:], xy[n:]), args.task)
    # the blind reader: the training scenes' mean position, whatever the frame
    mean_xy = torch.from_numpy(xy[:n].mean(0))
    blind = error_summary(errors_cm(lambda f: mean_xy.expand(len(f), -1), frames[n:], xy[n:]), args.task)
    print(f"validation error, cm ({args.val_scenes} scenes, seeds {val_seeds[0]}-{val_seeds[-1]}): {error}")
    print(f"a blind reader (the mean position): {blind}")
    scene = {"camera": args.camera, "size": list(size), "zoom": args.zoom, "fast_render": not args.stock_render}
    trained = {"scenes": args.scenes, "first_scene": args.first_scene, "steps": args.steps, "seed": args.seed}
    measured = {"val_seeds": [val_seeds[0], val_seeds[-1]], "val_error_cm": error, "blind_error_cm": blind}
    save(args.out, net, args.task, scene | trained | measured)
    print(f"wrote {args.out} ({time.time() - t0:.0f} s in all)")


if __name__ == "__main__":
    main()
