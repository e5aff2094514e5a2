"""
Fine-tune OpenVLA with LoRA and an L1 action-chunk head on HDF5 robot episodes.

One process (CPU or one GPU):
    python train.py --vla_path out/tiny-openvla --data_dir out/demo_data --out_dir out/run
All GPUs of this machine (launch.sh wraps torchrun):
    torchrun --nproc_per_node=4 train.py --data_dir /data/place_shoe --out_dir out/shoe
Continue the newest checkpoint exactly where it stopped:
    torchrun --nproc_per_node=4 train.py --data_dir /data/place_shoe --out_dir out/shoe --resume auto

Exit codes: 0 done (or nothing left to do); 1 an error, said in one line; 65 a data file failed mid-run (the last
finished step is saved); 75 stopped by SIGTERM/SIGUSR1 (--preempt_signals: the step is finished and saved, or at
once in start-up); 130 Ctrl-C.

main() reads as a table of contents: the flags, the checkpoint to resume, the out_dir lock, the process group, the
data (checked whole before any weight loads), the model, the optimizer and the resumed state, the run record
(args.json), then the loop: lr, micro-batches, forward/backward, the ranks' agreement on loss and stopping, the
optimizer step, logging, evaluation, saving. Everything that keeps a long run safe (signals, a data file failing,
one run per out_dir, ranks exiting together) is a named function below it.
"""

import argparse
import datetime
import fcntl
import functools
import glob
import json
import math
import os
import shutil
import signal
import socket
import sys
import time
from collections import namedtuple
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import model

# -----------------------------------------------------------------------------
# flags


def add_data_flags(p):
    p.add_argument("--vla_path", default="openvla/openvla-7b", help="hub id or local OpenVLA checkpoint directory")
    p.add_argument("--data_dir", required=True, help="directory of episode_*.hdf5 files")
    p.add_argument("--val_data_dir", help="held-out episodes; default: --val_episodes taken out of --data_dir")
    p.add_argument("--val_episodes", type=int, default=2, help="episodes held out of --data_dir for validation")
    p.add_argument("--out_dir", default="out/run")
    p.add_argument(
        "--cameras",
        default=",".join(data.DEFAULT_CAMERAS),
        help="camera datasets, comma-separated, in model order (e.g. observations/images/top; "
        "`python check_data.py DIR` prints the flags for its layout)",
    )
    p.add_argument("--action_key", default="action", help="the action dataset (LIBERO's: actions)")
    p.add_argument("--state_key", help=data.STATE_KEY_HELP)
    p.add_argument(
        "--instruction",
        help="the instruction of episodes that carry none (ACT, teleoperation data); "
        "recorded in the checkpoint, Policy's default",
    )
    p.add_argument("--chunk", type=int, default=8, help="actions predicted per forward pass")
    p.add_argument("--action_dim", type=int, default=14)
    p.add_argument("--action_offset", type=int, default=0, help=data.ACTION_OFFSET_HELP)
    p.add_argument("--norm", choices=["bounds", "q99"], default="bounds", help="bounds: min/max, never clips joints")
    p.add_argument(
        "--swap_red_blue",
        action="store_true",
        help="reverse the channels of every frame read (RoboTwin's OFT-converted files hold BGR)",
    )
    p.add_argument("--num_workers", type=int, default=4, help="data loader processes per rank")


def add_model_flags(p):
    p.add_argument("--lora_rank", type=int, default=32)
    p.add_argument(
        "--attention",
        choices=model.ATTENTION,
        default="causal",
        help="causal: stock Llama; full: every token sees every token, as OpenVLA-OFT's patched Llama",
    )
    p.add_argument(
        "--proprio",
        action="store_true",
        help="feed the state at frame t (the file's `state`, else action[t]) as one token after the image "
        "patches, as OFT; pair with --action_offset 1 on RoboTwin",
    )
    p.add_argument(
        "--film",
        action="store_true",
        help="OFT+'s FiLM: the mean embedding of the prompt scales and shifts the features in every block of "
        "both vision towers (new layers, trained fully)",
    )
    p.add_argument(
        "--image_aug",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="OFT's random crop and colour jitter in training, its centre crop in evaluation/deployment",
    )
    p.add_argument(
        "--grad_ckpt",
        nargs="?",
        const="on",
        default="off",
        choices=["on", "off"],
        help="recompute LLM and ViT activations in backward: less memory, ~30%% slower (whether a GPU needs it: "
        "python bench.py --what memory)",
    )
    p.add_argument("--no-grad_ckpt", dest="grad_ckpt", action="store_const", const="off")
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="torch.compile the training forward (minutes of compilation first; faster steps after); "
        "--no-compile undoes a recipe's --compile",
    )
    p.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help="frozen base weights and autocast; auto: bfloat16 on CUDA, float32 on CPU",
    )


def add_optimizer_flags(p):
    p.add_argument("--batch_size", type=int, default=8, help="per GPU / process")
    p.add_argument("--grad_accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--lr_decay_step", type=int, default=40000, help="the lr is multiplied by --lr_decay_factor here")
    p.add_argument("--lr_decay_factor", type=float, default=0.1)
    p.add_argument("--weight_decay", type=float, default=0.01)
    p.add_argument("--max_steps", type=int, default=50000)
    p.add_argument("--seed", type=int, default=7)


def add_run_flags(p):
    p.add_argument("--save_interval", type=int, default=5000)
    p.add_argument("--keep_last", type=int, default=0, help="keep only the newest N checkpoints (0: keep all)")
    p.add_argument("--eval_interval", type=int, default=1000)
    p.add_argument("--eval_batches", type=int, default=8, help="validation batches per evaluation (fixed samples)")
    p.add_argument("--log_interval", type=int, default=10)
    p.add_argument(
        "--log",
        choices=["none", "tensorboard", "wandb"],
        default="none",
        help="also log to TensorBoard (OUT_DIR/tensorboard) or Weights & Biases (offline without a network); "
        "pip install -r requirements-log.txt. metrics.jsonl is written either way",
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--resume", help="a checkpoint directory, or 'auto' for the newest one in --out_dir")
    p.add_argument("--dist_timeout", type=float, default=10, help="minutes a rank waits for the others (gloo: 30)")
    p.add_argument(
        "--preempt_signals",
        default="SIGTERM,SIGUSR1",
        help="on these, finish the step, save and exit with code 75 (SLURM sends SIGTERM before it preempts or "
        "requeues a job); '' to disable",
    )


# flags that must be positive, and flags that may also be 0
POSITIVE = ["chunk", "action_dim", "batch_size", "grad_accum", "max_steps", "save_interval", "eval_interval"]
POSITIVE += ["eval_batches", "log_interval", "lora_rank", "dist_timeout"]
NOT_NEGATIVE = ["action_offset", "val_episodes", "keep_last", "num_workers"]


def get_args(argv=None):
    """The flags as typed, checked; nothing here is rewritten later (args.json adds what the run resolved)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_flags(p.add_argument_group("data"))
    add_model_flags(p.add_argument_group("model"))
    add_optimizer_flags(p.add_argument_group("optimization"))
    add_run_flags(p.add_argument_group("run"))
    args = p.parse_args(argv)
    for name in POSITIVE + NOT_NEGATIVE:
        value = getattr(args, name)
        if name in POSITIVE and value <= 0:
            p.error(f"--{name} must be positive, got {value}")
        if value < 0:
            p.error(f"--{name} must be >= 0, got {value}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        p.error(f"--lr must be a finite positive number, got {args.lr}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA device is visible to torch {torch.__version__}")
    check_vla_path(p, args.vla_path)
    for name in preempt_signals(args):
        if name not in signal.Signals.__members__ or name in ("SIGKILL", "SIGSTOP"):
            p.error(f"--preempt_signals: {name} is not a signal a process can catch (e.g. SIGTERM,SIGUSR1)")
    if args.instruction is not None and not args.instruction.strip():
        p.error("--instruction: give the text of the task, not a blank")
    return args


def check_vla_path(p, vla_path):
    """A local directory must hold a checkpoint; a hub id is only resolved when the model loads."""
    path = os.path.expanduser(vla_path)
    if os.path.isdir(path):
        wanted = ("config.json", "tokenizer.json", "model*.safetensors")
        missing = [f for f in wanted if not glob.glob(os.path.join(path, f))]
        if missing:
            p.error(f"--vla_path {path}: no {', '.join(missing)} there (expected an OpenVLA checkpoint directory)")
    elif not model.is_hub_id(path):
        p.error(f"--vla_path {path}: no such directory, and not a Hugging Face Hub id")


def preempt_signals(args):
    return [name for name in args.preempt_signals.split(",") if name]


def log(*args, **kwargs):
    """print on rank 0 only (the one process without torchrun): a message once per job, not once per rank."""
    if os.environ.get("RANK", "0") == "0":
        print(*args, **kwargs)


# -----------------------------------------------------------------------------
# the checkpoint to resume

# they change shapes or the data: a resumed run keeps the checkpoint's
SAME_ON_RESUME = ["chunk", "action_dim", "lora_rank", "cameras", "proprio", "attention", "action_offset", "norm"]
SAME_ON_RESUME += ["swap_red_blue", "image_aug", "action_key", "state_key", "instruction", "film"]
# they may change, with a note saying what that does
NOTED_ON_RESUME = {
    "batch_size": "the data order will differ",
    "grad_accum": "the global batch changes",
    "seed": "its validation split is kept",
    "val_episodes": "its validation split is kept",
    "val_data_dir": "its validation split is kept",
}
# dir: the checkpoint; state: its trainer_state.pt; args: its args.json
Resume = namedtuple("Resume", "dir state args")


def checkpoints(out_dir):
    """(step, dir) of out_dir's checkpoints, oldest first by number; a copy step_000004_v2 or a step_000005.tmp is
    none."""
    names = os.listdir(out_dir) if os.path.isdir(out_dir) else []
    steps = [(int(d[5:]), os.path.join(out_dir, d)) for d in names if d[:5] == "step_" and d[5:].isdecimal()]
    return sorted(steps)


def find_resume(args):
    """The checkpoint to resume from, checked whole (None for a fresh run). Refuses to write over checkpoints: an
    earlier run's, or newer ones than the checkpoint resumed."""
    done = checkpoints(args.out_dir)
    if args.resume is None and done:
        sys.exit(f"error: --out_dir {args.out_dir} already holds checkpoints: pass --resume auto, or a new --out_dir")
    if args.resume is None or (args.resume == "auto" and not done):
        return None
    resume = first_usable_checkpoint(args, done)
    newer = [d for step, d in done if step > resume.state["step"]]
    # auto passed over broken ones only: those may be written over
    if newer and args.resume != "auto":
        sys.exit(
            f"error: --resume {resume.dir} would write over the newer {', '.join(map(os.path.basename, newer))} in "
            f"--out_dir {args.out_dir}: pass a new --out_dir"
        )
    check_resumed_flags(args, resume)
    if resume.state["step"] >= args.max_steps:
        step = resume.state["step"]
        log(f"{resume.dir} is at step {step} of --max_steps {args.max_steps}: the run is finished, nothing to do")
        sys.exit(0)
    return resume


def first_usable_checkpoint(args, done):
    """--resume DIR, or with auto the newest checkpoint that reads whole (a note for each one passed over)."""
    candidates = [d for _, d in reversed(done)] if args.resume == "auto" else [args.resume]
    for ckpt in candidates:
        try:
            saved = model.check_checkpoint(ckpt)
            state = model.read_trainer_state(ckpt)
            # LoRA and head of another base would load without a complaint
            model.check_base(ckpt, args.vla_path)
            return Resume(ckpt, state, saved)
        # RuntimeError: a hub base that does not download
        except (OSError, ValueError, RuntimeError) as e:
            if args.resume != "auto":
                sys.exit(f"error: --resume {ckpt}: {e}")
            log(f"note: --resume auto skips {ckpt}: {e}")
    sys.exit(f"error: --resume auto: no usable checkpoint in --out_dir {args.out_dir} (see the notes above)")


def check_resumed_flags(args, resume):
    """Flags that change shapes or the data must be the checkpoint's; others may change, with a note."""
    for name in SAME_ON_RESUME + list(NOTED_ON_RESUME):
        typed = getattr(args, name)
        if name == "state_key" and typed is None:
            # the checkpoint records what the default resolved to
            continue
        saved = resume.args.get(name, typed)
        if saved == typed:
            continue
        was = f"{resume.dir} was trained with --{name} {saved}, not {typed}: "
        if name in SAME_ON_RESUME:
            sys.exit(f"error: {was}resume with the same --{name}, or train anew in a new --out_dir")
        log(f"note: {was}{NOTED_ON_RESUME[name]}")


# -----------------------------------------------------------------------------
# the process in the job


class Process:
    """Where this process runs: its rank among `world` ranks (1 without torchrun), its device, the dtype of the
    frozen weights with the autocast that goes with it, and the launcher that must outlive it."""

    def __init__(self, args):
        self.ddp = int(os.environ.get("RANK", -1)) != -1
        self.use_cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
        self.rank, self.local_rank, self.world = 0, 0, 1
        if self.ddp:
            backend = "nccl" if self.use_cuda else "gloo"
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=args.dist_timeout))
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
            self.local_rank = int(os.environ["LOCAL_RANK"])
        self.master = self.rank == 0
        self.device = torch.device(f"cuda:{self.local_rank}" if self.use_cuda else "cpu")
        if self.use_cuda:
            torch.cuda.set_device(self.device)
            torch.backends.cuda.matmul.allow_tf32 = True
        torch.manual_seed(args.seed + self.rank)
        bf16 = args.dtype == "bfloat16" or (args.dtype == "auto" and self.use_cuda)
        self.dtype = torch.bfloat16 if bf16 else torch.float32
        self.autocast = torch.autocast(self.device.type, dtype=self.dtype) if bf16 else nullcontext()
        # torchrun's process: if it dies, nothing supervises or restarts this rank
        self.launcher = os.getppid()


def lock_out_dir(args):
    """One run per --out_dir (a second would write over the first's saves), and a run that cannot save fails now.
    Returns the open lock file: the lock lasts as long as it stays open, and the kernel drops it when the process
    ends, killed or not."""
    try:
        os.makedirs(args.out_dir, exist_ok=True)
        lock = open(os.path.join(args.out_dir, ".lock"), "a")
        if os.environ.get("RANK", "0") == "0":
            # held by another process: EAGAIN on Linux, over NFS too
            fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        sys.exit(
            f"error: --out_dir {args.out_dir} is in use by another run (it holds {lock.name}): wait for it "
            "to end, or pass another --out_dir"
        )
    except OSError as e:
        sys.exit(f"error: --out_dir {args.out_dir} is not writable: {e}")
    return lock


# -----------------------------------------------------------------------------
# data


def load_data(args, resume, proc):
    """The training and validation sets, every episode checked before the model loads; a resumed run keeps its
    checkpoint's split and statistics. -> (train_set, val_set or None, {file name: size})."""
    cameras = args.cameras.split(",")
    state_key = args.state_key or (resume.args.get("state_key") if resume else None)
    keys = dict(action_key=args.action_key, state_key=state_key, instruction=args.instruction)
    try:
        # only episodes that give samples may be held out: a too-short validation episode would leave none
        paths = data.check_episodes(
            data.list_episodes(args.data_dir), cameras, args.chunk, args.action_dim, args.action_offset, **keys
        )
        train_paths, val_paths = split_episodes(args, paths, resume)
        common = dict(
            cameras=cameras,
            chunk=args.chunk,
            action_dim=args.action_dim,
            norm=args.norm,
            action_offset=args.action_offset,
            proprio=args.proprio,
            swap_red_blue=args.swap_red_blue,
            **keys,
        )
        stats = resumed_stats(resume, args.proprio)
        train_set = data.EpisodeDataset(train_paths, seed=args.seed, image_aug=args.image_aug, **stats, **common)
        stats = dict(stats=train_set.stats, proprio_stats=train_set.proprio_stats)
        val_set = None
        if val_paths:
            val_set = data.EpisodeDataset(val_paths, instruction_variant=0, **stats, **common)
        # every prompt must fit the LLM: its tokenizer tells, no weights needed
        sets = [s for s in (train_set, val_set) if s is not None]
        paths_of_sets = [p for s in sets for p in s.paths]
        texts = [t for s in sets for t in s.instructions]
        data.check_prompts(paths_of_sets, texts, args.vla_path, len(cameras), args.proprio, args.chunk)
    except data.DataError as e:
        sys.exit(f"error: {e}")
    # what this run trains on, so that a resume can say what changed
    files = {os.path.basename(p): os.path.getsize(data.split_ref(p)[0]) for p in paths}
    check_ranks_read_the_same_files(args, files, proc)
    note_changed_files(args, files, resume)
    if not epoch_batches(len(train_set), args, 0, proc.world, 0):
        sys.exit(
            f"error: {len(train_set)} training samples cannot fill one batch of --batch_size {args.batch_size} "
            f"on each of {proc.world} ranks"
        )
    return train_set, val_set, files


def split_episodes(args, paths, resume):
    """(training, validation) episodes: --val_data_dir's, else the checkpoint's split when resuming (its validation
    episodes never train, whichever files came or went), else --val_episodes held out by --seed."""
    val_data_dir = resume.args.get("val_data_dir") if resume else args.val_data_dir
    if val_data_dir:
        val_paths = data.list_episodes(val_data_dir)
        shared = set(map(os.path.realpath, paths)) & set(map(os.path.realpath, val_paths))
        if shared:
            raise data.DataError(
                f"--val_data_dir {val_data_dir} holds {len(shared)} of --data_dir's files "
                f"(e.g. {min(shared)}): it would validate on training data"
            )
        return paths, val_paths
    if resume:
        held = {os.path.basename(p) for p in resume.args.get("val_episode_files", [])}
        train = [p for p in paths if os.path.basename(p) not in held]
        return train, [p for p in paths if os.path.basename(p) in held]
    return data.split_episodes(paths, args.val_episodes, args.seed)


def resumed_stats(resume, proprio):
    """The checkpoint's normalization statistics (None: a fresh run computes them from its training episodes)."""
    if resume is None:
        return dict(stats=None, proprio_stats=None)
    path = os.path.join(resume.dir, "dataset_statistics.json")
    proprio_stats = data.load_stats(path, key="proprio") if proprio else None
    return dict(stats=data.load_stats(path), proprio_stats=proprio_stats)


def check_ranks_read_the_same_files(args, files, proc):
    """Node-local copies that differ would give each rank its own split, statistics and data order."""
    if not proc.ddp:
        return
    everyone = [None] * proc.world
    dist.all_gather_object(everyone, files)
    differ = [r for r, f in enumerate(everyone) if f != everyone[0]]
    if differ and proc.master:
        sys.exit(f"error: --data_dir {args.data_dir}: ranks {differ} hold other files than rank 0")
    if differ:
        sys.exit(1)


def note_changed_files(args, now, resume):
    """The split was kept; the saved data position now points into another set of files: say so."""
    was = resume.args.get("data_files", now) if resume else now
    if was == now:
        return
    resized = sorted(n for n in now.keys() & was if now[n] != was[n])
    log(
        f"note: --data_dir {args.data_dir} changed since {resume.dir}: added {sorted(now.keys() - was)}, removed "
        f"{sorted(was.keys() - now)}, resized {resized}; its validation episodes stay out of training"
    )


def epoch_batches(n, args, rank, world, epoch):
    """This rank's batches for one epoch: one seeded shuffle shared by all ranks, each rank taking its own slice."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed * 1000 + epoch)).tolist()
    # equal step counts keep the ranks in lockstep
    per_rank = n // world // args.batch_size * args.batch_size
    mine = order[rank * per_rank : (rank + 1) * per_rank]
    return [mine[i : i + args.batch_size] for i in range(0, per_rank, args.batch_size)]


def ignore_sigterm(worker_id):
    """A cluster signals data workers too: torch's handler would kill them, and the rank with them."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def batch_stream(dataset, args, proc, epoch, pos):
    """Endless micro-batches with their (epoch, position) so a resumed run continues with the next unseen one."""
    while True:
        dataset.set_epoch(epoch)
        batches = epoch_batches(len(dataset), args, proc.rank, proc.world, epoch)[pos:]
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=batches,
            num_workers=args.num_workers,
            pin_memory=proc.use_cuda,
            worker_init_fn=ignore_sigterm,
        )
        for batch in loader:
            pos += 1
            yield epoch, pos, batch
        epoch, pos = epoch + 1, 0


# -----------------------------------------------------------------------------
# the model, its optimizer and the run record


def build_model(args, train_set, proc):
    """The base with LoRA and a fresh head, in the dtype of the process."""
    vla = model.VLA.from_pretrained(
        args.vla_path,
        dtype=proc.dtype,
        device=proc.device,
        chunk=args.chunk,
        action_dim=args.action_dim,
        proprio_dim=train_set.proprio_dim,
        attention=args.attention,
        image_aug=args.image_aug,
        film=args.film,
    )
    model.add_lora(vla, rank=args.lora_rank)
    if args.grad_ckpt == "on":
        model.enable_grad_ckpt(vla)
    trainable = sum(p.numel() for p in vla.parameters() if p.requires_grad)
    log(f"parameters: {sum(p.numel() for p in vla.parameters()):,}, of which {trainable:,} train")
    return vla


def restore(vla, opt, resume, proc):
    """Loads the checkpoint's weights in place (the optimizer holds the same parameters), its optimizer state and
    this rank's RNG. -> (step, epoch, position in the epoch) to continue from; zeros for a fresh run."""
    if resume is None:
        return 0, 0, 0
    state = resume.state
    model.load_trained(vla, resume.dir)
    opt.load_state_dict(state["optimizer"])
    # the global position in the epoch is kept when the world size changes
    pos = state["pos"] * state["world_size"] // proc.world
    if state["world_size"] == proc.world:
        torch.set_rng_state(state["rng"][proc.rank]["cpu"])
        if proc.use_cuda and state["rng"][proc.rank]["cuda"] is not None:
            torch.cuda.set_rng_state(state["rng"][proc.rank]["cuda"])
    else:
        log(f"note: resuming on {proc.world} ranks a run saved on {state['world_size']}: data order will differ")
    log(f"resumed from {resume.dir} at step {state['step']}")
    return state["step"], state["epoch"], pos


def run_record(args, resume, train_set, val_set, files, proc):
    """args.json, written once into every checkpoint: the flags as typed, then what the run resolved from them."""
    record = vars(args) | {
        # by an absolute path, so that args.json names the base from any working directory
        "vla_path": os.path.abspath(args.vla_path) if os.path.isdir(args.vla_path) else args.vla_path,
        # what --state_key's default resolved to, for deployment
        "state_key": train_set.state_key,
        "data_files": files,
        # so that infer.py can be pointed at episodes never trained on
        "val_episode_files": val_set.paths if val_set else [],
        # so that deployment brings live frames to the training frames' size
        "frame_sizes": train_set.frame_sizes,
        # what the episodes' files say about how they were made (a simulator's scene, the seeds)
        "episode_attrs": train_set.attrs,
        "world_size": proc.world,
    }
    if resume:
        # the checkpoint's split is kept
        record |= {k: resume.args.get(k) for k in ("val_episodes", "val_data_dir")}
    return record


def show_run(record, train_set, val_set, args, proc):
    global_batch = args.batch_size * args.grad_accum * proc.world
    # data_files is one line per episode: args.json holds it
    shown = {k: v for k, v in record.items() if k != "data_files"}
    log(json.dumps(shown, indent=1))
    val = len(val_set.paths) if val_set else 0
    log(
        f"train: {len(train_set.paths)} episodes, {len(train_set)} samples | val: {val} episodes | "
        f"global batch {global_batch} = {args.batch_size} x {args.grad_accum} accum x {proc.world} ranks"
    )
    return global_batch


def wrap(vla, args, proc):
    """The module the loop calls: vla, under torchrun in DDP (which syncs only what trains), with --compile
    compiled; its weights stay vla's, which evaluation and saving use."""
    module = vla
    if proc.ddp:
        frozen = [n for n, p in vla.named_parameters() if not p.requires_grad] + [n for n, _ in vla.named_buffers()]
        DDP._set_params_and_buffers_to_ignore_for_model(vla, frozen)
        module = DDP(vla, device_ids=[proc.local_rank] if proc.use_cuda else None)
    if args.compile:
        module = torch.compile(module)
    return module


# -----------------------------------------------------------------------------
# the training step


def get_lr(step, args):
    if step >= args.lr_decay_step:
        return args.lr * args.lr_decay_factor
    return args.lr


def next_micro_batches(stream, args, proc):
    """The step's micro-batches, or None on every rank when a data file failed on any: each rank reads all of its
    micro-batches first, so that a rank whose file fails never leaves the others waiting in DDP's backward."""
    try:
        batches = [next(stream) for _ in range(args.grad_accum)]
        failed = torch.zeros((), device=proc.device)
    except data.DataError as e:
        print(f"error: {data_error_line(e)}", file=sys.stderr, flush=True)
        batches, failed = None, torch.ones((), device=proc.device)
    if proc.ddp:
        dist.all_reduce(failed)
    return None if failed.item() else batches


def data_error_line(e):
    """A DataError's own line: from a loader worker, torch wraps it in a traceback that ends with it."""
    return str(e).strip().splitlines()[-1].split("DataError: ")[-1]


def l1_terms(pred, target):
    """Loss, current-step L1 and future-steps L1, as OpenVLA-OFT reports them."""
    err = (pred.float() - target).abs()
    return err.mean(), err[:, 0].mean(), err[:, 1:].mean()


def forward_backward(train_vla, micro_batches, args, proc):
    """Gradients of the step's micro-batches (DDP syncs on the last one only). -> (terms, the data position after
    them): terms holds the loss, current and future L1 averaged over micro-batches, and a 0 for the stop vote."""
    terms = torch.zeros(4, device=proc.device)
    for micro, (epoch, pos, batch) in enumerate(micro_batches):
        last = micro == args.grad_accum - 1
        sync = train_vla.no_sync() if proc.ddp and not last else nullcontext()
        with sync:
            with proc.autocast:
                # images (B, cameras, 3, H, W) uint8 -> pred (B, chunk, action_dim)
                pred = train_vla(
                    batch["images"].to(proc.device, non_blocking=True),
                    batch["instruction"],
                    batch.get("state"),
                    batch.get("aug"),
                )
            loss, curr, future = l1_terms(pred, batch["actions"].to(proc.device, non_blocking=True))
            (loss / args.grad_accum).backward()
        terms[:3] += torch.stack([loss, curr, future]).detach() / args.grad_accum
    return terms, (epoch, pos)


def agree_on_step(terms, stop, proc):
    """One all-reduce gives every rank the mean loss terms and whether any rank must stop after this step, so all
    stop after the same one. -> (loss, curr, future, stopping)."""
    if proc.ddp and os.getppid() != proc.launcher:
        stop.setdefault("why", "the launcher exited")
    terms[3] = float(bool(stop))
    if proc.ddp:
        dist.all_reduce(terms)
        terms[:3] /= proc.world
    loss, curr, future, stopping = terms.tolist()
    return loss, curr, future, stopping > 0


@torch.no_grad()
def evaluate(vla, val_set, stats, args, proc):
    """L1 on a fixed, evenly spaced set of validation samples, sharded over ranks, against a mean-action baseline."""
    vla.eval()
    n = min(len(val_set), args.eval_batches * args.batch_size)
    picks = torch.linspace(0, len(val_set) - 1, n).round().long().tolist()[proc.rank :: proc.world]
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(val_set, picks),
        batch_size=args.batch_size,
        num_workers=min(args.num_workers, 2),
        worker_init_fn=ignore_sigterm,
    )
    mean = torch.tensor(data.normalize(stats["mean"], stats, args.norm), dtype=torch.float32, device=proc.device)
    # sums of: curr, future, raw, baseline, count
    sums = torch.zeros(5, dtype=torch.float64, device=proc.device)
    for batch in loader:
        with proc.autocast:
            pred = vla(batch["images"].to(proc.device), batch["instruction"], batch.get("state")).float()
        target = batch["actions"].to(proc.device)
        err = (pred - target).abs()
        # in the data's own units
        raw = [data.unnormalize(x.cpu().numpy(), stats, args.norm) for x in (pred, target)]
        raw = torch.tensor(np.abs(raw[0] - raw[1]).mean(), device=proc.device)
        b = len(target)
        row = [err[:, 0].mean(), err[:, 1:].mean(), raw, (mean - target).abs().mean()]
        sums += torch.stack([x * b for x in row] + [torch.tensor(b, device=proc.device)]).double()
    if proc.world > 1:
        dist.all_reduce(sums)
    curr, future, raw, baseline = (sums[:4] / sums[4]).tolist()
    vla.train()
    return {
        "val_l1": (curr + (args.chunk - 1) * future) / args.chunk,
        "val_curr_l1": curr,
        "val_future_l1": future,
        "val_l1_raw": raw,
        "val_l1_baseline": baseline,
    }


def check_ranks_agree(trainable, world):
    """DDP must keep every rank's trainable weights identical; a silent divergence would waste the whole run."""
    sums = torch.stack([p.detach().double().sum() for p in trainable]).cpu()
    everyone = [None] * world
    dist.all_gather_object(everyone, sums)
    if not all(torch.equal(s, sums) for s in everyone):
        raise RuntimeError("trainable weights differ between ranks")
    return f"trainable weights identical on all {world} ranks"


# -----------------------------------------------------------------------------
# logging and saving


class Metrics:
    """metrics.jsonl, the record of a run's numbers, one JSON row per log line (rank 0 writes it). A resumed run
    logs the steps after its checkpoint again: their old rows are dropped first, so each step appears once."""

    def __init__(self, out_dir, resumed_step, proc, run):
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.file, self.tracker = None, None
        if not proc.master:
            return
        if resumed_step is not None and os.path.exists(self.path):
            self.keep_until(resumed_step)
        self.file = open(self.path, "a")
        if run["log"] != "none":
            self.tracker = open_tracker(run["log"], out_dir, run)

    def keep_until(self, step):
        with open(self.path) as f:
            rows = [(row, metrics_step(row)) for row in f]
        bad = [i + 1 for i, (_, s) in enumerate(rows) if s is None]
        if bad:
            log(f"note: {self.path}: dropping unreadable lines {bad}")
        with open(self.path, "w") as f:
            f.writelines(row for row, s in rows if s is not None and s <= step)

    def write(self, row, line):
        log(line, flush=True)
        if self.file:
            print(json.dumps(row), file=self.file, flush=True)
        if self.tracker:
            self.tracker(row)


def open_tracker(kind, out_dir, run):
    """A function that logs a metrics row to TensorBoard or W&B, the run record as its config. The package is
    imported only here, when asked. W&B runs offline when its server is out of reach, and says how to sync."""
    if kind == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(os.path.join(out_dir, "tensorboard"))
        writer.add_text("args", json.dumps(run, indent=1))

        def to_tensorboard(row):
            for name, value in row.items():
                writer.add_scalar(name, value, row["step"])
            writer.flush()

        return to_tensorboard
    import wandb

    mode = os.environ.get("WANDB_MODE") or ("online" if reachable("api.wandb.ai") else "offline")
    wandb_run = wandb.init(dir=out_dir, config=run, mode=mode)
    if mode == "offline":
        log(f"W&B is offline: sync later with: wandb sync {wandb_run.dir}/..")
    return lambda row: wandb_run.log(row, step=row["step"])


def reachable(host):
    """Whether host:443 answers within 3 seconds."""
    try:
        socket.create_connection((host, 443), timeout=3).close()
        return True
    except OSError:
        return False


def metrics_step(row):
    """The step of a metrics.jsonl row; None for the half-written last row a kill -9 leaves (no newline) or a
    garbage one, which must not stop a resume."""
    if not row.endswith("\n"):
        return None
    try:
        return int(json.loads(row)["step"])
    except (ValueError, KeyError, TypeError):
        return None


class StepClock:
    """Seconds a step since the last log line, with evaluation and saving left out (they would inflate the eta)."""

    def __init__(self):
        self.start, self.steps = time.time(), 0

    def read(self):
        dt = (time.time() - self.start) / self.steps
        self.start, self.steps = time.time(), 0
        return dt

    def exclude(self, since):
        self.start += time.time() - since


def log_step(metrics, step, loss, curr, future, lr, dt, global_batch, args):
    eta = dt * (args.max_steps - step)
    metrics.write(
        {"step": step, "loss": loss, "curr_l1": curr, "future_l1": future, "lr": lr, "ms": dt * 1000},
        f"step {step}/{args.max_steps} | loss {loss:.4f} | curr l1 {curr:.4f} | future l1 {future:.4f} | "
        f"lr {lr:.2e} | {dt * 1000:.0f} ms | {global_batch / dt:.1f} samples/s | "
        f"eta {int(eta // 3600)}h{int(eta % 3600 // 60):02d}m",
    )


def stats_record(train_set):
    """What dataset_statistics.json holds: the normalization statistics and how much data made them."""
    return dict(
        action_stats=train_set.stats,
        proprio_stats=train_set.proprio_stats,
        num_transitions=sum(train_set.lengths),
        num_trajectories=len(train_set.paths),
    )


def save_checkpoint(vla, opt, stats, run, proc, step, position):
    """Rank 0 writes step_NNNNNN.tmp and renames it once whole, so a crash never leaves a checkpoint that looks
    done; every rank's RNG state goes in, so that a resume on as many ranks continues exactly."""
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    rngs = [rng] * proc.world
    if proc.world > 1:
        dist.all_gather_object(rngs, rng)
    if not proc.master:
        return
    state = {"step": step, "optimizer": opt.state_dict(), "epoch": position[0], "pos": position[1]}
    state |= {"world_size": proc.world, "rng": rngs}
    final = os.path.join(run["out_dir"], f"step_{step:06d}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.write_checkpoint(tmp, vla, stats, run, state)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    # a full disk: OSError, safetensors' SafetensorError, a RuntimeError from torch.save
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        sys.exit(
            f"error: could not save {final} ({type(e).__name__}: {e}; disk full?); removed {tmp}, the earlier "
            "checkpoints are untouched"
        )
    if run["keep_last"]:
        # never this one; newer ones are broken ones --resume auto passed over: this run rewrites them
        older = [d for s, d in checkpoints(run["out_dir"]) if s < step]
        for old in older[: max(0, len(older) + 1 - run["keep_last"])]:
            shutil.rmtree(old)
    print(f"saved {final}", flush=True)


# -----------------------------------------------------------------------------
# stopping: signals, bad data, the end


def exit_in_startup(sig, frame):
    """Start-up has nothing to save, and a cluster's grace period would not wait for a first step."""
    print(f"stopped in start-up ({signal.Signals(sig).name}): run the same command to start again", file=sys.stderr)
    sys.exit(75)


def on_preempt_signals(args, handler):
    for name in preempt_signals(args):
        signal.signal(signal.Signals[name], handler)


def watch_for_preemption(args):
    """From here on --preempt_signals only ask for a stop after the current step: -> the dict that says why."""
    stop = {}

    def ask_to_stop(sig, frame):
        stop.setdefault("why", signal.Signals(sig).name)

    on_preempt_signals(args, ask_to_stop)
    return stop


def stop_for_bad_data(save, position, step, start_step, args, proc):
    """Exit 65 (EX_DATAERR) when a data file failed: the last finished step is saved first (unless it just was)."""
    last = step - 1
    if last > start_step and last % args.save_interval:
        save(last, position)
    # a rank that exits first gets the others killed, rank 0 perhaps while it saves
    if proc.ddp:
        dist.barrier()
    log(f"stopped before step {step}: fix or remove the episode named above, then --resume auto", flush=True)
    sys.exit(65)


def check_finite(loss, step, args):
    if not math.isfinite(loss):
        sys.exit(
            f"error: loss is {loss} at step {step}; stopping without saving this state "
            f"(last good checkpoint, if any, is in {args.out_dir})"
        )


def finish(step, stopping, stop, args, proc):
    """No rank may tear gloo down while another's last collective is in flight: that aborts or hangs at exit.
    A run stopped before --max_steps exits 75, which tells a scheduler to requeue it."""
    if proc.ddp:
        dist.barrier()
    if stopping and step < args.max_steps:
        why = stop.get("why", "asked by another rank")
        log(
            f"stopped after step {step} ({why}) and saved it: run the same command with --resume auto to continue",
            flush=True,
        )
        sys.exit(75)


def end_process(end):
    """Whatever way main() ended (end: None or the exception): data workers ignore SIGTERM, so exit's terminate-and-
    join of the ones an error left alive would never end: kill them. Under torchrun, an exit on purpose (no
    collective in flight) skips gloo's teardown, which holds the GIL waiting for gloo's thread while that thread
    waits for the GIL (a rank hung in 1 run of 75); a traceback leaves gloo to the interpreter's exit."""
    # torch's SIGCHLD handler would turn the workers' end into another error
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for worker in torch.multiprocessing.active_children():
        worker.kill()
    if not dist.is_initialized() or not isinstance(end, (SystemExit, type(None))):
        return
    code = end.code if isinstance(end, SystemExit) else 0
    if code is None:
        code = 0
    if not isinstance(code, int):
        # sys.exit("error: ..."): print the message as Python would, exit 1. One write: a piped stderr writes through,
        # and print's two writes (the text, then the newline) of ranks failing together interleave on the same line
        sys.stderr.write(f"{code}\n")
        code = 1
    sys.stdout.flush()
    os._exit(code)


# -----------------------------------------------------------------------------


def main(argv=None):
    # start-up: the flags, the checkpoint to continue, this run's claim on out_dir, the process in the job
    args = get_args(argv)
    on_preempt_signals(args, exit_in_startup)
    resume = find_resume(args)
    _lock = lock_out_dir(args)
    proc = Process(args)
    # the data (every episode checked before any weight loads), the model, the optimizer, the state resumed
    train_set, val_set, files = load_data(args, resume, proc)
    vla = build_model(args, train_set, proc)
    # fp32 even on a bf16 base: AdamW needs it
    trainable = [p for p in vla.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)
    start_step, epoch, pos = restore(vla, opt, resume, proc)
    # the run record (args.json), what saving, logging and the loop need
    run = run_record(args, resume, train_set, val_set, files, proc)
    global_batch = show_run(run, train_set, val_set, args, proc)
    save = functools.partial(save_checkpoint, vla, opt, stats_record(train_set), run, proc)
    train_vla = wrap(vla, args, proc)
    metrics = Metrics(args.out_dir, start_step if resume else None, proc, run)
    stream = batch_stream(train_set, args, proc, epoch, pos)
    position = (epoch, pos)
    stop = watch_for_preemption(args)
    clock = StepClock()
    vla.train()
    # the loop: lr, micro-batches, forward and backward, the ranks' agreement, the optimizer step; then, outside the
    # step time, logging, evaluation and saving
    for step in range(start_step + 1, args.max_steps + 1):
        lr = get_lr(step - 1, args)
        for group in opt.param_groups:
            group["lr"] = lr
        micro_batches = next_micro_batches(stream, args, proc)
        if micro_batches is None:
            stop_for_bad_data(save, position, step, start_step, args, proc)
        terms, next_position = forward_backward(train_vla, micro_batches, args, proc)
        loss, curr, future, stopping = agree_on_step(terms, stop, proc)
        check_finite(loss, step, args)
        opt.step()
        opt.zero_grad(set_to_none=True)
        position = next_position
        clock.steps += 1
        last = step == args.max_steps
        if step % args.log_interval == 0 or last:
            log_step(metrics, step, loss, curr, future, lr, clock.read(), global_batch, args)
        aside = time.time()
        if val_set is not None and (step % args.eval_interval == 0 or last):
            row = evaluate(vla, val_set, train_set.stats, args, proc)
            metrics.write(
                {"step": step} | row, f"eval step {step} | " + " | ".join(f"{k} {v:.4f}" for k, v in row.items())
            )
        if step % args.save_interval == 0 or last or stopping:
            if proc.ddp:
                log(check_ranks_agree(trainable, proc.world))
            save(step, position)
        if stopping:
            break
        clock.exclude(aside)
    finish(step, stopping, stop, args, proc)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        # torchrun passes the same Ctrl-C on once more
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print("interrupted: nothing saved since the last checkpoint", file=sys.stderr)
        sys.exit(130)
    except data.DataError as e:
        # a validation file failing mid-run; the checkpoints saved so far stand
        print(f"error: {data_error_line(e)} (in an evaluation)", file=sys.stderr)
        sys.exit(65)
    finally:
        end_process(sys.exc_info()[1])
