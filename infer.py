"""
Run a trained policy step by step through a recorded episode and report how well it tracks the recorded actions.

    python infer.py --checkpoint out/demo/step_000500 --episode out/demo_data/episode_10.hdf5 --out out/demo/infer
    python infer.py --checkpoint CKPT --episode EP.hdf5 --instruction unseen --execute 4
    python infer.py --checkpoint CKPT --episode EP.hdf5 --ensemble          # ACT-style temporal ensembling

This is open-loop replay: the policy sees the recorded frames, not the consequences of its own actions, so it shows
whether the model learned the data, not whether the task succeeds. In your own control loop:

    from infer import Policy
    policy = Policy.from_checkpoint("out/shoe/step_050000", device="cuda")
    action = policy.act({"head_camera_image": head_rgb, "left_wrist_image": wrist_rgb}, "place the shoe on the mat")
"""

import argparse
import io
import json
import os
import sys
import time
from collections import deque
from contextlib import nullcontext

import numpy as np
import torch
from PIL import Image

import data
import model

CHECKPOINT_FILES = ["args.json", "dataset_statistics.json", "action_head.safetensors"]
ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors"]  # an export has them folded in


def check_checkpoint(ckpt_dir):
    """One-line error for a checkpoint that cannot work, before any model is loaded: args.json, the statistics and
    the options the head records checked against each other. -> args.json"""
    if not os.path.isdir(ckpt_dir):
        sys.exit(f"error: --checkpoint {ckpt_dir}: not a directory")
    adapter = [] if os.path.isfile(os.path.join(ckpt_dir, "config.json")) else ADAPTER_FILES
    if missing := [f for f in CHECKPOINT_FILES + adapter if not os.path.isfile(os.path.join(ckpt_dir, f))]:
        sys.exit(f"error: checkpoint {ckpt_dir} is missing {', '.join(missing)}")
    where, stats = os.path.join(ckpt_dir, "args.json"), os.path.join(ckpt_dir, "dataset_statistics.json")
    try:
        args, head = model.read_json(where), model.head_options(os.path.join(ckpt_dir, "action_head.safetensors"))
        if absent := [k for k in "vla_path cameras chunk action_dim action_offset norm".split() if k not in args]:
            raise ValueError(f"{where}: no {', '.join(absent)}")
        # what the weights were trained for, as the head records it (and the cameras, in order, as frame_sizes does)
        trained = {k: head[k] for k in ("chunk", "action_dim", "attention", "image_aug", "film")} | {
            "proprio": bool(head["proprio_dim"]),
            "cameras": ",".join(args.get("frame_sizes") or [args["cameras"]]),
        }
        if k := next((k for k in trained if k in args and args[k] != trained[k]), None):
            raise ValueError(f"{where}: {k} {args[k]!r}, but the checkpoint was trained with {trained[k]!r}")
        for key, n in [("action", head["action_dim"])] + [("proprio", head["proprio_dim"])] * bool(head["proprio_dim"]):
            data.load_stats(stats, key=key, dim=n)
    except (OSError, ValueError) as e:  # data.DataError is a ValueError
        sys.exit(f"error: {e}")
    return args


def ensemble(recent, decay=0.01):
    """ACT's temporal ensembling: each recent chunk (oldest first) votes for this step, the oldest weighing most."""
    n = len(recent)  # chunk i was predicted n-1-i steps ago, so its row n-1-i is this step
    w = np.exp(-decay * np.arange(n))
    return (w / w.sum()) @ np.stack([c[n - 1 - i] for i, c in enumerate(recent)])


def jpeg_round_trip(frame, quality):
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"))


class Policy:
    """A trained nanoOFT policy: raw camera frames (and state) and an instruction in, raw joint-space actions out.
    Live frames take the training frames' path: a JPEG round trip if asked (for data whose frames went through JPEG),
    the data conversion's bicubic squash to the training frames' size, then the model's resize (and centre crop)."""

    def __init__(
        self, vla, stats, train_args, device, execute=1, ensemble=False, jpeg_quality=None, proprio_stats=None
    ):
        if type(execute) is not int or not 1 <= execute <= train_args["chunk"]:
            raise ValueError(f"Policy: execute must be 1..{train_args['chunk']} (the chunk), got {execute!r}")
        self.vla, self.stats, self.proprio_stats, self.args, self.device = vla, stats, proprio_stats, train_args, device
        self.execute, self.ensemble, self.jpeg_quality = execute, ensemble, jpeg_quality
        self.cameras, self.frame_sizes = train_args["cameras"].split(","), train_args.get("frame_sizes", {})
        dtype = next(vla.parameters()).dtype
        self.autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
        self.reset()

    @classmethod
    def from_checkpoint(cls, ckpt_dir, device="auto", vla_path=None, dtype=None, merge=True, **kw):
        """A training checkpoint (base named in args.json + adapter + head) or a merged export (`merge.py`).
        merge: fold a training checkpoint's LoRA into the base weights in place, to run at an export's speed."""
        train_args = check_checkpoint(ckpt_dir)
        device = torch.device(device if device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        merged = os.path.isfile(os.path.join(ckpt_dir, "config.json"))
        try:  # the adapter is checked against its config, and the base against it, before the base loads
            base = (
                ckpt_dir if merged else model.check_base(ckpt_dir, vla_path or model.trained_base(ckpt_dir, train_args))
            )
            # the head records chunk, action_dim, proprioception, attention, augmentation and FiLM: they come with it
            vla = model.VLA.from_pretrained(base, dtype=dtype, device=device)
            if not merged:  # an export already holds LoRA folded in and its head
                model.load_trained(vla, ckpt_dir)
                if merge:
                    model.merge_lora(vla)
        except (OSError, ValueError, RuntimeError) as e:
            sys.exit(f"error: {e}")
        vla.eval()
        stats = os.path.join(ckpt_dir, "dataset_statistics.json")
        proprio = data.load_stats(stats, key="proprio") if vla.proprio_dim else None
        return cls(vla, data.load_stats(stats), train_args, device, proprio_stats=proprio, **kw)

    def frame(self, camera, image):
        """A live HxWx3 uint8 RGB frame (array, tensor or PIL image) as this camera's training frames were made."""
        array = np.asarray(image.numpy(force=True) if torch.is_tensor(image) else image)
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
            raise ValueError(
                f"predict: {camera}: expected an HxWx3 uint8 RGB frame (numpy array, tensor or PIL "
                f"image), got {type(image).__name__} of {array.dtype} {array.shape}"
            )
        image = np.ascontiguousarray(array)
        if self.jpeg_quality:
            image = jpeg_round_trip(image, self.jpeg_quality)
        # older checkpoints record no training size: the model's input size, so that cameras of any sizes stack
        h, w = self.frame_sizes.get(camera) or [self.vla.image_size] * 2
        if image.shape[:2] != (h, w):
            image = np.asarray(Image.fromarray(image).resize((w, h), Image.BICUBIC))
        return torch.tensor(image).permute(2, 0, 1)  # PIL gives read-only arrays

    @torch.no_grad()
    def predict(self, images, instruction=None, state=None):
        """images: camera dataset name (head_camera_image, observations/images/top) -> HxWx3 uint8 RGB frame of any
        size; instruction: str or UTF-8 bytes; state: the raw (proprio_dim,) joint state. -> raw (chunk, action_dim)."""
        instruction = self.args.get("instruction") if instruction is None else instruction  # train.py --instruction
        instruction = instruction.decode() if isinstance(instruction, bytes) else instruction  # h5py gives bytes
        if not isinstance(instruction, str) or not instruction.strip():
            raise ValueError(f"predict: expected the instruction as a non-blank str or bytes, got {instruction!r:.60}")
        if not isinstance(images, dict) or set(self.cameras) - set(images):
            got = f"cameras {', '.join(images)}" if isinstance(images, dict) else type(images).__name__
            raise ValueError(f"predict: expected a dict camera name -> frame for {', '.join(self.cameras)}, got {got}")
        model.check_sequence_length(
            self.vla.config, self.vla.tokenizer, instruction, len(self.cameras), self.vla.proprio_dim, self.vla.chunk
        )
        if self.vla.proprio_dim and np.shape(state) != (self.vla.proprio_dim,):
            got = "None" if state is None else np.shape(state)
            raise ValueError(
                f"predict: this policy was trained with proprioception: pass state, the raw "
                f"({self.vla.proprio_dim},) joint state, got {got}"
            )
        if self.vla.proprio_dim and not np.isfinite(state).all():
            raise ValueError(f"predict: the state is NaN or inf at dims {np.flatnonzero(~np.isfinite(state)).tolist()}")
        frames = torch.stack([self.frame(c, images[c]) for c in self.cameras])
        state = (
            torch.as_tensor(data.normalize_state(np.asarray(state, np.float64), self.proprio_stats))[None]
            if self.vla.proprio_dim
            else None
        )
        with self.autocast:
            pred = self.vla(frames[None].to(self.device), [instruction], state)[0].float().cpu().numpy()
        return data.unnormalize(pred, self.stats, self.args["norm"])

    def reset(self):
        """Forget the plan; call at the start of every episode."""
        self.plan = deque()  # actions still to execute open-loop
        self.recent = deque(maxlen=self.args["chunk"])  # the chunks that still cover the coming step

    def act(self, images, instruction=None, state=None):
        """One control step: the next action, re-planning every `execute` steps or ensembling every step."""
        if self.ensemble:
            self.recent.append(self.predict(images, instruction, state))
            return ensemble(self.recent)
        if not self.plan:
            self.plan.extend(self.predict(images, instruction, state)[: self.execute])
        return self.plan.popleft()


def replay(policy, episode, instruction, progress=True):
    """Step through a recorded episode: every frame's full chunk (for per-position errors) and the executed actions."""
    offset = policy.args["action_offset"]
    steps = episode["length"] - offset  # frames whose action at t+offset is recorded
    chunks, executed, latency = [], [], []
    policy.reset()
    for t in range(steps):
        images = dict(zip(policy.cameras, episode["frames"](t).permute(0, 2, 3, 1).numpy()))  # as a robot gives them
        t0 = time.perf_counter()  # predict's copy to the host waits for the GPU: honest timing
        chunks.append(policy.predict(images, instruction, episode["states"][t]))
        latency.append(time.perf_counter() - t0)
        if policy.ensemble:
            policy.recent.append(chunks[-1])
            executed.append(ensemble(policy.recent))
        else:
            executed.append(chunks[t - t % policy.execute][t % policy.execute])
        if progress and (t % 10 == 0 or t == steps - 1):
            print(f"\rstep {t + 1}/{steps} | {1000 * np.mean(latency):.1f} ms per chunk", end="", flush=True)
    if progress:
        print()
    recorded = episode["actions"][offset : offset + steps]
    return np.stack(chunks), np.stack(executed), recorded, np.array(latency[1:] or latency)  # first call warms up


def report(chunks, executed, recorded, latency, stats, train_args):
    norm = train_args["norm"]
    n_exec, n_rec = data.normalize(executed, stats, norm), data.normalize(recorded, stats, norm)
    k, steps = chunks.shape[1], len(recorded)
    per_position = [
        float(
            np.mean([np.abs(data.normalize(chunks[t, j], stats, norm) - n_rec[t + j]).mean() for t in range(steps - j)])
        )
        for j in range(min(k, steps))
    ]
    names = (
        data.ACTION_NAMES
        if recorded.shape[1] == len(data.ACTION_NAMES)
        else [f"dim {i}" for i in range(recorded.shape[1])]
    )
    grippers = [i for i, n in enumerate(names) if "gripper" in n]
    agree = float(np.mean((executed[:, grippers] > 0.5) == (recorded[:, grippers] > 0.5))) if grippers else None
    ms = 1000 * latency
    return {
        "l1": float(np.abs(n_exec - n_rec).mean()),
        "l1_raw": float(np.abs(executed - recorded).mean()),
        "l1_per_dim_raw": {n: float(v) for n, v in zip(names, np.abs(executed - recorded).mean(0))},
        "l1_per_position": {f"t+{j}": v for j, v in enumerate(per_position)},
        "gripper_agreement": agree,
        "latency_ms": {
            "mean": float(ms.mean()),
            "p50": float(np.percentile(ms, 50)),
            "p95": float(np.percentile(ms, 95)),
        },
        "chunks_per_s": float(1000 / ms.mean()),
        "names": names,
        "executed": executed.tolist(),
        "recorded": recorded.tolist(),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a step_NNNNNN directory or a merged export")
    p.add_argument("--episode", required=True, help="an episode file, or FILE.hdf5:demo_N in a multi-demo file")
    p.add_argument(
        "--instruction",
        default="seen",
        help="seen or unseen (first variant of that set; seen falls back "
        "to the checkpoint's --instruction), or the text",
    )
    p.add_argument("--execute", type=int, default=1, help="actions executed per chunk before re-planning")
    p.add_argument("--ensemble", action="store_true", help="temporal ensembling over overlapping chunks (ACT)")
    p.add_argument("--vla_path", help="base model, overriding the one named in the checkpoint's args.json")
    p.add_argument("--out", default="out/infer", help="where report.json goes")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    if not args.instruction.strip():
        p.error("--instruction is blank: pass seen, unseen or the text")
    train_args = check_checkpoint(args.checkpoint)
    if not 1 <= args.execute <= train_args["chunk"]:
        p.error(f"--execute must be between 1 and the chunk length {train_args['chunk']}, got {args.execute}")
    cameras = train_args["cameras"].split(",")
    keys = {k: train_args.get(k, v) for k, v in dict(action_key="action", state_key=None, instruction=None).items()}
    try:
        data.check_episodes(
            [args.episode], cameras, train_args["chunk"], train_args["action_dim"], train_args["action_offset"], **keys
        )
    except data.DataError as e:
        sys.exit(f"error: {e}")
    episode = data.read_episode(args.episode, cameras, train_args.get("swap_red_blue", False), **keys)  # as trained
    if args.instruction in ("seen", "unseen") and not episode[args.instruction]:
        sys.exit(f'error: {args.episode} has no {args.instruction} instructions; pass --instruction "text"')
    instruction = episode[args.instruction][0] if args.instruction in ("seen", "unseen") else args.instruction

    policy = Policy.from_checkpoint(
        args.checkpoint, device=args.device, vla_path=args.vla_path, execute=args.execute, ensemble=args.ensemble
    )
    print(f"{args.episode}: {episode['length']} frames | instruction: {instruction!r}")
    chunks, executed, recorded, latency = replay(policy, episode, instruction)
    result = report(chunks, executed, recorded, latency, policy.stats, train_args)
    result |= {
        "checkpoint": args.checkpoint,
        "episode": args.episode,
        "instruction": instruction,
        "execute": args.execute,
        "ensemble": args.ensemble,
        "device": str(policy.device),
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(result, f)
    lat, agree = result["latency_ms"], result["gripper_agreement"]
    print(
        f"L1 {result['l1']:.4f} normalized, {result['l1_raw']:.4f} raw | gripper agreement "
        f"{'n/a' if agree is None else f'{agree:.3f}'} | latency p50 {lat['p50']:.1f} ms, p95 {lat['p95']:.1f} ms, "
        f"{result['chunks_per_s']:.1f} chunks/s"
    )
    print("per chunk position: " + " ".join(f"{k} {v:.3f}" for k, v in result["l1_per_position"].items()))
    print("per dimension (raw): " + " | ".join(f"{k} {v:.3f}" for k, v in result["l1_per_dim_raw"].items()))
    print(f"wrote {args.out}/report.json (plot it: python plot.py {args.out}/report.json)")


if __name__ == "__main__":
    main()
