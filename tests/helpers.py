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
from demo import write_aloha
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


def write_broken(directory):
    """One directory with every kind of broken file, named by the problem it has (BROKEN), and a good one."""
    good = write_episode(directory / "episode_0.hdf5")
    (directory / "episode_1.hdf5").write_text("this is not HDF5")
    with open(good, "rb") as f:
        (directory / "episode_2.hdf5").write_bytes(f.read()[:3000])  # truncated
    write_episode(directory / "episode_3.hdf5", cameras=["head_camera_image"])  # no left_wrist_image
    write_episode(directory / "episode_4.hdf5", width=0)  # no action
    write_episode(directory / "episode_5.hdf5", frames=19)  # 19 frames, 20 actions
    write_episode(directory / "episode_6.hdf5", width=13)
    write_episode(directory / "episode_7.hdf5", T=5)  # too short: a warning, skipped
    return directory


# write_broken's episode_i: what the check says about it
BROKEN = {
    1: "not a readable HDF5",
    2: "truncated file",
    3: "missing left_wrist_image",
    4: "missing action",
    5: "differ in length: action 20, head_camera_image 19",
    6: "expected (T, 14)",
}


def write_blank_instructions(directory):
    """A good episode, then seen missing, empty, all blank, and unseen present but blank."""
    paths = [
        write_episode(directory / f"episode_{i}.hdf5", seen=seen)
        for i, seen in enumerate([("pick it",), None, (), (" ", ""), ("pick it",)])
    ]
    with h5py.File(paths[4], "a") as f:
        f.create_dataset("unseen", data=["  "], dtype=h5py.string_dtype())
    return paths


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
    "on",
]


def frame_dict(episode, t, cameras):
    return {c: f.permute(1, 2, 0).numpy() for c, f in zip(cameras, episode["frames"](t))}


def edit_json(path, edit):
    obj = json.load(open(path))
    edit(obj)
    json.dump(obj, open(path, "w"))


# -----------------------------------------------------------------------------
# the other layouts, written the way their recorders write them

RED = (220, 20, 20)
LIBERO_TASK = "put the black bowl on the plate"


def scene(rng, T, h, w):
    """Smooth random scenes (JPEG keeps them close) with a red square in the top-left corner of every frame."""
    small = rng.integers(40, 200, (T, h // 8, w // 8, 3)).astype(np.uint8)
    frames = np.stack([np.asarray(Image.fromarray(x).resize((w, h), Image.BILINEAR)) for x in small])
    frames[:, 2 : h // 3, 2 : w // 3] = RED
    return frames


def joints(rng, T, width=14):
    return np.cumsum(rng.normal(0, 0.05, (T, width)), 0)


def write_act_sim(path, T, rng, cameras=("top",), h=48, w=64):
    """As ACT's record_sim_episodes.py: datasets created without a dtype (float32), one-frame image chunks."""
    qpos = joints(rng, T)
    with h5py.File(path, "w", rdcc_nbytes=1024**2 * 2) as root:
        root.attrs["sim"] = True
        obs = root.create_group("observations")
        image = obs.create_group("images")
        for cam in cameras:
            image.create_dataset(cam, (T, h, w, 3), dtype="uint8", chunks=(1, h, w, 3))
        obs.create_dataset("qpos", (T, 14))
        obs.create_dataset("qvel", (T, 14))
        root.create_dataset("action", (T, 14))
        root["/observations/qpos"][...] = qpos
        root["/observations/qvel"][...] = np.gradient(qpos, axis=0)
        root["/action"][...] = qpos + 0.01
        for cam in cameras:
            root[f"/observations/images/{cam}"][...] = scene(rng, T, h, w)
    return str(path)


def write_aloha_jpeg(path, T, rng, cameras=("cam_high", "cam_low", "cam_left_wrist"), h=48, w=64):
    """Mobile ALOHA's compressed layout, its camera order not alphabetical (as the static ALOHA's cam_high, cam_low)."""
    rgb = {cam: scene(rng, T, h, w) for cam in cameras}
    qpos = joints(rng, T)
    return write_aloha(path, rgb, qpos, qpos + 0.01), rgb


def write_libero(path, lengths, rng, size=32, drop=None):
    """A robomimic/LIBERO task file: data/demo_i with obs/agentview_rgb, obs/eye_in_hand_rgb, joint and gripper
    states, 7-D actions; the instruction in data.attrs['problem_info']."""
    with h5py.File(path, "w") as f:
        grp = f.create_group("data")
        grp.attrs["problem_info"] = json.dumps(
            {
                "problem_name": "libero_tabletop_manipulation",
                "domain_name": "kitchen",
                "language_instruction": LIBERO_TASK,
            }
        )
        grp.attrs["macros_image_convention"] = "opengl"
        for i, T in enumerate(lengths):
            demo = grp.create_group(f"demo_{i}")
            demo.attrs["num_samples"] = T
            obs = demo.create_group("obs")
            obs["agentview_rgb"], obs["eye_in_hand_rgb"] = scene(rng, T, size, size), scene(rng, T, size, size)
            obs["joint_states"], obs["gripper_states"] = joints(rng, T, 7), joints(rng, T, 2)
            obs["ee_states"] = joints(rng, T, 6)
            if drop != "actions":
                demo["actions"] = np.clip(joints(rng, T, 7), -1, 1)
            demo["rewards"], demo["dones"] = np.zeros(T), np.zeros(T, np.uint8)
            demo["states"] = joints(rng, T, 30)
    return str(path)
