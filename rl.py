"""
Reinforcement learning in the simulator, started from a supervised nanoOFT checkpoint. The L1 head's normalized
chunk is the mean of a Gaussian whose per-dimension std is learned (or scheduled); rollouts run batched across
simulators; GRPO, PPO or success-filtered self-imitation (the baseline) update LoRA, the head and the std.

    python rl.py --checkpoint aloha/policies/transfer_cube --out_dir out/rl/tc                      # GRPO
    python rl.py --checkpoint CKPT --out_dir out/rl/ppo --algo ppo --reward stage                   # PPO
    python rl.py --checkpoint CKPT --out_dir out/rl/sil --algo sil                                  # the baseline
    python rl.py --out_dir out/rl/tc --resume auto                     # continue where it stopped, same flags
    python aloha/evaluate.py --checkpoint out/rl/tc/step_000020 --ensemble   # every command loads its checkpoints
    torchrun --nproc_per_node 8 rl.py --sim robotwin ...                # RoboTwin on GPUs: docs/rl.md

An iteration: each rank rolls out --episodes episodes on --envs simulators (GRPO: --episodes / --group seeds, each
rolled out --group times), on training seeds from --rollout_seed up that never meet the evaluation seeds; then
--ppo_epochs passes of --minibatches optimizer steps recompute the log-probabilities of the stored decisions (the
frames, instruction and state each chunk was sampled from). A checkpoint (step_NNNNNN, N the iteration) has the
standard layout, so Policy, infer.py, serve.py and aloha/evaluate.py load it as any other and run the mean; the
std and the trainer state lie beside it (action_std.json, rl_state.pt). docs/rl.md has the method and every flag.

Exit codes as train.py's: 0 done, 1 an error in one line, 75 stopped by --preempt_signals (saved: run the same
command with --resume auto), 130 Ctrl-C.
"""

import argparse
import json
import math
import os
import shutil
import signal
import sys
import time
from collections import deque

import numpy as np
import torch
import torch.distributed as dist

import data
import infer
import model
import train

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "aloha"))
import envs  # noqa: E402  (aloha/)
import evaluate  # noqa: E402
import record  # noqa: E402

RL_STATE = "rl_state.pt"
STD_FILE = "action_std.json"
ALGOS = ("grpo", "ppo", "sil")
LOG_2PI = math.log(2 * math.pi)

# -----------------------------------------------------------------------------
# the stochastic policy: a Gaussian around the head's normalized chunk


def gaussian_log_prob(sample, mean, log_std, mask):
    """log N(sample; mean, exp(log_std)) summed over the action dims and the executed steps of each chunk.
    sample, mean (B, k, D); log_std (D,); mask (B, k): 1 where the action ran. -> (B,)"""
    z = (sample - mean) * torch.exp(-log_std)
    per_dim = -0.5 * z**2 - log_std - 0.5 * LOG_2PI
    return (per_dim.sum(-1) * mask).sum(-1)


def gaussian_entropy(log_std):
    """Entropy of one action (D,) of the Gaussian, in nats: the sum over dims of 1/2 log(2 pi e sigma^2)."""
    return (0.5 + 0.5 * LOG_2PI + log_std).sum()


def gaussian_kl(mean, log_std, ref_mean, ref_log_std, mask):
    """KL(N(mean, std) || N(ref_mean, ref_std)) summed over dims and executed steps. -> (B,)"""
    var, ref_var = torch.exp(2 * log_std), torch.exp(2 * ref_log_std)
    per_dim = ref_log_std - log_std + (var + (mean - ref_mean) ** 2) / (2 * ref_var) - 0.5
    return (per_dim.sum(-1) * mask).sum(-1)


def clipped_surrogate(logp, old_logp, advantage, clip_low, clip_high):
    """PPO's clipped objective per sample, as a loss: -min(r A, clip(r, 1 - low, 1 + high) A), r the probability
    ratio. -> (loss (B,), clipped (B,) bool: where the clip took the gradient away)."""
    ratio = torch.exp(logp - old_logp)
    clipped_ratio = ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = -torch.minimum(ratio * advantage, clipped_ratio * advantage)
    clipped = ((ratio > 1 + clip_high) & (advantage > 0)) | ((ratio < 1 - clip_low) & (advantage < 0))
    return loss, clipped


def group_advantages(rewards, groups, eps=1e-6):
    """GRPO: each episode's reward less its group's mean, over the group's std (unbiased, as verl's GRPO that
    SimpleVLA-RL runs). A group whose rewards are all equal (all success, all failure) carries no signal and is
    dropped. rewards (N,) float tensor, groups: N hashable ids. -> (advantages (N,), kept (N,) bool)"""
    advantages, kept = torch.zeros_like(rewards), torch.zeros(len(rewards), dtype=torch.bool)
    for g in dict.fromkeys(groups):
        members = torch.tensor([i for i, h in enumerate(groups) if h == g])
        r = rewards[members]
        if len(r) < 2 or bool((r == r[0]).all()):
            continue
        advantages[members] = (r - r.mean()) / (r.std() + eps)
        kept[members] = True
    return advantages, kept


def batch_advantages(rewards, total, total_sq, count, eps=1e-6):
    """PPO's batch baseline: (reward - the mean of every episode of the iteration on every rank) / their std
    (unbiased). total, total_sq, count: the sums over all ranks. None when every reward is the same."""
    mean = total / count
    var = (total_sq - count * mean**2) / max(count - 1, 1)
    if count < 2 or var <= 1e-12:
        return None
    return (rewards - mean) / (math.sqrt(var) + eps)


class ActionStd:
    """The Gaussian's per-dimension log-std in normalized units: a trainable parameter (clamped to [--min_std,
    --max_std] where it is used), or with --std_schedule linear:A:B a fixed value going from A to B over the run."""

    def __init__(self, args, action_dim):
        self.schedule = parse_schedule(args.std_schedule)
        self.iterations, self.lo, self.hi = args.iterations, math.log(args.min_std), math.log(args.max_std)
        self.param = torch.nn.Parameter(torch.full((action_dim,), math.log(args.init_std)))
        # the starting policy's (--kl_coef's reference)
        first = args.init_std if self.schedule is None else self.schedule[0]
        self.initial = torch.full((action_dim,), math.log(first))
        self.param.requires_grad = self.schedule is None

    def set_iteration(self, it):
        """The scheduled std for iteration it (1-based); a learned one is left alone."""
        if self.schedule is not None:
            a, b = self.schedule
            f = (it - 1) / max(self.iterations - 1, 1)
            with torch.no_grad():
                self.param.fill_(math.log(a + (b - a) * f))

    def log_std(self):
        if self.schedule is not None:
            return self.param
        return self.param.clamp(self.lo, self.hi)


def parse_schedule(text):
    """--std_schedule: None (learned) or linear:A:B -> (A, B)."""
    if text is None:
        return None
    parts = text.split(":")
    try:
        assert parts[0] == "linear" and len(parts) == 3
        a, b = float(parts[1]), float(parts[2])
        assert a > 0 and b > 0 and math.isfinite(a) and math.isfinite(b)
    except (AssertionError, ValueError):
        sys.exit(f"error: --std_schedule {text!r}: expected linear:A:B with stds A, B > 0 (e.g. linear:0.2:0.05)")
    return a, b


# -----------------------------------------------------------------------------
# flags


def add_flags(p):
    p.add_argument("--checkpoint", help="the supervised checkpoint RL starts from (step_NNNNNN or a policy folder)")
    p.add_argument("--out_dir", default="out/rl")
    p.add_argument(
        "--log",
        choices=["none", "tensorboard", "wandb"],
        default="none",
        help="also log each iteration to TensorBoard or W&B, as train.py --log (metrics.jsonl either way)",
    )
    p.add_argument("--resume", help="'auto': the newest checkpoint in --out_dir (its flags are the defaults), or one")
    p.add_argument("--sim", choices=["aloha", "robotwin"], default="aloha")
    p.add_argument("--task", default="transfer_cube", help="aloha: transfer_cube or insertion; robotwin: place_shoe...")
    p.add_argument(
        "--locator",
        help="aloha, a located checkpoint: the aloha/locate.py file that reads where the objects start (default: "
        "CKPT/locator.pt), as evaluate.py --locator",
    )
    p.add_argument("--oracle", action="store_true", help="aloha, a located checkpoint: the simulator's positions")
    p.add_argument("--algo", choices=ALGOS, default="grpo", help="sil: success-filtered self-imitation")
    p.add_argument("--reward", choices=["success", "stage"], default="success", help="stage: max stage / 4")
    # 20 x 16: the budget of the measured comparison (docs/rl.md), 320 rollouts, 12-16 minutes on 2 cores
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--envs", type=int, default=8, help="simulators per rank, stepping in lockstep")
    p.add_argument("--episodes", type=int, default=16, help="rollouts per rank per iteration")
    p.add_argument("--group", type=int, help="rollouts of one seed (GRPO's group; default 8 for grpo, else 1)")
    p.add_argument("--steps", type=int, default=record.EPISODE_LEN, help="control steps per episode at most")
    p.add_argument("--execute", type=int, default=8, help="actions of each sampled chunk executed before re-planning")
    p.add_argument("--rollout_seed", type=int, default=20000, help="first training seed (never an evaluation seed)")
    # measured from the shipped transfer-cube policy (docs/rl.md): at 0.1 no rollout of 48 succeeded (the policy alone:
    # about half); at 0.01 they succeed about as often as the mean does
    p.add_argument("--init_std", type=float, default=0.01, help="initial std, normalized units ([-1, 1] is the range)")
    # measured on transfer cube (docs/rl.md): per-action noise of std 0.01 decides which rollouts of a group succeed
    # no more than noise of 1e-5 does; an offset held for the episode does decide them, yet its two runs (42 and 45
    # of 100) did not improve on the start (42), so the default stays per action
    p.add_argument(
        "--noise",
        choices=["action", "episode"],
        default="action",
        help="action: a fresh sample for every action; episode: one offset per episode, added to all its actions",
    )
    p.add_argument("--std_schedule", help="linear:A:B: a fixed std from A to B over the run instead of a learned one")
    p.add_argument("--min_std", type=float, default=0.005)
    p.add_argument("--max_std", type=float, default=1.0)
    # at std 0.01 one step of 2e-6 moves the policy by an approximate KL of 0.02-0.36 (median about 0.04):
    # --target_kl ends an update there (docs/rl.md); 5e-7 without it moved it no more and gained nothing
    p.add_argument("--lr", type=float, default=2e-6, help="LoRA and head")
    p.add_argument("--std_lr", type=float, default=1e-3, help="the learned log-std")
    p.add_argument("--weight_decay", type=float, default=0.0)
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--ppo_epochs", type=int, default=1, help="passes over an iteration's decisions")
    p.add_argument("--minibatches", type=int, default=4, help="optimizer steps per pass")
    p.add_argument("--micro_batch", type=int, default=16, help="decisions per forward pass (memory)")
    p.add_argument("--clip_low", type=float, default=0.2)
    p.add_argument("--clip_high", type=float, help="default 0.28 for grpo (SimpleVLA-RL), 0.2 for ppo")
    p.add_argument("--ent_coef", type=float, default=0.0, help="entropy bonus")
    p.add_argument(
        "--target_kl", type=float, default=0.02, help="end an update at the first minibatch whose approx KL is above"
    )
    p.add_argument("--kl_coef", type=float, default=0.0, help="KL to the starting policy (a second model)")
    p.add_argument("--bc_coef", type=float, default=0.0, help="L1 on the demonstrations, added to the RL loss")
    p.add_argument("--bc_batch", type=int, default=8, help="demonstration samples per optimizer step")
    p.add_argument("--demos", help="demonstrations for --bc_coef and sil (default: the checkpoint's data_dir)")
    p.add_argument("--sil_batch", type=int, default=16, help="sil: samples per optimizer step")
    p.add_argument("--sil_mix", type=float, default=0.5, help="sil: the share of a batch from the policy's successes")
    p.add_argument("--sil_buffer", type=int, default=64, help="sil: successful episodes kept (the newest)")
    p.add_argument("--eval_interval", type=int, default=0, help="iterations between evaluations (0: none)")
    p.add_argument("--eval_seed", type=int, default=1000, help="first evaluation seed (evaluate.py's default)")
    p.add_argument("--eval_episodes", type=int, default=100)
    p.add_argument("--eval_execute", type=int, default=8)
    p.add_argument("--eval_ensemble", action="store_true", help="evaluate with ACT's temporal ensembling")
    p.add_argument("--save_interval", type=int, default=10)
    p.add_argument("--keep_last", type=int, default=0, help="keep only the newest N checkpoints (0: all)")
    p.add_argument(
        "--progress", type=int, default=8, help="a line every N finished episodes and every 100 steps (0: none)"
    )
    p.add_argument("--vla_path", help="the base, overriding the one the checkpoint names")
    p.add_argument("--grad_ckpt", action="store_true", help="recompute activations in backward (7B on small GPUs)")
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help="auto: the checkpoint's --dtype, the one Policy loads it in",
    )
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: the free cores)")
    p.add_argument("--seed", type=int, default=7, help="action noise and minibatch order")
    p.add_argument("--dist_timeout", type=float, default=30, help="minutes a rank waits for the others")
    p.add_argument("--preempt_signals", default="SIGTERM,SIGUSR1")
    p.add_argument("--robotwin_root", help="robotwin: the RoboTwin checkout")
    p.add_argument("--task_config", default="demo_clean", help="robotwin: task_config/NAME.yml")
    p.add_argument(
        "--robotwin_factory",
        default="robotwin.rl_env:load_task",
        help="robotwin: module:function(root, task, task_config) -> (TASK_ENV, setup_demo arguments, describe)",
    )


# what may differ from the saved flags when resuming; every other flag must be the run's own
MAY_CHANGE = {"iterations", "save_interval", "keep_last", "progress", "resume", "device", "threads", "dist_timeout"}
MAY_CHANGE |= {"preempt_signals", "eval_interval", "eval_episodes", "eval_execute", "eval_ensemble", "out_dir", "log"}
POSITIVE = ["iterations", "envs", "episodes", "steps", "execute", "ppo_epochs", "minibatches", "micro_batch"]
POSITIVE += ["bc_batch", "sil_batch", "sil_buffer", "save_interval", "eval_episodes", "eval_execute"]
POSITIVE += ["init_std", "min_std", "max_std", "lr", "std_lr", "max_grad_norm", "dist_timeout"]
NOT_NEGATIVE = ["ent_coef", "target_kl", "kl_coef", "bc_coef", "eval_interval", "keep_last", "progress"]
NOT_NEGATIVE += ["threads", "clip_low", "weight_decay", "rollout_seed", "eval_seed"]


def get_args(argv=None):
    """The flags; with --resume the saved run's flags are the defaults, and a typed one that may not change is
    refused in one line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(p)
    args = p.parse_args(argv)
    resume = find_resume(args)
    if resume is not None:
        saved = resume.args["rl"]["flags"]
        p.set_defaults(**saved)
        args = p.parse_args(argv)
        # the start is recorded by its real path
        args.checkpoint = os.path.realpath(args.checkpoint)
        changed = sorted(k for k, v in vars(args).items() if k not in MAY_CHANGE and saved.get(k) != v)
        if changed:
            k = changed[0]
            sys.exit(
                f"error: --{k} {getattr(args, k)}: {resume.dir} was run with --{k} {saved.get(k)}; resume with "
                f"the same, or start anew in another --out_dir"
            )
    check_args(args)
    return args, resume


def check_args(args):
    """One line for each kind of bad flag, before anything loads."""
    for name in POSITIVE + NOT_NEGATIVE:
        value = getattr(args, name)
        if name in POSITIVE and not value > 0:
            sys.exit(f"error: --{name} {value}: must be positive")
        if not value >= 0:
            sys.exit(f"error: --{name} {value}: must be >= 0")
    if args.checkpoint is None:
        sys.exit("error: --checkpoint: give the supervised checkpoint to start from (or --resume a run)")
    # the defaults that depend on --algo, resolved here (args.json records them)
    if args.group is None:
        args.group = 8 if args.algo == "grpo" else 1
    if args.clip_high is None:
        args.clip_high = 0.28 if args.algo == "grpo" else 0.2
    if args.episodes % args.group:
        sys.exit(f"error: --episodes {args.episodes} is not a multiple of --group {args.group}")
    if args.algo == "grpo" and args.group < 2:
        sys.exit(f"error: --group {args.group}: GRPO compares rollouts of one seed, it needs at least 2")
    if args.min_std > args.max_std:
        sys.exit(f"error: --min_std {args.min_std} is above --max_std {args.max_std}")
    if not 0 <= args.sil_mix <= 1:
        sys.exit(f"error: --sil_mix {args.sil_mix}: a share, 0 to 1")
    parse_schedule(args.std_schedule)
    if args.sim == "robotwin" and args.eval_interval:
        sys.exit("error: --eval_interval: with --sim robotwin evaluate with RoboTwin's eval.sh (docs/rl.md)")
    if args.sim == "robotwin" and (args.locator or args.oracle):
        sys.exit("error: --locator and --oracle are for ALOHA's located checkpoints (--sim aloha)")
    if args.sim == "robotwin" and not args.robotwin_root:
        sys.exit("error: --sim robotwin needs --robotwin_root, the RoboTwin checkout")


def world_size():
    return int(os.environ.get("WORLD_SIZE", "1"))


def rollout_seeds(args, world):
    """The range of training seeds the whole run uses: [first, end)."""
    per_iteration = args.episodes // args.group * world
    return args.rollout_seed, args.rollout_seed + args.iterations * per_iteration


def check_seeds(args, demo_seeds, world):
    """Training rollouts never on a seed the run is scored on, nor one its demonstrations were recorded on."""
    lo, hi = rollout_seeds(args, world)
    e_lo, e_hi = args.eval_seed, args.eval_seed + args.eval_episodes
    if lo < e_hi and e_lo < hi:
        sys.exit(
            f"error: the rollout seeds {lo}..{hi - 1} (--rollout_seed, --iterations, --episodes / --group) overlap "
            f"the evaluation seeds {e_lo}..{e_hi - 1} (--eval_seed, --eval_episodes): move --rollout_seed"
        )
    used = sorted(s for s in demo_seeds if lo <= s < hi)
    if used:
        sys.exit(
            f"error: rollout seeds {lo}..{hi - 1} include {len(used)} seeds the checkpoint's demonstrations were "
            f"recorded on ({used[0]}..{used[-1]}): move --rollout_seed"
        )


# -----------------------------------------------------------------------------
# the checkpoint to start from or to resume


def rl_iteration(ckpt_dir):
    """The iteration of a step_NNNNNN directory by its name (-1 for another name)."""
    name = os.path.basename(os.path.normpath(ckpt_dir))
    return int(name[5:]) if name[:5] == "step_" and name[5:].isdecimal() else -1


class Resume:
    def __init__(self, ckpt_dir, state, run):
        self.dir, self.state, self.args = ckpt_dir, state, run


def find_resume(args):
    """The checkpoint to resume (None for a fresh run); refuses an out_dir that holds a run without --resume."""
    done = [(s, d) for s, d in train.checkpoints(args.out_dir) if os.path.isfile(os.path.join(d, RL_STATE))]
    if args.resume is None and train.checkpoints(args.out_dir):
        sys.exit(f"error: --out_dir {args.out_dir} already holds checkpoints: pass --resume auto, or a new --out_dir")
    if args.resume is None or (args.resume == "auto" and not done):
        return None
    candidates = [d for _, d in reversed(done)] if args.resume == "auto" else [args.resume]
    if args.resume != "auto":
        newer = [os.path.basename(d) for s, d in done if s > rl_iteration(args.resume)]
        if newer:
            sys.exit(
                f"error: --resume {args.resume} would write over the newer {', '.join(newer)}: pass a new --out_dir"
            )
    for ckpt in candidates:
        try:
            run = model.check_checkpoint(ckpt)
            state = torch.load(os.path.join(ckpt, RL_STATE), map_location="cpu", weights_only=False)
            return Resume(ckpt, state, run)
        except Exception as e:
            if args.resume != "auto":
                sys.exit(f"error: --resume {ckpt}: {e}")
            print(f"note: --resume auto skips {ckpt}: {e}")
    sys.exit(f"error: --resume auto: no usable checkpoint in --out_dir {args.out_dir}")


def source_record(args, resume):
    """The run record RL continues (the starting checkpoint's args.json, or the resumed RL checkpoint's) and the base
    it trained on, checked before anything loads: -> (record, checkpoint directory, base)."""
    source = resume.dir if resume else args.checkpoint
    try:
        run = model.check_checkpoint(source)
        base = model.check_base(source, args.vla_path or model.trained_base(source, run))
    except (OSError, ValueError, RuntimeError) as e:
        flag = "--resume" if resume else "--checkpoint"
        sys.exit(f"error: {flag} {e}")
    # --dtype auto: the dtype the checkpoint trained in, which Policy.from_checkpoint loads it in (auto: bfloat16 on
    # a GPU). In another the frozen base computes other features, and the rollouts would explore around another
    # policy than the one deployed: the bf16-trained insertion twin, run in float32, never touched the objects
    # (stage 0 in 160 of 160 rollouts) where in bfloat16 it reaches stages 1-3.
    if args.dtype == "auto":
        args.dtype = run["dtype"]
    if args.sim == "aloha" and not run.get("instruction"):
        sys.exit(f"error: {source}: records no instruction (train.py --instruction), and ALOHA's simulator gives none")
    if max(args.execute, args.eval_execute) > run["chunk"]:
        sys.exit(f"error: --execute and --eval_execute must be at most the checkpoint's chunk, {run['chunk']}")
    return run, source, base


def run_record(run, base, args, world):
    """args.json of the RL checkpoints: the supervised run's record (cameras, sizes, normalization, scene: what
    deployment reads) with the base by an absolute path, max_steps the last iteration (evaluate.py --checkpoints
    --watch reads it), and under "rl" the flags and where RL started."""
    record = {k: v for k, v in run.items() if k != "rl"}
    start = run.get("rl", {}).get("start", os.path.realpath(args.checkpoint))
    flags = vars(args) | {"checkpoint": start}
    record |= {"vla_path": os.path.abspath(base) if os.path.isdir(base) else base, "out_dir": args.out_dir}
    # the dtype RL ran in, which every command then loads the policy in
    record["dtype"] = args.dtype
    record |= {"max_steps": args.iterations, "rl": {"flags": flags, "start": start, "world_size": world}}
    return record


def load_demos(args, run, source):
    """The demonstrations for --bc_coef and sil, read as the checkpoint trained on them (its cameras, statistics,
    chunk, keys), or None when neither is asked for."""
    if args.algo != "sil" and not args.bc_coef:
        return None
    path = args.demos or run.get("data_dir")
    if not path or not os.path.isdir(path):
        sys.exit(
            f"error: --algo sil and --bc_coef train on demonstrations: pass --demos DIR (the checkpoint's "
            f"data_dir {path} is not a directory here)"
        )
    stats_path = os.path.join(source, "dataset_statistics.json")
    proprio = bool(run.get("proprio"))
    try:
        demos = data.EpisodeDataset(
            path,
            cameras=run["cameras"].split(","),
            chunk=run["chunk"],
            action_dim=run["action_dim"],
            stats=data.load_stats(stats_path),
            norm=run["norm"],
            action_offset=run["action_offset"],
            proprio=proprio,
            proprio_stats=data.load_stats(stats_path, key="proprio") if proprio else None,
            image_aug=run.get("image_aug", False),
            swap_red_blue=run.get("swap_red_blue", False),
            action_key=run.get("action_key", "action"),
            state_key=run.get("state_key"),
            instruction=run.get("instruction"),
        )
    except data.DataError as e:
        sys.exit(f"error: --demos {e}")
    if demos.frame_sizes != run["frame_sizes"]:
        sys.exit(
            f"error: --demos {path}: frames of {demos.frame_sizes}, the checkpoint trained on {run['frame_sizes']}"
        )
    return demos


# -----------------------------------------------------------------------------
# the simulators


def aloha_pool(args, run, source):
    """A maker of the SimPool (the checkpoint's cameras at its training size, its demos' scene), and the seeds its
    demonstrations were recorded on."""
    if args.task not in record.TASKS:
        sys.exit(f"error: --task {args.task!r}: unknown task; use {', '.join(record.TASKS)}")
    cameras = evaluate.check_policy_inputs(run, source, args.task)
    scene = argparse.Namespace(task=args.task, zoom=None, stock_render=False)
    zoom, stock, demo_seeds = evaluate.scene_settings(run, scene, source)
    # the state evaluate.py gives the checkpoint (the joint state; where the objects start for a located one),
    # resolved here so that a missing or unfitting locator is refused before anything starts
    state, _ = evaluate.state_reader(run, args, source, cameras, (zoom, stock))

    def make():
        pool = envs.SimPool(args.envs, args.task, cameras, not stock, zoom)
        # gym-aloha's stages; 4 is success
        pool.max_stage = 4
        return StatePool(pool, state) if state else pool

    return make, demo_seeds


class StatePool:
    """A simulator pool whose observations carry, as "qpos", the state the checkpoint takes (evaluate.state_reader):
    for a located checkpoint where the objects start, read from each episode's first frame by its locator (or the
    simulator's positions, --oracle) and held, after the joint state if it was trained on both. The rollouts, the
    replay after a resume and the evaluation all read "qpos", so each gives the policy what evaluate.py gives it."""

    def __init__(self, pool, state):
        self.pool, self.state, self.n, self.max_stage = pool, state, pool.n, pool.max_stage
        # per environment, its episode as evaluate.held reads it: the seed and the state read at its first step
        self.episodes = {}

    def reset(self, seeds, render):
        observations = self.pool.reset(seeds, render)
        for i, seed in seeds.items():
            self.episodes[i] = argparse.Namespace(seed=seed, held_state=None)
        return {i: self.stated(i, obs) for i, obs in observations.items()}

    def step(self, actions, render):
        stepped = self.pool.step(actions, render)
        return {i: (reward, self.stated(i, obs)) for i, (reward, obs) in stepped.items()}

    def stated(self, i, obs):
        return obs | {"qpos": self.state(obs, self.episodes[i])}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.pool.__exit__(*exc)


def robotwin_pool(args, run, source):
    """A maker of the RoboTwin pool (robotwin/rl_env.py); RoboTwin's demonstrations carry no seeds."""
    from robotwin import rl_env

    try:
        cameras = rl_env.check_inputs(args.robotwin_root, args.task, args.task_config, run["cameras"].split(","))
    except ValueError as e:
        sys.exit(f"error: {e}")

    def make():
        return rl_env.RoboTwinPool(
            args.envs, args.robotwin_root, args.task, args.task_config, cameras, args.robotwin_factory
        )

    return make, set()


# -----------------------------------------------------------------------------
# rollouts


class Decision:
    """One chunk the policy sampled: what it saw (frames (cameras, 3, H, W) uint8, instruction, normalized state or
    None), the mean and the sample of its first `execute` actions (k, D) in normalized units, the step it was
    sampled at and how many of its actions ran."""

    def __init__(self, seen, mean, sample, t):
        self.frames, self.instruction, self.state = seen
        self.mean, self.sample, self.t = mean, sample, t
        self.executed, self.ref_mean = 0, None


class Episode:
    """One rollout: its index, seed and group, the steps run, the best stage, its decisions, and every action sent
    (raw: to replay it; normalized: to imitate it)."""

    def __init__(self, index, seed, group):
        self.index, self.seed, self.group = index, seed, group
        self.t, self.best, self.skipped = 0, 0, False
        # --noise episode: the one standard-normal draw (D,) every action of the episode is offset by
        self.held = None
        self.decisions, self.plan, self.raw, self.normalized = [], deque(), [], []

    def finish(self, execute):
        for d in self.decisions:
            d.executed = min(execute, self.t - d.t)


def observe(helper, obs):
    """(frames (cameras, 3, H, W) uint8, instruction, normalized state or None) of one observation, through the
    checks and frame path of infer.Policy (helper)."""
    instruction, state = helper.check(obs["images"], obs.get("instruction"), obs["qpos"])
    frames = torch.stack([helper.frame(c, obs["images"][c]) for c in helper.cameras])
    return frames, instruction, None if state is None else torch.as_tensor(state, dtype=torch.float32)


def forward(vla, seen, proc, aug=None):
    """Normalized chunks (B, chunk, D) float32 of a list of (frames, instruction, state)."""
    frames = torch.stack([s[0] for s in seen]).to(proc.device)
    states = torch.stack([s[2] for s in seen]) if seen[0][2] is not None else None
    with proc.autocast:
        return vla(frames, [s[1] for s in seen], states, aug).float()


class Sampler:
    """The stochastic policy in rollouts: every environment whose plan is used up gets a chunk from one batched
    forward pass; a Gaussian sample around its first `execute` actions is unnormalized with the checkpoint's
    statistics, as Policy unnormalizes the mean, and executed open loop."""

    def __init__(self, vla, helper, std, gen, proc, execute, noise="action"):
        self.vla, self.helper, self.std, self.gen, self.proc, self.execute = vla, helper, std, gen, proc, execute
        self.noise = noise

    def draw(self, shape, episodes):
        """Standard-normal noise (B, k, D) for the episodes' chunks. action: a fresh draw for every action. episode:
        each episode's own draw (D,), taken at its first chunk and repeated for every action it runs, so the arm is
        pushed one way for a whole episode (a perturbation that changes where it grasps, where action noise of
        the same std averages out within a chunk). Each action's marginal is the same Gaussian either way, and that
        is the log-probability the update uses."""
        if self.noise == "action":
            return torch.randn(shape, generator=self.gen)
        for episode in episodes:
            if episode.held is None:
                episode.held = torch.randn(shape[-1], generator=self.gen)
        return torch.stack([e.held.expand(shape[1:]) for e in episodes])

    @torch.no_grad()
    def plan(self, observations, episodes):
        seen = [observe(self.helper, observations[i]) for i in episodes]
        mean = forward(self.vla, seen, self.proc).cpu()[:, : self.execute]
        noise = self.draw(mean.shape, list(episodes.values()))
        sample = mean + torch.exp(self.std.log_std().detach()) * noise
        for episode, s, m, x in zip(episodes.values(), seen, mean, sample):
            episode.decisions.append(Decision(s, m, x, episode.t))
            # not clipped to [-1, 1]: that is the demonstrations' range, not the robot's, and Policy runs the mean
            # unclipped. The shipped transfer-cube policy commands 7% of its actions beyond it (a quarter of its
            # left gripper's and wrist rotation's, by up to 0.12): clipped, the rollouts explored another policy
            # than the one deployed.
            normalized = x.numpy()
            raw = data.unnormalize(normalized, self.helper.stats, self.helper.args["norm"])
            episode.plan.extend(zip(raw, normalized))

    def act(self, observations, running):
        """One control step of every running environment: {env: raw action}."""
        empty = {i: e for i, e in running.items() if not e.plan}
        if empty:
            self.plan(observations, empty)
        actions = {}
        for i, episode in running.items():
            raw, normalized = episode.plan.popleft()
            episode.raw.append(raw)
            episode.normalized.append(normalized)
            actions[i] = raw
        return actions


def start_episodes(pool, free, pending, running, finished):
    """New episodes in the free environments: -> their first observations. A seed the simulator refuses (RoboTwin:
    one its expert cannot solve) ends at once, marked skipped, and the environment takes the next job."""
    observations, free = {}, list(free)
    while free and pending:
        seeds = {}
        for i in free:
            if pending:
                running[i] = Episode(*pending.popleft())
                seeds[i] = running[i].seed
        free = []
        for i, obs in pool.reset(seeds, {i: True for i in seeds}).items():
            if obs.get("skip"):
                episode = running.pop(i)
                episode.skipped = True
                finished.append(episode)
                free.append(i)
            else:
                observations[i] = obs
    return observations


def collect(pool, sampler, jobs, args, stop, progress):
    """Every job's episode (index, seed, group), pool.n at a time in lockstep; an episode ends at the task's last
    stage (success) or after --steps. -> the episodes in job order, or None as soon as a stop is asked."""
    pending, running, finished = deque(jobs), {}, []
    observations = start_episodes(pool, range(pool.n), pending, running, finished)
    steps = 0
    while running:
        if stop:
            return None
        steps += 1
        if steps % 100 == 0:
            progress(finished, steps)
        actions = sampler.act(observations, running)
        # frames only where the next step samples a chunk
        render = {i: not e.plan for i, e in running.items()}
        observations, ended = {}, []
        for i, (reward, obs) in pool.step(actions, render).items():
            episode = running[i]
            episode.t += 1
            episode.best = max(episode.best, reward)
            observations[i] = obs
            if reward >= pool.max_stage or episode.t >= args.steps or obs.get("done"):
                ended.append(i)
        for i in ended:
            episode = running.pop(i)
            episode.finish(args.execute)
            finished.append(episode)
            progress(finished, None)
        observations |= start_episodes(pool, ended, pending, running, finished)
    return sorted(finished, key=lambda e: e.index)


def replay(pool, episodes, helper, execute):
    """Regenerate the decision frames and states of episodes from their seeds and raw actions (each episode runs
    in a fresh simulator, so they come out the same): the self-imitation buffer after a resume."""
    todo = deque(episodes)
    while todo:
        batch = {i: todo.popleft() for i in range(pool.n) if todo}
        observations = pool.reset({i: e.seed for i, e in batch.items()}, {i: True for i in batch})
        for t in range(max(len(e.raw) for e in batch.values())):
            live = {i: e for i, e in batch.items() if t < len(e.raw)}
            for i, e in live.items():
                if t % execute == 0:
                    e.decisions.append(Decision(observe(helper, observations[i]), None, None, t))
            render = {i: (t + 1) % execute == 0 for i in live}
            observations = {i: obs for i, (_, obs) in pool.step({i: e.raw[t] for i, e in live.items()}, render).items()}
        for e in batch.values():
            e.finish(execute)


def jobs_for(next_seed, args, proc):
    """This rank's episodes of the iteration: (index, seed, group), each seed --group times in a row."""
    groups = args.episodes // args.group
    first = next_seed + proc.rank * groups
    return [(g * args.group + j, first + g, g) for g in range(groups) for j in range(args.group)]


def succeeded(episode, max_stage):
    """Whether the episode reached the task's last stage."""
    return not episode.skipped and episode.best >= max_stage


def reward_of(episode, args, max_stage):
    """--reward success: 0 or 1; stage: the best stage reached over the last one (gym-aloha: 0, 1/4, ... 1)."""
    if args.reward == "success":
        return float(succeeded(episode, max_stage))
    return episode.best / max_stage


# -----------------------------------------------------------------------------
# the update


def all_reduce(values, proc):
    """Sums over ranks of a list of numbers (float64)."""
    t = torch.tensor(values, dtype=torch.float64, device=proc.device)
    if proc.ddp:
        dist.all_reduce(t)
    return t.cpu().tolist()


def advantages(episodes, args, proc, max_stage):
    """-> ([(decision, advantage)] of the episodes that carry signal, groups kept, groups). GRPO: per group of one
    seed; PPO and sil: a baseline over every episode of the iteration on every rank."""
    live = [e for e in episodes if not e.skipped]
    rewards = torch.tensor([reward_of(e, args, max_stage) for e in live], dtype=torch.float64)
    groups = len({e.group for e in live})
    if args.algo == "grpo":
        adv, kept = group_advantages(rewards, [e.group for e in live])
        kept_groups = len({e.group for e, k in zip(live, kept) if k})
    else:
        total, total_sq, count = all_reduce([rewards.sum(), (rewards**2).sum(), len(live)], proc)
        adv = batch_advantages(rewards, total, total_sq, count)
        kept = torch.full((len(live),), adv is not None)
        adv = adv if adv is not None else torch.zeros_like(rewards)
        kept_groups = groups if adv.any() else 0
    samples = [(d, float(a)) for e, a, k in zip(live, adv, kept) if k for d in e.decisions if d.executed > 0]
    return samples, kept_groups, groups


class Update:
    """What an iteration's optimizer steps share: the model, the std, the optimizer and what trains, the
    reference model (KL) and the demonstrations (BC, sil), the flags, the process and the generator."""

    def __init__(self, vla, std, opt, trainable, ref, demos, args, proc, gen):
        self.vla, self.std, self.opt, self.trainable, self.ref, self.demos = vla, std, opt, trainable, ref, demos
        self.args, self.proc, self.gen = args, proc, gen
        self.ref_log_std = std.initial.clone()

    def step(self):
        """Gradients summed over ranks (each rank's loss is already scaled to the global mean), clipped, applied."""
        if self.proc.ddp:
            # one all-reduce for all of them, on the process's device (NCCL reduces CUDA tensors only; the log-std
            # lives on the CPU beside the sampling)
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.trainable]
            flat = torch.cat([g.flatten().to(self.proc.device) for g in grads])
            dist.all_reduce(flat)
            for p, g in zip(self.trainable, flat.split([g.numel() for g in grads])):
                p.grad = g.view_as(p).to(p.device)
        torch.nn.utils.clip_grad_norm_(self.trainable, self.args.max_grad_norm)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def policy_terms(self, batch, old_log_std):
        """Per decision: the clipped surrogate (+ KL and entropy terms) as a loss, and what to log. batch: a list of
        (decision, advantage)."""
        args, k = self.args, self.args.execute
        decisions = [d for d, _ in batch]
        seen = [(d.frames, d.instruction, d.state) for d in decisions]
        mean = forward(self.vla, seen, self.proc)[:, :k].cpu()
        sample, old_mean = torch.stack([d.sample for d in decisions]), torch.stack([d.mean for d in decisions])
        mask = (torch.arange(k) < torch.tensor([d.executed for d in decisions])[:, None]).float()
        adv = torch.tensor([a for _, a in batch], dtype=torch.float32)
        log_std = self.std.log_std()
        logp = gaussian_log_prob(sample, mean, log_std, mask)
        old_logp = gaussian_log_prob(sample, old_mean, old_log_std, mask)
        loss, clipped = clipped_surrogate(logp, old_logp, adv, args.clip_low, args.clip_high)
        entropy = gaussian_entropy(log_std) * mask.sum(1)
        kl = torch.zeros_like(loss)
        if args.kl_coef:
            kl = gaussian_kl(mean, log_std, self.ref_means(decisions), self.ref_log_std, mask)
        total = loss - args.ent_coef * entropy + args.kl_coef * kl
        # k3, Schulman's low-variance estimator of KL(old || new): (r - 1) - log r
        log_ratio = (logp - old_logp).detach()
        approx_kl = torch.expm1(log_ratio) - log_ratio
        logged = torch.stack([loss.detach(), clipped.float(), kl.detach(), approx_kl])
        return total, logged.sum(1)

    @torch.no_grad()
    def ref_means(self, decisions):
        """The starting policy's means at these decisions, computed once each."""
        todo = [d for d in decisions if d.ref_mean is None]
        if todo:
            means = forward(self.ref, [(d.frames, d.instruction, d.state) for d in todo], self.proc).cpu()
            for d, m in zip(todo, means[:, : self.args.execute]):
                d.ref_mean = m
        return torch.stack([d.ref_mean for d in decisions])

    def demo_l1(self, n):
        """L1 of n demonstration samples drawn with the generator (the supervised loss)."""
        picks = torch.randint(len(self.demos), (n,), generator=self.gen).tolist()
        batch = torch.utils.data.default_collate([self.demos[i] for i in picks])
        seen = list(zip(batch["images"], batch["instruction"], batch.get("state", [None] * n)))
        pred = forward(self.vla, seen, self.proc, batch.get("aug"))
        return train.l1_terms(pred, batch["actions"].to(self.proc.device))[0]

    def minibatch(self, batch, count, old_log_std):
        """Gradients of one minibatch (this rank's part; count: the minibatch's size over all ranks), in micro-batches,
        plus the BC term. -> the sums of what is logged over its decisions: loss, clipped, KL, approx KL; BC loss."""
        sums = torch.zeros(4, dtype=torch.float64)
        for start in range(0, len(batch), self.args.micro_batch):
            total, logged = self.policy_terms(batch[start : start + self.args.micro_batch], old_log_std)
            (total.sum() / count).backward()
            sums += logged.double()
        bc = 0.0
        if self.args.bc_coef:
            loss = self.demo_l1(self.args.bc_batch)
            (self.args.bc_coef * loss / self.proc.world).backward()
            bc = loss.item()
        return sums, bc

    def rl(self, samples):
        """--ppo_epochs passes of --minibatches optimizer steps over the iteration's decisions (each rank its own,
        the loss normalized by the count over all ranks). With --target_kl, the first minibatch whose approximate
        KL to the rollout policy (measured before its step) is above it ends the update (its KL logged as stop_kl).
        -> the logged means, or None when no rank has a sample."""
        args = self.args
        if all_reduce([len(samples)], self.proc)[0] == 0:
            return None
        old_log_std = self.std.log_std().detach().clone()
        sums, bc, steps, seen, stop_kl = torch.zeros(4, dtype=torch.float64), 0.0, 0, 0.0, 0.0
        planned = []
        for _ in range(args.ppo_epochs):
            parts = torch.randperm(len(samples), generator=self.gen).tensor_split(args.minibatches)
            planned += zip(parts, all_reduce([len(p) for p in parts], self.proc))
        for part, count in planned:
            if count == 0:
                continue
            part_sums, part_bc = self.minibatch([samples[j] for j in part], count, old_log_std)
            kl = all_reduce([part_sums[3]], self.proc)[0] / count
            if args.target_kl and kl > args.target_kl:
                # logged: the approximate KL of the accepted minibatches alone would read 0 after a one-step update
                stop_kl = kl
                self.opt.zero_grad(set_to_none=True)
                break
            sums, bc, seen = sums + part_sums, bc + part_bc, seen + count
            self.step()
            steps += 1
        sums = all_reduce(sums.tolist() + [bc], self.proc)
        n = max(seen, 1)
        row = {"pg_loss": sums[0] / n, "clip_frac": sums[1] / n, "kl": sums[2] / n, "approx_kl": sums[3] / n}
        return row | {"bc_loss": sums[4] / max(steps * self.proc.world, 1), "opt_steps": steps, "stop_kl": stop_kl}

    def sil(self, buffer):
        """Success-filtered self-imitation: --ppo_epochs x --minibatches supervised L1 steps on batches of the
        buffer's successes (a --sil_mix share) and the demonstrations. -> the logged means."""
        args = self.args
        targets = [(d, e) for e in buffer for d in e.decisions if d.t + self.vla.chunk <= len(e.normalized)]
        n_own = round(args.sil_mix * args.sil_batch) if targets else 0
        total, steps = 0.0, args.ppo_epochs * args.minibatches
        for _ in range(steps):
            loss = torch.zeros((), device=self.proc.device)
            if n_own:
                picks = torch.randint(len(targets), (n_own,), generator=self.gen).tolist()
                chosen = [targets[i] for i in picks]
                pred = forward(self.vla, [(d.frames, d.instruction, d.state) for d, _ in chosen], self.proc)
                goal = torch.stack(
                    [torch.as_tensor(np.stack(e.normalized[d.t : d.t + self.vla.chunk])) for d, e in chosen]
                )
                loss = loss + train.l1_terms(pred, goal.to(self.proc.device))[0] * n_own / args.sil_batch
            if n_own < args.sil_batch:
                loss = loss + self.demo_l1(args.sil_batch - n_own) * (args.sil_batch - n_own) / args.sil_batch
            (loss / self.proc.world).backward()
            total += loss.item()
            self.step()
        mean = all_reduce([total / steps], self.proc)[0] / self.proc.world
        return {"sil_loss": mean, "sil_samples": all_reduce([len(targets)], self.proc)[0]}


# -----------------------------------------------------------------------------
# evaluation on the held-out seeds: the deterministic mean, as aloha/evaluate.py runs it


def evaluate_seeds(vla, pool, run, stats, proprio_stats, args, proc):
    """--eval_episodes seeds from --eval_seed, shared out over ranks, through evaluate.py's own episode loop and
    Policy.act on the mean (--eval_execute, --eval_ensemble). -> evaluate.summarize of all of them."""
    vla.eval()
    seeds = list(range(args.eval_seed, args.eval_seed + args.eval_episodes))[proc.rank :: proc.world]
    policy = infer.Policy(
        vla,
        stats,
        run,
        proc.device,
        execute=args.eval_execute,
        ensemble=args.eval_ensemble,
        proprio_stats=proprio_stats,
        envs=pool.n,
    )
    state = evaluate.qpos_state if vla.proprio_dim else None
    act = evaluate.policy_actor(policy, run["instruction"], state, pool.n)
    results = evaluate.run_episodes(seeds, pool, act, policy.needs_frames, argparse.Namespace(steps=args.steps))
    everyone = [results]
    if proc.ddp:
        everyone = [None] * proc.world
        dist.all_gather_object(everyone, results)
    return evaluate.summarize([r for rank in everyone for r in rank])


# -----------------------------------------------------------------------------
# saving and resuming


def rng_state(gen):
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
    return {"cpu": torch.get_rng_state(), "cuda": cuda, "gen": gen.get_state()}


def set_rng_state(saved, gen, proc):
    torch.set_rng_state(saved["cpu"])
    if proc.use_cuda and saved["cuda"] is not None:
        torch.cuda.set_rng_state(saved["cuda"])
    gen.set_state(saved["gen"])


def buffer_record(buffer):
    """The self-imitation buffer as saved: what replays each episode (seed, raw actions) and what it imitates."""
    return [
        {"seed": e.seed, "group": e.group, "best": e.best, "raw": np.stack(e.raw), "normalized": np.stack(e.normalized)}
        for e in buffer
    ]


def buffer_from(saved, pool, helper, execute):
    """The saved buffer as episodes again, their decision frames regenerated in the simulator."""
    buffer = []
    for s in saved:
        e = Episode(0, s["seed"], s["group"])
        e.best, e.raw, e.normalized, e.t = s["best"], list(s["raw"]), list(s["normalized"]), len(s["raw"])
        buffer.append(e)
    replay(pool, buffer, helper, execute)
    return buffer


def save(it, state, ctx):
    """Rank 0 writes step_NNNNNN.tmp and renames it when whole: the standard checkpoint files (adapter, head, the
    starting checkpoint's statistics, args.json), action_std.json (the Gaussian's std, for people) and rl_state.pt
    (iteration, optimizer, log-std, every rank's RNG, the next seed, the self-imitation buffers: for resuming).
    state: this rank's (rng, next_seed, buffer) as of the end of iteration it."""
    rng, next_seed, buffer = state
    everyone = [(rng, buffer_record(buffer))]
    if ctx.proc.ddp:
        everyone = [None] * ctx.proc.world
        dist.all_gather_object(everyone, (rng, buffer_record(buffer)))
    if not ctx.proc.master:
        return
    final = os.path.join(ctx.args.out_dir, f"step_{it:06d}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    stats_path = os.path.join(ctx.source, "dataset_statistics.json")
    log_std = ctx.std.log_std().detach().clone()
    rl_state = {"iteration": it, "optimizer": ctx.opt.state_dict(), "log_std": ctx.std.param.detach().clone()}
    rl_state |= {"rng": [r for r, _ in everyone], "buffers": [b for _, b in everyone], "next_seed": next_seed}
    rl_state |= {"world_size": ctx.proc.world}
    try:
        model.write_checkpoint(tmp, ctx.vla, {"action_stats": ctx.stats, "proprio_stats": ctx.proprio_stats}, ctx.run)
        # the starting checkpoint's file as it is (its counts, its dataset name)
        shutil.copyfile(stats_path, os.path.join(tmp, "dataset_statistics.json"))
        torch.save(rl_state, os.path.join(tmp, RL_STATE))
        with open(os.path.join(tmp, STD_FILE), "w") as f:
            std = {"units": "normalized actions", "schedule": ctx.args.std_schedule}
            json.dump(std | {"std": torch.exp(log_std).tolist(), "log_std": log_std.tolist()}, f, indent=1)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        sys.exit(f"error: could not save {final} ({type(e).__name__}: {e}; disk full?); the earlier ones are untouched")
    if ctx.args.keep_last:
        older = [d for s, d in train.checkpoints(ctx.args.out_dir) if s < it]
        for old in older[: max(0, len(older) + 1 - ctx.args.keep_last)]:
            shutil.rmtree(old)
    print(f"saved {final}", flush=True)


def restore(ctx, resume, pool, helper):
    """The resumed iteration's optimizer, log-std, RNG and self-imitation buffer (LoRA and head were loaded with
    the model). -> (iteration, next seed, buffer)."""
    state = resume.state
    ctx.opt.load_state_dict(state["optimizer"])
    with torch.no_grad():
        ctx.std.param.copy_(state["log_std"])
    buffer = []
    if state["world_size"] == ctx.proc.world:
        set_rng_state(state["rng"][ctx.proc.rank], ctx.gen, ctx.proc)
        buffer = buffer_from(state["buffers"][ctx.proc.rank], pool, helper, ctx.args.execute)
    else:
        train.log(f"note: resuming on {ctx.proc.world} ranks a run saved on {state['world_size']}: new noise streams")
    train.log(f"resumed from {resume.dir} at iteration {state['iteration']}")
    return state["iteration"], state["next_seed"], buffer


# -----------------------------------------------------------------------------
# logging


def iteration_line(it, row, args):
    parts = [
        f"iter {it}/{args.iterations}",
        f"success {row['rollout_success']:.2f} ({row['successes']}/{row['episodes']})",
        f"stage {row['mean_stage']:.2f}",
        f"std {row['std']:.3f}",
    ]
    if args.algo == "sil":
        parts.append(f"sil loss {row.get('sil_loss', float('nan')):.4f}")
    else:
        parts.append(f"groups {row['groups_kept']}/{row['groups']}")
        if row.get("pg_loss") is not None:
            parts.append(f"clip {row['clip_frac']:.3f} | approx kl {row['approx_kl']:.4f} | pg {row['pg_loss']:.4f}")
            parts.append(f"kl to start {row['kl']:.4f}" if args.kl_coef else "")
            parts.append(f"bc {row['bc_loss']:.4f}" if args.bc_coef else "")
            if row["stop_kl"]:
                parts.append(
                    f"stopped by --target_kl at approx kl {row['stop_kl']:.4f} (steps taken: {row['opt_steps']})"
                )
        else:
            parts.append("no update (no group with signal)")
    parts.append(f"{row['seconds']:.0f} s (rollouts {row['rollout_s']:.0f})")
    return " | ".join(p for p in parts if p)


def write_curve(out_dir):
    """rl_curve.png beside metrics.jsonl: success of the rollouts and on the evaluation seeds, the mean stage and
    the std, against the iteration. Skipped with a note when matplotlib is missing."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return "note: no rl_curve.png: pip install -r requirements-plot.txt (matplotlib)"
    rows = []
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        for line in f:
            if line.endswith("\n"):
                rows.append(json.loads(line))
    it = [r for r in rows if "rollout_success" in r]
    ev = [r for r in rows if "eval_success" in r]
    fig = Figure(figsize=(12, 4), dpi=100, layout="constrained")
    success, stage, std = fig.subplots(1, 3)
    success.plot([r["step"] for r in it], [r["rollout_success"] for r in it], ".-", label="rollouts (sampled)")
    if ev:
        x = [r["step"] for r in ev]
        lo, hi = zip(*(r["eval_ci95"] for r in ev))
        success.fill_between(x, lo, hi, alpha=0.2, color="#d0501f")
        success.plot(x, [r["eval_success"] for r in ev], "o-", color="#d0501f", label="evaluation seeds (mean)")
    success.set(title="success", xlabel="iteration", ylabel="success rate", ylim=(0, 1))
    success.legend()
    stage.plot([r["step"] for r in it], [r["mean_stage"] for r in it], ".-")
    stage.set(title="rollouts: mean of the best stage reached", xlabel="iteration", ylabel="stage")
    std.plot([r["step"] for r in it], [r["std"] for r in it], ".-")
    std.set(title="Gaussian std (mean over dims)", xlabel="iteration", ylabel="std (normalized units)")
    fig.savefig(os.path.join(out_dir, "rl_curve.png"))
    return None


# -----------------------------------------------------------------------------
# the run


def build(args, run, source, base, demos, proc):
    """The policy (base + the checkpoint's LoRA and head, which train), the std, the optimizer, the reference model
    for --kl_coef, and what every step shares, as one namespace."""
    vla = model.VLA.from_pretrained(base, dtype=proc.dtype, device=proc.device)
    model.load_trained(vla, source)
    if args.grad_ckpt:
        model.enable_grad_ckpt(vla)
    std = ActionStd(args, vla.action_dim)
    params = [p for p in vla.parameters() if p.requires_grad]
    groups = [{"params": params, "lr": args.lr, "weight_decay": args.weight_decay}]
    trainable = list(params)
    if std.param.requires_grad:
        groups.append({"params": [std.param], "lr": args.std_lr, "weight_decay": 0.0})
        trainable.append(std.param)
    opt = torch.optim.AdamW(groups)
    ref = None
    if args.kl_coef:
        ref = model.VLA.from_pretrained(base, dtype=proc.dtype, device=proc.device)
        model.merge_lora(model.load_trained(ref, run.get("rl", {}).get("start", args.checkpoint)))
        ref.eval().requires_grad_(False)
    stats_path = os.path.join(source, "dataset_statistics.json")
    stats = data.load_stats(stats_path)
    proprio_stats = data.load_stats(stats_path, key="proprio") if vla.proprio_dim else None
    gen = torch.Generator().manual_seed(args.seed * 1000 + proc.rank)
    helper = infer.Policy(vla, stats, run, proc.device, execute=args.execute, proprio_stats=proprio_stats)
    ctx = argparse.Namespace(args=args, proc=proc, vla=vla, std=std, opt=opt, gen=gen, source=source, helper=helper)
    ctx.stats, ctx.proprio_stats, ctx.run = stats, proprio_stats, run_record(run, base, args, proc.world)
    ctx.sampler = Sampler(vla, helper, std, gen, proc, args.execute, args.noise)
    ctx.update = Update(vla, std, opt, trainable, ref, demos, args, proc, gen)
    ctx.trainable = trainable
    return ctx


def vote(stopped, stop, proc):
    """Whether any rank must stop (a --preempt_signals signal, or its launcher gone): every rank learns it at the
    same point, so all stop together."""
    if proc.ddp and os.getppid() != proc.launcher:
        stop.setdefault("why", "the launcher exited")
    return all_reduce([float(stopped or bool(stop))], proc)[0] > 0


def progress_printer(it, total, t0, args, proc, max_stage):
    """progress(finished, steps): a line (rank 0's) every --progress finished episodes of this rank, and every 100
    lockstep steps (steps given), so that a long iteration shows life."""

    def progress(finished, steps):
        n = len(finished)
        if not (proc.master and args.progress):
            return
        if steps is not None or n % args.progress == 0 or n == total:
            wins = sum(succeeded(e, max_stage) for e in finished)
            at = f" | step {steps}" if steps is not None else ""
            print(
                f"  iter {it}{at} | {n}/{total} episodes done, {wins} successes | {time.time() - t0:.0f} s", flush=True
            )

    return progress


def rollout_row(episodes, args, max_stage, proc):
    """The iteration's rollouts over all ranks: episodes, successes, mean stage and reward, decisions."""
    live = [e for e in episodes if not e.skipped]
    sums = [len(live), sum(succeeded(e, max_stage) for e in live), sum(e.best for e in live)]
    sums += [sum(reward_of(e, args, max_stage) for e in live), sum(len(e.decisions) for e in live)]
    sums += [sum(e.t for e in live), len(episodes) - len(live)]
    n, wins, stages, rewards, decisions, steps, skipped = all_reduce(sums, proc)
    n_safe = max(n, 1)
    return {
        "episodes": int(n),
        "successes": int(wins),
        "rollout_success": wins / n_safe,
        "mean_stage": stages / n_safe,
        "reward": rewards / n_safe,
        "decisions": int(decisions),
        "env_steps": int(steps),
        "skipped": int(skipped),
    }


def iteration(ctx, it, next_seed, buffer, pool, stop):
    """Rollouts with the current policy, then its update. -> (the metrics row, the buffer), or None when a rank was
    asked to stop during the rollouts (nothing has changed then but the RNG, which the caller restores)."""
    args, proc = ctx.args, ctx.proc
    ctx.std.set_iteration(it)
    jobs = jobs_for(next_seed, args, proc)
    t0 = time.time()
    ctx.vla.eval()
    episodes = collect(
        pool, ctx.sampler, jobs, args, stop, progress_printer(it, len(jobs), t0, args, proc, pool.max_stage)
    )
    if vote(episodes is None, stop, proc):
        return None
    t1 = time.time()
    row = {"step": it} | rollout_row(episodes, args, pool.max_stage, proc)
    ctx.vla.train()
    if args.algo == "sil":
        buffer = (buffer + [e for e in episodes if succeeded(e, pool.max_stage)])[-args.sil_buffer :]
        row |= ctx.update.sil(buffer) | {"buffer": len(buffer)}
    else:
        samples, kept, groups = advantages(episodes, args, proc, pool.max_stage)
        kept, groups = (int(x) for x in all_reduce([kept, groups], proc))
        row |= {"groups_kept": kept, "groups": groups, "samples": len(samples)}
        row |= ctx.update.rl(samples) or {"pg_loss": None}
    ctx.vla.eval()
    row |= {"std": float(torch.exp(ctx.std.log_std().detach()).mean()), "seeds": [jobs[0][1], jobs[-1][1]]}
    row |= {"seconds": time.time() - t0, "rollout_s": t1 - t0, "update_s": time.time() - t1}
    return row, buffer


def log_evaluation(ctx, it, pool, metrics):
    s = evaluate_seeds(ctx.vla, pool, ctx.run, ctx.stats, ctx.proprio_stats, ctx.args, ctx.proc)
    lo, hi = s["success_ci95"]
    row = {"step": it, "eval_success": s["success_rate"], "eval_ci95": s["success_ci95"]}
    row |= {"eval_episodes": s["episodes"], "eval_stage_rates": s["stage_rates"]}
    metrics.write(
        row,
        f"eval iter {it} | {s['success']}/{s['episodes']} = {100 * s['success_rate']:.0f}% success on seeds "
        f"{ctx.args.eval_seed}.. (95% CI {100 * lo:.0f}-{100 * hi:.0f}%) | stages 1-4: "
        + " ".join(f"{100 * v:.0f}%" for v in s["stage_rates"].values()),
    )


def finish(it, stopping, stop, args, proc):
    """Ranks leave together; a run stopped before its last iteration exits 75 (a scheduler requeues it)."""
    if proc.ddp:
        dist.barrier()
    if stopping and it < args.iterations:
        why = stop.get("why", "asked by another rank")
        train.log(f"stopped after iteration {it} ({why}), saved: run the same command with --resume auto", flush=True)
        sys.exit(75)


def loop(ctx, pool, start, next_seed, buffer, metrics):
    """The iterations from start + 1; saving every --save_interval, at the end and when stopping."""
    args, proc = ctx.args, ctx.proc
    per_iteration = args.episodes // args.group * proc.world
    stop = train.watch_for_preemption(args)
    it, stopping = start, False
    for it in range(start + 1, args.iterations + 1):
        before = (rng_state(ctx.gen), next_seed, list(buffer))
        done = iteration(ctx, it, next_seed, buffer, pool, stop)
        if done is None:
            # the rollouts were cut short: the model and optimizer are still those of iteration it - 1
            set_rng_state(before[0], ctx.gen, proc)
            if it - 1 > start and (it - 1) % args.save_interval:
                ctx.std.set_iteration(it - 1)
                save(it - 1, before, ctx)
            it, stopping = it - 1, True
            break
        row, buffer = done
        next_seed += per_iteration
        metrics.write(row, iteration_line(it, row, args))
        if args.eval_interval and (it % args.eval_interval == 0 or it == args.iterations):
            log_evaluation(ctx, it, pool, metrics)
        stopping = vote(False, stop, proc)
        if it % args.save_interval == 0 or it == args.iterations or stopping:
            if proc.ddp:
                train.log(train.check_ranks_agree(ctx.trainable, proc.world))
            save(it, (rng_state(ctx.gen), next_seed, buffer), ctx)
        if proc.master:
            note = write_curve(args.out_dir)
            if note and it == start + 1:
                print(note)
        if stopping:
            break
    finish(it, stopping, stop, args, proc)


def main(argv=None):
    args, resume = get_args(argv)
    train.on_preempt_signals(args, train.exit_in_startup)
    run, source, base = source_record(args, resume)
    make_pool, demo_seeds = (aloha_pool if args.sim == "aloha" else robotwin_pool)(args, run, source)
    check_seeds(args, demo_seeds, world_size())
    demos = load_demos(args, run, source)
    _lock = train.lock_out_dir(args)
    # the simulator processes fork before the process group's threads and the model exist
    with make_pool() as pool:
        proc = train.Process(args)
        torch.set_num_threads(args.threads or infer.cpu_threads())
        ctx = build(args, run, source, base, demos, proc)
        start, next_seed, buffer = 0, args.rollout_seed, []
        if resume:
            start, next_seed, buffer = restore(ctx, resume, pool, ctx.helper)
        # a resumed run drops the rows after its checkpoint; a fresh one those of an attempt that saved nothing
        metrics = train.Metrics(args.out_dir, start if resume else -1, proc, vars(args))
        lo, hi = rollout_seeds(args, proc.world)
        train.log(
            f"{args.algo} on {args.task} from {os.path.realpath(source)}: {args.iterations} iterations x "
            f"{args.episodes} episodes x {proc.world} ranks on {args.envs} simulators each, seeds {lo}..{hi - 1}, "
            f"reward {args.reward}, std {args.std_schedule or f'learned from {args.init_std}'}"
        )
        if proc.dtype == torch.bfloat16:
            # measured on the tiny twin (docs/rl.md): under autocast the bf16 roundings of weights and activations
            # flip with any change of the weights, so the ratio of an update measures rounding as much as learning
            train.log(
                "note: in bfloat16 every update also moves the mean by rounding (the tiny twin: about 0.0007, an "
                "approximate KL near 1 a decision at std 0.01, at lr 2e-6 or 2e-8): watch the first update's approx kl"
            )
        if args.eval_interval and start == 0:
            log_evaluation(ctx, 0, pool, metrics)
        loop(ctx, pool, start, next_seed, buffer, metrics)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print("interrupted: nothing saved since the last checkpoint", file=sys.stderr)
        sys.exit(130)
    finally:
        train.end_process(sys.exc_info()[1])
