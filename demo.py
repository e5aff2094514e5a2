"""
Fixtures for nanoOFT that sit beside the core, as nanoGPT's data/<name>/prepare.py: synthetic "place the shoe"
episodes in RoboTwin's OFT layout, learnable by a tiny model in minutes on a CPU, the tiny random OpenVLA-format
twin checkpoint that runs through the same code path as the 7B model, and a writer of real ALOHA's JPEG episodes.

$ python demo.py demo_data --episodes 48 --seed 0          # episode_0.hdf5 ... episode_47.hdf5
$ python demo.py --tiny tiny-openvla                        # the tiny twin (config, tokenizer, safetensors)

A non-empty --tiny DIR (a model or checkpoint there would lose its shards or its head) is refused unless --overwrite.
"""

import argparse
import glob
import io
import itertools
import json
import os
import sys
import time

import h5py
import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

import model
from data import ALL_CAMERAS, DataError
from merge import check_out, save_pretrained
from model import TOWERS, VIT, VLA, add_lora

# -----------------------------------------------------------------------------
# the 7B model's config and the tiny twin


def openvla_7b_config():
    """The config.json fields of openvla/openvla-7b that matter (text_config is a diff from LlamaConfig())."""
    return dict(
        model_type="openvla",
        architectures=["OpenVLAForActionPrediction"],
        use_fused_vision_backbone=True,
        vision_backbone_id="dinosiglip-vit-so-224px",
        llm_backbone_id="llama2-7b-pure",
        arch_specifier="no-align+fused-gelu-mlp",
        image_resize_strategy="resize-naive",
        image_sizes=[224, 224],
        timm_model_ids=["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"],
        timm_override_act_layers=[None, None],
        pad_token_id=32000,
        pad_to_multiple_of=64,
        n_action_bins=256,
        text_config=dict(model_type="llama", vocab_size=32064, pad_token_id=32000),
        llm_max_length=2048,
        norm_stats={},
    )


def param_report(vla):
    """Total and trainable parameters by part of the model, as a table."""
    parts = {
        "vision towers": ("vision_backbone.",),
        "projector": ("projector.",),
        "llm": ("language_model.",),
        "action head+queries": model.HEAD[:-1],
        "FiLM": model.HEAD[-1:],
        "total": ("",),
    }
    lines = [f"{'part':20s} {'total':>15s} {'trainable':>15s}"]
    for part, prefixes in parts.items():
        ps = [p for n, p in vla.named_parameters() if n.startswith(prefixes)]
        lines.append(
            f"{part:20s} {sum(p.numel() for p in ps):15,d} {sum(p.numel() for p in ps if p.requires_grad):15,d}"
        )
    return "\n".join(lines)


def tiny_config(tokenizer):
    pad = tokenizer.token_to_id("<PAD>")
    vocab = -(-tokenizer.get_vocab_size() // 64) * 64  # padded to 64 rows, as OpenVLA pads 32001 to 32064
    return {
        **openvla_7b_config(),
        "vision_backbone_id": "nanooft-tiny-dinosiglip-224px",
        "llm_backbone_id": "nanooft-tiny-llama",
        "pad_token_id": pad,
        "timm_model_ids": ["nanooft_tiny_dinov2_reg4", "nanooft_tiny_siglip"],
        "text_config": dict(
            model_type="llama",
            vocab_size=vocab,
            pad_token_id=pad,
            hidden_size=128,
            intermediate_size=512,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
        ),
    }


CORPUS = """In: What action should the robot take to pick up the shoe and place it on the mat?\nOut:
pick up the shoe and place it on the mat. grab the left shoe and put it onto the pad.
use the left arm to grasp the red sneaker, lift it and set it down on the blue mat.
move the right gripper to the black boot, close the gripper, raise it, then release it on the target.
place the shoe on the green mat with its toe pointing left. put the white shoe on top of the square rug.
take the brown sandal from the table and drop it in the middle of the yellow carpet.
open the gripper, reach forward, hold the object, turn it, push it, slide it towards the center.
the robot should carefully position the shoe at the marked spot near the edge of the desk.
stack the block, pour the cup, wipe the plate, press the button, hang the mug, stamp the seal.
a an the to of in on at by with from into onto over under behind beside between front back top bottom
one two three first second third small large big tiny short long left right middle center side corner
red orange yellow green blue purple pink white black gray grey brown dark light shiny wooden plastic metal
shoe shoes sneaker boot sandal slipper heel mat rug pad carpet table desk box bowl cup bottle block object item
Pick Put Place Move Grab Use Take Lift Open Close Push Set Drop Hold.
The quick fox jumps over the lazy dog, 0123456789"""


def make_tokenizer():
    """A Llama-like tokenizer trained offline on CORPUS: <unk>=0, <s>=1, </s>=2, byte pieces 3..258, BPE merges,
    Metaspace "▁" words, byte fallback for anything else, <PAD> added last."""
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    specials = ["<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.train_from_iterator(
        CORPUS.splitlines(), trainers.BpeTrainer(vocab_size=1000, special_tokens=specials, show_progress=False)
    )
    # put the 256 byte pieces right after the specials, as Llama-2 does, so byte fallback finds them
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    words = [t for t in sorted(vocab, key=vocab.get) if t not in specials]
    data["model"]["vocab"] = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)] + words)}
    tok = Tokenizer.from_str(json.dumps(data))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens(["<PAD>"])
    return tok


def make_tiny(out_dir, seed=0):
    """A complete, random, OpenVLA-format checkpoint small enough to train on one CPU core."""
    torch.manual_seed(seed)
    tok = make_tokenizer()
    vla = VLA.from_config(tiny_config(tok), tokenizer=tok)
    with torch.no_grad():  # pretrained towers shrug off flat colour shifts (brightness, contrast); random ones do not,
        for tower in vla.vision_backbone.values():  # so their patch kernels sum to zero in each colour channel
            tower.patch_embed.proj.weight -= tower.patch_embed.proj.weight.mean((2, 3), keepdim=True)
    save_pretrained(vla, out_dir)
    os.remove(os.path.join(out_dir, "action_head.safetensors"))  # a base checkpoint, like openvla-7b: no head
    # a real checkpoint also holds the tower keys OpenVLA never reads: write them so the skip list is exercised
    path, extra = os.path.join(out_dir, "model.safetensors"), {}
    for name, tid in zip(TOWERS, vla.config["timm_model_ids"]):
        s, w = VIT[tid], VIT[tid]["width"]
        block = vla.vision_backbone[name].blocks[0]
        shapes = {f"blocks.{s['depth'] - 1}.{k}": v.shape for k, v in block.state_dict().items()}
        shapes |= {"norm.weight": (w,), "norm.bias": (w,)}
        if s["attn_pool"]:
            shapes |= {
                f"attn_pool.{k}": v
                for k, v in dict(
                    latent=(1, 1, w),
                    **{
                        "q.weight": (w, w),
                        "q.bias": (w,),
                        "kv.weight": (2 * w, w),
                        "kv.bias": (2 * w,),
                        "proj.weight": (w, w),
                        "proj.bias": (w,),
                        "norm.weight": (w,),
                        "norm.bias": (w,),
                        "mlp.fc1.weight": (s["mlp"], w),
                        "mlp.fc1.bias": (s["mlp"],),
                        "mlp.fc2.weight": (w, s["mlp"]),
                        "mlp.fc2.bias": (w,),
                    },
                ).items()
            }
        extra |= {f"vision_backbone.{name}.{k}": 0.02 * torch.randn(shape) for k, shape in shapes.items()}
    save_file(load_file(path) | extra, path, metadata={"format": "pt"})
    return out_dir


# -----------------------------------------------------------------------------
# demo episodes: a top-down table, a red shoe, a green mat, two arms

BASES = np.array([[40.0, 248.0], [216.0, 248.0]])  # arm shoulders in head-camera pixels (x, y)
LOW_BASES = np.array([[40.0, 120.0], [216.0, 120.0]])  # and in the side view
FLOOR, TABLE, MAT, SHOE, WALL = (50, 50, 60), (205, 185, 145), (30, 150, 60), (210, 25, 25), (165, 190, 220)
LINK, JAW, OPEN, CLOSED = (110, 110, 125), (25, 25, 25), np.array([250, 215, 0]), np.array([200, 0, 220])
SEEN = [
    f"{v} {o} {d}.".capitalize()
    for v in ("place", "put", "set", "move", "drop")
    for o in ("the shoe", "the sneaker", "the red shoe", "the lone shoe")
    for d in ("on the mat", "onto the green mat", "on top of the mat")
]
UNSEEN = [
    f"{v} {o} and leave it {d}.".capitalize()
    for v in ("grab", "take", "pick up", "lift", "fetch")
    for o in ("the footwear", "that shoe", "the crimson sneaker", "the trainer")
    for d in ("on the pad", "atop the green rug", "over the target area")
]


def _blob(img, x, y, rx, ry, color):
    """Fill ellipses in all frames of img (T, H, W, 3) at once; x, y: (T,) or (T, n) centres; color: (3,) or (T, 3)."""
    T, H, W, _ = img.shape
    x, y, rx, ry = np.broadcast_arrays(
        *[np.asarray(v, float).reshape(T, -1) if np.ndim(v) else np.float64(v) for v in (x, y, rx, ry)]
    )
    reach = int(np.ceil(max(rx.max(), ry.max())))
    d = np.arange(-reach, reach + 1)
    cx, cy = np.rint(x).astype(int), np.rint(y).astype(int)
    ex, ey = ((cx - x)[..., None] + d) / rx[..., None], ((cy - y)[..., None] + d) / ry[..., None]  # (T, n, window)
    t, k, iy, ix = np.nonzero(ey[..., :, None] ** 2 + ex[..., None, :] ** 2 <= 1)
    py, px = cy[t, k] + d[iy], cx[t, k] + d[ix]
    ok = (px >= 0) & (px < W) & (py >= 0) & (py < H)
    color = np.asarray(color)
    img.reshape(-1, 3)[((t * H + py) * W + px)[ok]] = color[t[ok]] if color.ndim == 2 else color


def _arm(img, base, x, y, radius, grip):
    """One arm in every frame: a link of discs from the shoulder to the gripper, whose blob is yellow when open and
    purple when closed, with two dark jaws whose gap also shows the opening. x, y, radius, grip: (T,)."""
    s = np.linspace(0, 1, 24)
    _blob(img, base[0] + s * (x[:, None] - base[0]), base[1] + s * (y[:, None] - base[1]), 5, 5, LINK)
    _blob(img, x, y, radius, radius, (CLOSED + grip[:, None] * (OPEN - CLOSED)).astype(np.uint8))
    gap = 0.35 * radius + 10 * grip
    _blob(img, x[:, None] + np.stack([-gap, gap], 1), np.repeat(y[:, None], 2, 1), 4, 6, JAW)


def _joints(p, base):
    """A fixed smooth nonlinear stand-in for inverse kinematics: joint angles agree with the drawn gripper position."""
    u, v, z = (p[:, 0] - base[0]) / 256, (base[1] - p[:, 1]) / 256, p[:, 2]
    r, yaw = np.hypot(u, v), np.arctan2(u, v)
    return np.stack(
        [
            yaw,
            1.8 * r - 0.6 * z,
            0.9 * z - 1.5 * r**2 - 0.4,
            0.5 * np.sin(2 * yaw) * (1 - z),
            0.5 * r - 0.7 * z,
            0.5 * yaw + 0.3,
        ],
        1,
    )


def _demo_episode(rng, videos, canvas):
    """Reach the shoe, close, carry it to the mat, open, retreat. Draws the four cameras into videos[:, :T] (reused
    buffers: fresh 35 MB arrays cost more in page faults than the drawing) and returns actions (T, 14)."""
    side = rng.integers(2)  # the arm on the shoe's side does the work, the other one stays home
    shoe = np.array([rng.uniform(35, 100), rng.uniform(40, 125)])
    shoe[0] = 256 - shoe[0] if side else shoe[0]
    mat = np.array([128, 186]) + rng.uniform(-8, 8, 2)
    home = np.array([[60, 205, 0.8, 1], [196, 205, 0.8, 1]]) + rng.uniform(-1, 1, (2, 4)) * [8, 8, 0.05, 0]
    hover = rng.uniform(0.55, 0.75)
    wp = np.array(
        [
            home[side],
            home[side],
            [*shoe, hover, 1],
            [*shoe, 0.05, 1],
            [*shoe, 0.05, 0],
            [*shoe, hover, 0],
            [*mat, hover, 0],
            [*mat, 0.1, 0],
            [*mat, 0.1, 1],
            [*mat, hover, 1],
            home[side],
            home[side],
        ]
    )
    frames = np.array([8, 36, 14, 10, 12, 40, 12, 8, 10, 30, 6]) * rng.uniform(0.83, 1.1) * rng.uniform(0.9, 1.1, 11)
    n = np.maximum(2, np.rint(frames)).astype(int)  # so T <= 231
    seg = np.repeat(np.arange(len(n)), n)
    ease = (1 - np.cos(np.pi * np.concatenate([np.arange(k) / k for k in n]))) / 2
    arm = wp[seg] + ease[:, None] * (wp[seg + 1] - wp[seg])  # (T, 4): x, y, height, grip
    T, idle = len(arm), home[1 - side][None]
    held = (seg >= 4) & (seg < 7)  # from the closed grip until the gripper starts to open
    shoe_pos = np.where((seg < 4)[:, None], [*shoe, 0.0], [*mat, 0.0])
    shoe_pos[held] = arm[held, :3] - [0, 0, 0.05]
    state = [idle.repeat(T, 0)] * 2  # left, right
    state[side] = arm
    actions = np.concatenate([np.hstack([_joints(state[a], BASES[a]), state[a][:, 3:]]) for a in range(2)], 1)
    canvas, head, left, right, low = canvas[:T], *videos[:, :T]

    # head camera, from above: a canvas with a 32 px margin lets the wrist views crop around any gripper position
    def top(p):
        return (p[:, 0] + 32, p[:, 1] + 32, 7 + 12 * p[:, 2], p[:, 3])  # closer to the camera looks bigger

    bg = np.empty((320, 320, 3), np.uint8)
    bg[:] = FLOOR
    bg[32:268, 40:280] = TABLE
    bg[int(mat[1]) + 10 : int(mat[1]) + 54, int(mat[0]) - 4 : int(mat[0]) + 68] = MAT
    still = bg.copy()  # the idle arm never moves: draw it once
    _arm(still[None], BASES[1 - side] + 32, *top(idle))
    moved = (still != bg).any(-1)
    canvas[:] = bg
    grow = 1 + 0.6 * shoe_pos[:, 2]
    _blob(canvas, shoe_pos[:, 0] + 32, shoe_pos[:, 1] + 32, 18 * grow, 11 * grow, SHOE)
    for (a, wrist), t in itertools.product(enumerate((left, right)), range(T)):  # a 2x zoom of the scene below
        x, y = np.clip(np.rint(state[a][t, :2]).astype(int) - 32, 0, 192)
        zoom = wrist[t].reshape(128, 2, 256, 3)
        zoom[:, 0, 0::2] = zoom[:, 0, 1::2] = canvas[t, y : y + 128, x : x + 128]
        zoom[:, 1] = zoom[:, 0]
        gap = int(30 + 60 * state[a][t, 3])  # the jaws sit fixed in a wrist camera's view
        wrist[t, 190:, 92 - gap : 128 - gap] = wrist[t, 190:, 128 + gap : 164 + gap] = JAW
    canvas[:, moved] = still[moved]
    _arm(canvas, BASES[side] + 32, *top(arm))
    head[:] = canvas[:, 32:288, 32:288]

    # low camera: a side view from the front, height upwards
    def front(p):
        return (p[:, 0], 178 - 150 * p[:, 2], np.full(len(p), 11.0), p[:, 3])

    bg = np.empty((256, 256, 3), np.uint8)
    bg[:] = WALL
    bg[200:] = TABLE
    bg[196:201, int(mat[0]) - 36 : int(mat[0]) + 36] = MAT
    _arm(bg[None], LOW_BASES[1 - side], *front(idle))
    low[:] = bg
    _blob(low, shoe_pos[:, 0], 192 - 150 * shoe_pos[:, 2], 18, 9, SHOE)
    _arm(low, LOW_BASES[side], *front(arm))
    return actions


def make_demo(out_dir, episodes=48, seed=0):
    os.makedirs(out_dir, exist_ok=True)
    if glob.glob(os.path.join(out_dir, "episode_*.hdf5")):  # stale extra episodes would silently join the data
        raise DataError(f"{out_dir}: already holds episode_*.hdf5 files; remove them or choose another directory")
    t0, total = time.time(), 0
    videos, canvas = np.empty((4, 256, 256, 256, 3), np.uint8), np.empty((256, 320, 320, 3), np.uint8)  # T <= 231
    for i in range(episodes):
        rng = np.random.default_rng([seed, i])
        actions = _demo_episode(rng, videos, canvas)
        rel = np.diff(actions, axis=0, append=actions[-1:])
        rel[-1] = rel[-2]
        with h5py.File(os.path.join(out_dir, f"episode_{i}.hdf5"), "w") as f:
            for name, video in zip(ALL_CAMERAS, videos[:, : len(actions)]):  # gzip 1: flat colours shrink ~100x, fast
                f.create_dataset(name, data=video, chunks=(1, 256, 256, 3), compression="gzip", compression_opts=1)
            f["action"], f["relative_action"] = actions, rel
            for key, texts in (("seen", SEEN), ("unseen", UNSEEN)):
                f.create_dataset(key, data=list(rng.permutation(texts)[:50]), dtype=h5py.string_dtype())
        total += len(actions)
    print(f"wrote {episodes} demo episodes ({total} frames) to {out_dir} in {time.time() - t0:.1f}s")


# -----------------------------------------------------------------------------
# real ALOHA's compressed episodes


def cv2_jpeg(rgb, quality=50):
    """What cv2.imencode('.jpg', rgb) writes: it takes the array for BGR, so the JPEG holds red and blue swapped."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb[..., ::-1])).save(buf, "JPEG", quality=quality)
    return np.frombuffer(buf.getvalue(), np.uint8)


def write_aloha(path, frames, qpos, action):
    """An episode as Mobile ALOHA's record_episodes.py writes it with COMPRESS: each frame a JPEG zero-padded to the
    longest, compress_len (cameras, T) in the order of `frames` (the recorder's camera_names), the numbers float32
    (the recorder creates their datasets without a dtype)."""
    T, cameras = len(action), list(frames)
    encoded = {cam: [cv2_jpeg(x) for x in frames[cam]] for cam in cameras}
    compressed_len = np.array([[len(e) for e in encoded[cam]] for cam in cameras])
    padded_size = compressed_len.max()
    with h5py.File(path, "w", rdcc_nbytes=1024**2 * 2) as root:
        root.attrs["sim"], root.attrs["compress"] = False, True
        obs = root.create_group("observations")
        image = obs.create_group("images")
        for cam in cameras:
            image.create_dataset(cam, (T, padded_size), dtype="uint8", chunks=(1, padded_size))
            padded = np.zeros((T, padded_size), np.uint8)
            for t, e in enumerate(encoded[cam]):
                padded[t, : len(e)] = e
            root[f"/observations/images/{cam}"][...] = padded
        for name in ("qpos", "qvel", "effort"):
            obs.create_dataset(name, (T, 14), dtype="f4")
        root.create_dataset("action", (T, 14), dtype="f4")
        root.create_dataset("base_action", (T, 2), dtype="f4")
        root.create_dataset("compress_len", (len(cameras), T), dtype="f4")
        root["/observations/qpos"][...], root["/action"][...] = qpos, action
        root["/compress_len"][...] = compressed_len
    return str(path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", nargs="?", help="write synthetic demo episodes into this directory")
    parser.add_argument("--episodes", type=int, default=48, help="number of demo episodes")
    parser.add_argument("--seed", type=int, default=0, help="seed of the demo episodes or of the tiny twin's weights")
    parser.add_argument("--tiny", metavar="DIR", help="write the tiny random twin checkpoint to DIR instead")
    parser.add_argument("--overwrite", action="store_true", help="write the tiny twin into a non-empty --tiny DIR")
    args = parser.parse_args(argv)
    if args.tiny:
        try:  # a model or checkpoint there would lose its shards or its head
            check_out(args.tiny, "--tiny", args.overwrite)
        except ValueError as e:
            sys.exit(f"error: {e}")
        make_tiny(args.tiny, args.seed)
        print(f"wrote {args.tiny}; with LoRA rank 32:\n{param_report(add_lora(VLA.from_pretrained(args.tiny)))}")
    elif args.out_dir:
        try:
            make_demo(args.out_dir, args.episodes, args.seed)
        except DataError as e:
            sys.exit(f"error: {e}")
    else:
        parser.error("give a directory for demo episodes, or --tiny DIR")


if __name__ == "__main__":
    main()
