"""
Helpers the core's test files share: tiny episodes written in the real layout, the tiny model with trained-looking
LoRA, train.py's command line for the tiny twin, and comparisons of trained weights. A module, not conftest.py: test
files import it by name (pytest puts tests/ on sys.path), where `from conftest import ...` would find whichever of the
repository's two conftest.py files was imported last.
"""

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

import data
from model import VLA, add_lora

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: train.py, infer.py... are here
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def write_episode(path, T=20, cameras=data.ALL_CAMERAS, res=8, width=14, frames=None, seen=("pick it", "place it")):
    """A tiny episode in the real layout (8x8 frames keep the tests fast); seen=None leaves the instructions out."""
    rng = np.random.default_rng([T, *os.path.basename(str(path)).encode()])  # two episodes are never the same
    with h5py.File(path, "w") as f:
        for c in cameras:
            f[c] = rng.integers(0, 256, (frames or T, res, res, 3), dtype=np.uint8)
        if width:
            f["action"] = rng.normal(size=(T, width))
        if seen is not None:
            f.create_dataset("seen", data=list(seen), dtype=h5py.string_dtype())
    return str(path)


def actions_of(path):
    with h5py.File(path, "r") as f:
        return f["action"][()]


INSTR = ["pick up the shoe", "Grab the left shoe and put it onto the pad next to the blue mat", "place it"]


def images(b=len(INSTR), n=2, size=224, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, n, 3, size, size), dtype=torch.uint8, generator=g)


def lora_vla(tiny_dir, **kw):
    """The tiny model with LoRA whose B matrices are non-zero, as after some training."""
    torch.manual_seed(0)
    vla = add_lora(VLA.from_pretrained(tiny_dir, **kw), rank=32)
    with torch.no_grad():
        for n, p in vla.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return vla.eval()


def tower_input(vla, frames, aug=None, run=None):
    """The pixels the DINOv2 tower receives from vla.embed_images(frames, aug) (or from run()), in 0-255 levels."""
    seen = []
    hook = vla.vision_backbone.featurizer.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    run() if run else vla.embed_images(frames, aug)
    hook.remove()
    mean, std = (torch.tensor(vla.preprocessor["tvf_normalize_params"][0][k]).view(3, 1, 1) for k in ("mean", "std"))
    return (seen[0].float() * std + mean) * 255


def pil_resized(frame, box=None):
    """PIL itself: a (3, H, W) uint8 frame through Image.resize((224, 224), BICUBIC, box), as (3, 224, 224) floats."""
    img = Image.fromarray(np.asarray(frame.permute(1, 2, 0))).resize((224, 224), Image.BICUBIC, box=box)
    return torch.tensor(np.asarray(img)).permute(2, 0, 1).float()


def train_flags(tiny_dir, demo_dir, out, *extra):
    return [
        "--vla_path",
        tiny_dir,
        "--data_dir",
        demo_dir,
        "--out_dir",
        str(out),
        "--val_episodes",
        "1",
        "--batch_size",
        "2",
        "--num_workers",
        "0",
        "--lora_rank",
        "4",
        "--log_interval",
        "1",
        "--eval_batches",
        "2",
        *map(str, extra),
    ]


def train_cmd(flags, nproc=1):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    return (launcher if nproc > 1 else [sys.executable]) + ["train.py", *map(str, flags)]


def run_train(flags, nproc=1):
    return subprocess.run(train_cmd(flags, nproc), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)


def trained_weights(ckpt):
    return load_file(os.path.join(ckpt, "adapter_model.safetensors")) | load_file(
        os.path.join(ckpt, "action_head.safetensors")
    )


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


P_FLAGS = [
    "--proprio",
    "--action_offset",
    1,
    "--attention",
    "full",
    "--film",
    "--save_interval",
    2,
    "--eval_interval",
    2,
    "--grad_ckpt",
    "auto",
]


def frame_dict(episode, t, cameras):
    return {c: f.permute(1, 2, 0).numpy() for c, f in zip(cameras, episode["frames"](t))}


def edit_json(path, edit):
    obj = json.load(open(path))
    edit(obj)
    json.dump(obj, open(path, "w"))
