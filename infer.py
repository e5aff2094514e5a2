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

Several environments at once (one forward pass for all of those that need a new chunk):

    policy.reset(envs=8)
    actions = policy.act([frames_0, ..., frames_7], "place the shoe on the mat", states)   # (8, action_dim)
"""

import argparse
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


def cpu_threads(others=0):
    """Threads for torch on the CPU: the cores this process may use, less those other work keeps busy (the load
    average, and `others` busy processes of our own about to start), at least 1. torch's default takes every core,
    and beside other busy processes that oversubscribes them: on a busy 2-core machine a chunk took 373 ms on 2
    threads against 80-131 ms on 1."""
    cores = len(os.sched_getaffinity(0))
    return max(1, cores - round(os.getloadavg()[0]) - others)


def ensemble(recent, decay=0.01):
    """ACT's temporal ensembling: each recent chunk (oldest first) votes for this step, the oldest weighing most."""
    # chunk i was predicted n-1-i steps ago, so its row n-1-i is this step
    n = len(recent)
    w = np.exp(-decay * np.arange(n))
    return (w / w.sum()) @ np.stack([c[n - 1 - i] for i, c in enumerate(recent)])


def as_batch(value, envs, what):
    """A per-environment list of `value`: one value for all of them, or a list of one per environment."""
    if isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and what == "state" and value.ndim == 2):
        if len(value) != envs:
            raise ValueError(f"predict: {len(value)} {what}s for {envs} environments")
        return list(value)
    return [value] * envs


class Policy:
    """A trained nanoOFT policy: raw camera frames (and state) and an instruction in, raw joint-space actions out.
    Live frames take the training frames' path: the data conversion's bicubic squash to the training frames' size,
    then the model's resize (and centre crop).
    Every call takes one environment (a dict of frames) or several (a list of dicts), which run in one batch."""

    def __init__(self, vla, stats, run, device, execute=1, ensemble=False, proprio_stats=None, envs=1):
        if type(execute) is not int or not 1 <= execute <= run["chunk"]:
            raise ValueError(f"Policy: execute must be 1..{run['chunk']} (the chunk), got {execute!r}")
        self.vla, self.stats, self.proprio_stats, self.args, self.device = vla, stats, proprio_stats, run, device
        self.execute, self.ensemble = execute, ensemble
        self.cameras, self.frame_sizes = run["cameras"].split(","), run["frame_sizes"]
        dtype = next(vla.parameters()).dtype
        self.autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
        self.reset(envs)

    @classmethod
    def from_checkpoint(cls, ckpt_dir, device="auto", vla_path=None, dtype=None, merge=True, **kw):
        """A training checkpoint (base named in args.json + adapter + head) or a merged export (`merge.py`).
        merge: fold a training checkpoint's LoRA into the base weights in place, to run at an export's speed.
        A checkpoint that cannot work is a ValueError or OSError naming the file, before any weight loads."""
        run = model.check_checkpoint(ckpt_dir)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device)
        if dtype is None:
            # the dtype it trained in (train.py --dtype; auto: bfloat16 on a GPU): a 7B model trained in bfloat16
            # on a CPU would not fit in memory as float32
            bf16 = run["dtype"] == "bfloat16" or (run["dtype"] == "auto" and device.type == "cuda")
            dtype = torch.bfloat16 if bf16 else torch.float32
        merged = model.is_export(ckpt_dir)
        # the adapter is checked against its config, and the base against it, before the base loads
        base = ckpt_dir if merged else model.check_base(ckpt_dir, vla_path or model.trained_base(ckpt_dir, run))
        # the head records chunk, action_dim, proprioception, attention, augmentation and FiLM: they come with it
        vla = model.VLA.from_pretrained(base, dtype=dtype, device=device)
        # an export already holds LoRA folded in, and its head
        if not merged:
            model.load_trained(vla, ckpt_dir)
            if merge:
                model.merge_lora(vla)
        vla.eval()
        stats = os.path.join(ckpt_dir, "dataset_statistics.json")
        proprio = data.load_stats(stats, key="proprio") if vla.proprio_dim else None
        return cls(vla, data.load_stats(stats), run, device, proprio_stats=proprio, **kw)

    def frame(self, camera, image):
        """A live HxWx3 uint8 RGB frame (array, tensor or PIL image) as this camera's training frames were made."""
        array = np.asarray(image.numpy(force=True) if torch.is_tensor(image) else image)
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
            raise ValueError(
                f"predict: {camera}: expected an HxWx3 uint8 RGB frame (numpy array, tensor or PIL "
                f"image), got {type(image).__name__} of {array.dtype} {array.shape}"
            )
        image = np.ascontiguousarray(array)
        h, w = self.frame_sizes[camera]
        if image.shape[:2] != (h, w):
            image = np.asarray(Image.fromarray(image).resize((w, h), Image.BICUBIC))
        # a tensor of its own: PIL gives read-only arrays
        return torch.tensor(image).permute(2, 0, 1)

    def check(self, images, instruction, state):
        """One environment's request checked: -> (its instruction, its normalized state or None). str or UTF-8
        bytes (h5py gives bytes); None: the checkpoint's --instruction."""
        if instruction is None:
            instruction = self.args.get("instruction")
        if isinstance(instruction, bytes):
            instruction = instruction.decode()
        if not isinstance(instruction, str) or not instruction.strip():
            raise ValueError(f"predict: expected the instruction as a non-blank str or bytes, got {instruction!r:.60}")
        if not isinstance(images, dict) or set(self.cameras) - set(images):
            got = f"cameras {', '.join(images)}" if isinstance(images, dict) else type(images).__name__
            raise ValueError(f"predict: expected a dict camera name -> frame for {', '.join(self.cameras)}, got {got}")
        vla = self.vla
        model.check_sequence_length(
            vla.config, vla.tokenizer, instruction, len(self.cameras), vla.proprio_dim, vla.chunk
        )
        if not vla.proprio_dim:
            return instruction, None
        if np.shape(state) != (vla.proprio_dim,):
            got = "None" if state is None else np.shape(state)
            raise ValueError(
                f"predict: this policy was trained with proprioception: pass state, the raw "
                f"({vla.proprio_dim},) joint state, got {got}"
            )
        if not np.isfinite(state).all():
            raise ValueError(f"predict: the state is NaN or inf at dims {np.flatnonzero(~np.isfinite(state)).tolist()}")
        return instruction, data.normalize_state(np.asarray(state, np.float64), self.proprio_stats)

    @torch.no_grad()
    def predict(self, images, instruction=None, state=None):
        """images: camera dataset name (head_camera_image, observations/images/top) -> HxWx3 uint8 RGB frame of any
        size; instruction: str or UTF-8 bytes; state: the raw (proprio_dim,) joint state. -> raw (chunk, action_dim).
        Several environments: a list of B such dicts, one instruction or B of them, B states (a list or a (B, dim)
        array) -> raw (B, chunk, action_dim), each row what the environment alone would get."""
        batched = isinstance(images, (list, tuple))
        envs = list(images) if batched else [images]
        instructions = as_batch(instruction, len(envs), "instruction")
        states = as_batch(state, len(envs), "state") if batched else [state]
        checked = [self.check(*request) for request in zip(envs, instructions, states)]
        # frames (B, cameras, 3, H, W) uint8
        frames = torch.stack([torch.stack([self.frame(c, env[c]) for c in self.cameras]) for env in envs])
        state = None
        if self.vla.proprio_dim:
            state = torch.as_tensor(np.stack([s for _, s in checked]))
        with self.autocast:
            pred = self.vla(frames.to(self.device), [i for i, _ in checked], state).float().cpu().numpy()
        # pred (B, chunk, action_dim), normalized
        actions = data.unnormalize(pred, self.stats, self.args["norm"])
        return actions if batched else actions[0]

    def reset(self, envs=1):
        """Forget the plans; call at the start of every episode, with the number of environments act will take."""
        # per environment: the actions still to execute open loop, and the chunks that still cover the coming step
        self.plans = [deque() for _ in range(envs)]
        self.recent = [deque(maxlen=self.args["chunk"]) for _ in range(envs)]
        # per environment: the chunk the last act predicted for it, or None
        self.last_chunks = [None] * envs

    def forget(self, i):
        """Forget environment i's plan alone: it starts a new episode while the others go on."""
        self.plans[i].clear()
        self.recent[i].clear()

    def needs_frames(self):
        """Per environment: whether its next act predicts a chunk (and so reads its frames): every step with
        ensembling, else when its plan is used up. A simulator can render only those."""
        return [self.ensemble or not plan for plan in self.plans]

    def act(self, images, instruction=None, state=None):
        """One control step: the next action, re-planning every `execute` steps or ensembling every step. Several
        environments (a list, as predict) -> (B, action_dim); the environments that need a new chunk share one
        forward pass. An entry may be None where needs_frames() said False; an environment given None where it
        needed a chunk (one with no episode running, say) is skipped: its row is NaN."""
        batched = isinstance(images, (list, tuple))
        envs = list(images) if batched else [images]
        if len(envs) != len(self.plans):
            raise ValueError(f"act: {len(envs)} environments, but reset(envs={len(self.plans)}) was for fewer or more")
        instructions = as_batch(instruction, len(envs), "instruction")
        states = as_batch(state, len(envs), "state") if batched else [state]
        need = self.needs_frames()
        ask = [i for i in range(len(envs)) if need[i] and envs[i] is not None]
        self.last_chunks = [None] * len(envs)
        if ask:
            pick = [[values[i] for i in ask] for values in (envs, instructions, states)]
            for i, chunk in zip(ask, self.predict(*pick)):
                self.last_chunks[i] = chunk
        actions = []
        for i, chunk in enumerate(self.last_chunks):
            if need[i] and envs[i] is None:
                actions.append(np.full(self.vla.action_dim, np.nan))
            else:
                actions.append(self.next_action(i, chunk))
        return np.stack(actions) if batched else actions[0]

    def next_action(self, i, chunk):
        """Environment i's action this step, given the chunk just predicted for it (None: none was)."""
        if self.ensemble:
            self.recent[i].append(chunk)
            return ensemble(self.recent[i])
        if chunk is not None:
            self.plans[i].extend(chunk[: self.execute])
        return self.plans[i].popleft()


def replay(policy, episode, instruction, progress=True):
    """Step through a recorded episode with Policy.act, as a robot would: -> the chunks it predicted with the step
    of each, the executed actions, the recorded ones, and the seconds each chunk took."""
    offset = policy.args["action_offset"]
    # frames whose action at t+offset is recorded
    steps = episode["length"] - offset
    chunks, executed, latency = [], [], []
    policy.reset()
    for t in range(steps):
        # as a robot gives them: HxWx3 per camera
        images = dict(zip(policy.cameras, episode["frames"](t).permute(0, 2, 3, 1).numpy()))
        # act copies the chunk to the host, which waits for the GPU: honest timing
        t0 = time.perf_counter()
        executed.append(policy.act(images, instruction, episode["states"][t]))
        if policy.last_chunks[0] is not None:
            latency.append(time.perf_counter() - t0)
            chunks.append((t, policy.last_chunks[0]))
        if progress and (t % 10 == 0 or t == steps - 1):
            print(f"\rstep {t + 1}/{steps} | {1000 * np.mean(latency):.1f} ms per chunk", end="", flush=True)
    if progress:
        print()
    recorded = episode["actions"][offset : offset + steps]
    # the first call warms up
    latency = np.array(latency[1:] or latency)
    return chunks, np.stack(executed), recorded, latency


def per_position_l1(chunks, recorded, stats, norm):
    """Normalized L1 of each chunk position t+j against the action recorded j steps after its frame t."""
    target = data.normalize(recorded, stats, norm)
    k = len(chunks[0][1])
    errors = [[] for _ in range(k)]
    for t, chunk in chunks:
        pred = data.normalize(chunk, stats, norm)
        for j in range(min(k, len(recorded) - t)):
            errors[j].append(np.abs(pred[j] - target[t + j]).mean())
    return {f"t+{j}": float(np.mean(e)) for j, e in enumerate(errors) if e}


def report(chunks, executed, recorded, latency, stats, run):
    norm = run["norm"]
    n_exec, n_rec = data.normalize(executed, stats, norm), data.normalize(recorded, stats, norm)
    names = data.action_names(recorded.shape[1])
    grippers = [i for i, n in enumerate(names) if "gripper" in n]
    agree = None
    if grippers:
        agree = float(np.mean((executed[:, grippers] > 0.5) == (recorded[:, grippers] > 0.5)))
    ms = 1000 * latency
    return {
        "l1": float(np.abs(n_exec - n_rec).mean()),
        "l1_raw": float(np.abs(executed - recorded).mean()),
        "l1_per_dim_raw": {n: float(v) for n, v in zip(names, np.abs(executed - recorded).mean(0))},
        "l1_per_position": per_position_l1(chunks, recorded, stats, norm),
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


def trained_on(run, episode):
    """Whether the checkpoint trained on this episode file: its name and size among the run's training files (the
    run records names and sizes, not paths) and not among its validation episodes."""
    name = os.path.basename(data.split_ref(episode)[0])
    held_out = {os.path.basename(data.split_ref(p)[0]) for p in run.get("val_episode_files", [])}
    size = os.path.getsize(data.split_ref(episode)[0])
    return run.get("data_files", {}).get(name) == size and name not in held_out


def load_episode(args, run):
    """The episode, checked and read as the checkpoint trained (its cameras, keys, colour order), and the
    instruction to give it."""
    cameras = run["cameras"].split(",")
    keys = {k: run[k] for k in ("action_key", "state_key", "instruction")}
    try:
        data.check_episodes([args.episode], cameras, run["chunk"], run["action_dim"], run["action_offset"], **keys)
    except data.DataError as e:
        sys.exit(f"error: {e}")
    episode = data.read_episode(args.episode, cameras, run["swap_red_blue"], **keys)
    if args.instruction in ("seen", "unseen") and not episode[args.instruction]:
        sys.exit(f'error: {args.episode} has no {args.instruction} instructions; pass --instruction "text"')
    if args.instruction in ("seen", "unseen"):
        return episode, episode[args.instruction][0]
    return episode, args.instruction


def print_report(result, out):
    lat, agree = result["latency_ms"], result["gripper_agreement"]
    agreement = "n/a" if agree is None else f"{agree:.3f}"
    print(
        f"L1 {result['l1']:.4f} normalized, {result['l1_raw']:.4f} raw | gripper agreement {agreement} | "
        f"latency p50 {lat['p50']:.1f} ms, p95 {lat['p95']:.1f} ms, {result['chunks_per_s']:.1f} chunks/s"
    )
    print("per chunk position: " + " ".join(f"{k} {v:.3f}" for k, v in result["l1_per_position"].items()))
    print("per dimension (raw): " + " | ".join(f"{k} {v:.3f}" for k, v in result["l1_per_dim_raw"].items()))
    print(f"wrote {out}/report.json (plot it: python plot.py {out}/report.json)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a step_NNNNNN directory or a merged export")
    p.add_argument("--episode", required=True, help="an episode file, or FILE.hdf5:demo_N in a multi-demo file")
    p.add_argument(
        "--instruction",
        default="seen",
        help="seen or unseen (first variant of that set; seen falls back to the checkpoint's --instruction), "
        "or the text",
    )
    p.add_argument("--execute", type=int, default=1, help="actions executed per chunk before re-planning")
    p.add_argument("--ensemble", action="store_true", help="temporal ensembling over overlapping chunks (ACT)")
    p.add_argument("--vla_path", help="base model, overriding the one named in the checkpoint's args.json")
    p.add_argument("--out", default="out/infer", help="where report.json goes")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    if not args.instruction.strip():
        p.error("--instruction is blank: pass seen, unseen or the text")
    try:
        run = model.check_checkpoint(args.checkpoint)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    if not 1 <= args.execute <= run["chunk"]:
        p.error(f"--execute must be between 1 and the chunk length {run['chunk']}, got {args.execute}")
    episode, instruction = load_episode(args, run)
    seen_in_training = trained_on(run, args.episode)
    if seen_in_training:
        print(
            f"note: {args.episode} is one of the episodes the checkpoint trained on: its L1 says little about new ones"
        )
    torch.set_num_threads(cpu_threads())
    try:
        policy = Policy.from_checkpoint(
            args.checkpoint, device=args.device, vla_path=args.vla_path, execute=args.execute, ensemble=args.ensemble
        )
    except (OSError, ValueError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    print(f"{args.episode}: {episode['length']} frames | instruction: {instruction!r}")
    result = report(*replay(policy, episode, instruction), policy.stats, run)
    result |= {"checkpoint": args.checkpoint, "episode": args.episode, "instruction": instruction}
    result |= {"execute": args.execute, "ensemble": args.ensemble, "device": str(policy.device)}
    result["trained_on"] = seen_in_training
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(result, f)
    print_report(result, args.out)


if __name__ == "__main__":
    main()
