"""
Fine-tune OpenVLA with LoRA and an L1 action-chunk head on HDF5 robot episodes.

One process (CPU or one GPU):
    python train.py --vla_path out/tiny-openvla --data_dir out/demo_data --out_dir out/run
All GPUs of this machine (launch.sh wraps torchrun):
    torchrun --nproc_per_node=4 train.py --data_dir /data/place_shoe --out_dir out/shoe
Continue the newest checkpoint exactly where it stopped:
    torchrun --nproc_per_node=4 train.py --data_dir /data/place_shoe --out_dir out/shoe --resume auto
SIGTERM/SIGUSR1 (--preempt_signals): save after the step, exit 75 (at once in start-up); a data file failing: 65.
"""

import argparse
import datetime
import fcntl
import glob
import json
import math
import os
import shutil
import signal
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import model


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vla_path", default="openvla/openvla-7b", help="hub id or local OpenVLA checkpoint directory")
    p.add_argument("--data_dir", required=True, help="directory of episode_*.hdf5 files")
    p.add_argument("--val_data_dir", help="held-out episodes; default: --val_episodes taken out of --data_dir")
    p.add_argument("--val_episodes", type=int, default=2, help="episodes held out of --data_dir for validation")
    p.add_argument("--out_dir", default="out/run")
    p.add_argument(
        "--cameras",
        default=",".join(data.DEFAULT_CAMERAS),
        help="camera datasets, comma-separated, in "
        "model order (e.g. observations/images/top; `python data.py DIR` prints the flags for its layout)",
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
    p.add_argument("--batch_size", type=int, default=8, help="per GPU / process")
    p.add_argument("--grad_accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--lr_decay_step", type=int, default=40000, help="the lr is multiplied by --lr_decay_factor here")
    p.add_argument("--lr_decay_factor", type=float, default=0.1)
    p.add_argument("--warmup_steps", type=int, default=0)
    p.add_argument("--weight_decay", type=float, default=0.01)
    p.add_argument("--max_steps", type=int, default=50000)
    p.add_argument("--save_interval", type=int, default=5000)
    p.add_argument("--keep_last", type=int, default=0, help="keep only the newest N checkpoints (0: keep all)")
    p.add_argument("--eval_interval", type=int, default=1000)
    p.add_argument("--eval_batches", type=int, default=8, help="validation batches per evaluation (fixed samples)")
    p.add_argument("--log_interval", type=int, default=10)
    p.add_argument("--lora_rank", type=int, default=32)
    p.add_argument(
        "--attention",
        choices=model.ATTENTION,
        default="causal",
        help="causal: stock Llama; queries: the action queries also see each other; full: every token "
        "sees every token, as OpenVLA-OFT's patched Llama",
    )
    p.add_argument(
        "--proprio",
        action="store_true",
        help="feed the state at frame t (the file's `state`, else "
        "action[t]) as one token after the image patches, as OFT; pair with --action_offset 1 on RoboTwin",
    )
    p.add_argument(
        "--film",
        action="store_true",
        help="OFT+'s FiLM: the mean embedding of the prompt scales and "
        "shifts the features in every block of both vision towers (new layers, trained fully)",
    )
    p.add_argument(
        "--image_aug",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="OFT's random crop and colour jitter in training, its centre crop in evaluation/deployment",
    )
    p.add_argument(
        "--swap_red_blue",
        action="store_true",
        help="reverse the channels of every frame read (RoboTwin's OFT-converted files hold BGR)",
    )
    p.add_argument(
        "--grad_ckpt",
        nargs="?",
        const="on",
        default="off",
        choices=["on", "off", "auto"],
        help="recompute LLM and ViT activations in backward: less memory, ~30%% slower; auto: on when "
        "a step of the longest prompt runs out of GPU memory without it (off on CPU)",
    )
    p.add_argument("--no-grad_ckpt", dest="grad_ckpt", action="store_const", const="off")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--num_workers", type=int, default=4, help="data loader processes per rank")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help="frozen base weights and autocast; auto: bfloat16 on CUDA, float32 on CPU",
    )
    p.add_argument("--resume", help="a checkpoint directory, or 'auto' for the newest one in --out_dir")
    p.add_argument("--dist_timeout", type=float, default=10, help="minutes a rank waits for the others (gloo: 30)")
    p.add_argument(
        "--preempt_signals",
        default="SIGTERM,SIGUSR1",
        help="on these, finish the step, save and exit "
        "with code 75 (SLURM sends SIGTERM before it preempts or requeues a job); '' to disable",
    )
    args = p.parse_args(argv)
    positive = [
        "chunk",
        "action_dim",
        "batch_size",
        "grad_accum",
        "max_steps",
        "save_interval",
        "eval_interval",
        "eval_batches",
        "log_interval",
        "lora_rank",
        "dist_timeout",
    ]
    for name in positive + ["action_offset", "val_episodes", "warmup_steps", "keep_last", "num_workers"]:
        if getattr(args, name) < 0 or getattr(args, name) == 0 and name in positive:
            p.error(f"--{name} must be {'positive' if name in positive else '>= 0'}, got {getattr(args, name)}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        p.error(f"--lr must be a finite positive number, got {args.lr}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA device is visible to torch {torch.__version__}")
    path = os.path.expanduser(args.vla_path)
    if os.path.isdir(path):  # a hub id is only resolved when the model loads
        if missing := [
            f for f in ("config.json", "tokenizer.json", "model*.safetensors") if not glob.glob(os.path.join(path, f))
        ]:
            p.error(f"--vla_path {path}: no {', '.join(missing)} there (expected an OpenVLA checkpoint directory)")
        args.vla_path = os.path.abspath(path)  # args.json must name it from any working directory
    elif not model.is_hub_id(path):
        p.error(f"--vla_path {path}: no such directory, and not a Hugging Face Hub id")
    for name in filter(None, args.preempt_signals.split(",")):
        if name not in signal.Signals.__members__ or name in ("SIGKILL", "SIGSTOP"):
            p.error(f"--preempt_signals: {name} is not a signal a process can catch (e.g. SIGTERM,SIGUSR1)")
    if args.instruction is not None and not args.instruction.strip():
        p.error("--instruction: give the text of the task, not a blank")
    return args


CHECKPOINT_FILES = [
    "adapter_model.safetensors",
    "adapter_config.json",
    "action_head.safetensors",
    "dataset_statistics.json",
    "args.json",
    "trainer_state.pt",
]
# they change shapes or the data: a resumed run keeps the checkpoint's
SAME_ON_RESUME = [
    "chunk",
    "action_dim",
    "lora_rank",
    "cameras",
    "proprio",
    "attention",
    "action_offset",
    "norm",
    "swap_red_blue",
    "image_aug",
    "action_key",
    "state_key",
    "instruction",
    "film",
]


def read_checkpoint(ckpt):
    """Its args.json and trainer state, once every file has been opened (safetensors headers, JSON, the state):
    a bad checkpoint fails before the model loads, with an OSError or ValueError naming the file."""
    read = {}
    for f in CHECKPOINT_FILES[:-1]:  # in order: an empty directory is missing the adapter first
        path = os.path.join(ckpt, f)
        read[f] = model.read_json(path) if f.endswith(".json") else model.open_safetensors(path).keys()
    data.load_stats(os.path.join(ckpt, "dataset_statistics.json"))  # and it holds OpenVLA's norm_stats
    path = os.path.join(ckpt, CHECKPOINT_FILES[-1])
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # missing, empty or truncated: an OSError, EOFError, a zip or an unpickling error
        raise ValueError(f"unreadable {path}: {e}") from None
    return read["args.json"], state


def checkpoints(out_dir):  # (step, dir) oldest first by number; a copy step_000004_v2 or a step_000005.tmp is none
    names = os.listdir(out_dir) if os.path.isdir(out_dir) else []
    return sorted((int(d[5:]), os.path.join(out_dir, d)) for d in names if d[:5] == "step_" and d[5:].isdecimal())


def find_resume(args):
    """The checkpoint to resume from and its trainer state, checked whole ((None, None) for a fresh run). Refuses to
    write over checkpoints: an earlier run's, or newer ones than the checkpoint resumed."""
    note = print if os.environ.get("RANK", "0") == "0" else (lambda *a, **k: None)
    done = checkpoints(args.out_dir)
    if args.resume is None and done:
        sys.exit(f"error: --out_dir {args.out_dir} already holds checkpoints: pass --resume auto, or a new --out_dir")
    if args.resume is None or args.resume == "auto" and not done:
        return None, None
    for ckpt in [d for _, d in reversed(done)] if args.resume == "auto" else [args.resume]:
        try:
            saved, state = read_checkpoint(ckpt)
            model.check_base(ckpt, args.vla_path)  # LoRA and head of another base would load without a complaint
            break
        except (OSError, ValueError, RuntimeError) as e:  # RuntimeError: a hub base that does not download
            if args.resume != "auto":
                sys.exit(f"error: --resume {ckpt}: {e}")
            note(f"note: --resume auto skips {ckpt}: {e}")
    else:
        sys.exit(f"error: --resume auto: no usable checkpoint in --out_dir {args.out_dir} (see the notes above)")
    newer = [d for step, d in done if step > state["step"]]
    if newer and args.resume != "auto":  # auto passed over broken ones only: those may be written over
        sys.exit(
            f"error: --resume {ckpt} would write over the newer {', '.join(map(os.path.basename, newer))} in "
            f"--out_dir {args.out_dir}: pass a new --out_dir"
        )
    saved.setdefault("attention", "queries" if saved.get("bidirectional") else "causal")  # before --attention
    args.state_key = args.state_key or saved.get("state_key")  # the run recorded what auto resolved to
    why = {"batch_size": "the data order will differ", "grad_accum": "the global batch changes"}
    for name in SAME_ON_RESUME + ["batch_size", "grad_accum", "seed", "val_episodes", "val_data_dir"]:
        if saved.get(name, getattr(args, name)) != getattr(args, name):
            was = f"{ckpt} was trained with --{name} {saved[name]}, not {getattr(args, name)}: "
            if name in SAME_ON_RESUME:
                sys.exit(f"error: {was}resume with the same --{name}, or train anew in a new --out_dir")
            note(f"note: {was}{why.get(name, 'its validation split is kept')}")
    args.val_episodes, args.val_data_dir = (saved.get(k, getattr(args, k)) for k in ("val_episodes", "val_data_dir"))
    if state["step"] >= args.max_steps:
        note(f"{ckpt} is at step {state['step']} of --max_steps {args.max_steps}: the run is finished, nothing to do")
        sys.exit(0)
    return ckpt, state | {"args": saved}


def get_lr(step, args):
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    return args.lr * (args.lr_decay_factor if step >= args.lr_decay_step else 1.0)


def epoch_batches(n, args, rank, world, epoch):
    """This rank's batches for one epoch: one seeded shuffle shared by all ranks, each rank taking its own slice."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed * 1000 + epoch)).tolist()
    per_rank = n // world // args.batch_size * args.batch_size  # equal step counts keep the ranks in lockstep
    mine = order[rank * per_rank : (rank + 1) * per_rank]
    return [mine[i : i + args.batch_size] for i in range(0, per_rank, args.batch_size)]


def ignore_sigterm(worker_id):  # a cluster signals data workers too: torch's handler would kill them, and the rank
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def batch_stream(dataset, args, rank, world, epoch, pos, pin):
    """Endless micro-batches with their (epoch, position) so a resumed run continues with the next unseen one."""
    while True:
        dataset.set_epoch(epoch)
        batches = epoch_batches(len(dataset), args, rank, world, epoch)[pos:]
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=batches, num_workers=args.num_workers, pin_memory=pin, worker_init_fn=ignore_sigterm
        )
        for batch in loader:
            pos += 1
            yield epoch, pos, batch
        epoch, pos = epoch + 1, 0


def l1_terms(pred, target):
    """Loss, current-step L1 and future-steps L1, as OpenVLA-OFT reports them."""
    err = (pred.float() - target).abs()
    return err.mean(), err[:, 0].mean(), err[:, 1:].mean()


@torch.no_grad()
def evaluate(vla, val_set, stats, args, device, autocast, rank, world):
    """L1 on a fixed, evenly spaced set of validation samples, sharded over ranks, against a mean-action baseline."""
    vla.eval()
    n = min(len(val_set), args.eval_batches * args.batch_size)
    picks = torch.linspace(0, len(val_set) - 1, n).round().long().tolist()[rank::world]
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(val_set, picks),
        batch_size=args.batch_size,
        num_workers=min(args.num_workers, 2),
        worker_init_fn=ignore_sigterm,
    )
    mean = data.normalize(torch.tensor(stats["mean"]), stats, args.norm).to(device)
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # curr, future, raw, baseline, count
    for batch in loader:
        with autocast:
            pred = vla(batch["images"].to(device), batch["instruction"], batch.get("state")).float()
        target = batch["actions"].to(device)
        err = (pred - target).abs()
        raw = (data.unnormalize(pred, stats, args.norm) - data.unnormalize(target, stats, args.norm)).abs()
        b = len(target)
        sums += torch.stack(
            [
                err[:, 0].mean() * b,
                err[:, 1:].mean() * b,
                raw.mean() * b,
                (mean - target).abs().mean() * b,
                torch.tensor(b, device=device),
            ]
        ).double()
    if world > 1:
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


def save_checkpoint(vla, opt, step, stream_state, stats, args, world):
    """Rank 0 writes step_NNNNNN.tmp and renames it once whole, so a crash never leaves a checkpoint that looks done."""
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    rngs = [rng] * world
    if world > 1:
        dist.all_gather_object(rngs, rng)
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    final = os.path.join(args.out_dir, f"step_{step:06d}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        model.save_trained(vla, tmp)
        data.save_stats(os.path.join(tmp, "dataset_statistics.json"), **stats)
        with open(os.path.join(tmp, "args.json"), "w") as f:
            json.dump(vars(args) | {"world_size": world}, f, indent=1)
        torch.save(
            {
                "step": step,
                "optimizer": opt.state_dict(),
                "epoch": stream_state[0],
                "pos": stream_state[1],
                "world_size": world,
                "rng": rngs,
            },
            os.path.join(tmp, "trainer_state.pt"),
        )
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    except Exception as e:  # a full disk: OSError, safetensors' SafetensorError, a RuntimeError from torch.save
        shutil.rmtree(tmp, ignore_errors=True)
        sys.exit(
            f"error: could not save {final} ({type(e).__name__}: {e}; disk full?); removed {tmp}, the earlier "
            "checkpoints are untouched"
        )
    if args.keep_last:  # never this one; newer ones are broken ones --resume auto passed over: this run rewrites them
        older = [d for s, d in checkpoints(args.out_dir) if s < step]
        for old in older[: max(0, len(older) + 1 - args.keep_last)]:
            shutil.rmtree(old)
    print(f"saved {final}", flush=True)


def out_of_memory(vla, batch, autocast, device):  # a step without grad ckpt, AdamW's moments held as from step 2 on
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            moments = torch.empty(2 * sum(p.numel() for p in vla.parameters() if p.requires_grad), device=device)
            with autocast:
                pred = vla(batch["images"].to(device), batch["instruction"], batch.get("state"), batch.get("aug"))
            l1_terms(pred, batch["actions"].to(device))[0].backward()
            del moments
            return False
        except torch.cuda.OutOfMemoryError:
            return True
        finally:
            vla.zero_grad(set_to_none=True)


def check_ranks_agree(trainable, world):
    """DDP must keep every rank's trainable weights identical; a silent divergence would waste the whole run."""
    sums = torch.stack([p.detach().double().sum() for p in trainable]).cpu()
    everyone = [None] * world
    dist.all_gather_object(everyone, sums)
    if not all(torch.equal(s, sums) for s in everyone):
        raise RuntimeError("trainable weights differ between ranks")
    return f"trainable weights identical on all {world} ranks"


def metrics_step(row):  # a kill -9 leaves a half-written last row (no "\n"); a garbage one must not stop a resume
    try:
        return int(json.loads(row)["step"]) if row.endswith("\n") else None
    except (ValueError, KeyError, TypeError):
        return None


def exit_now(sig, frame):  # start-up: nothing to save, and a cluster's grace period would not wait for a first step
    print(f"stopped in start-up ({signal.Signals(sig).name}): run the same command to start again", file=sys.stderr)
    sys.exit(75)


def main(argv=None):
    args = get_args(argv)
    for name in filter(None, args.preempt_signals.split(",")):
        signal.signal(signal.Signals[name], exit_now)
    resume, state = find_resume(args)
    try:  # a run that cannot save fails now, and one run per --out_dir: a second would write over the first's saves
        os.makedirs(args.out_dir, exist_ok=True)
        lock = open(os.path.join(args.out_dir, ".lock"), "a")
        if os.environ.get("RANK", "0") == "0":  # the kernel drops the lock when the process ends, killed or not
            fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held by another process: EAGAIN on Linux, NFS too
    except BlockingIOError:
        sys.exit(
            f"error: --out_dir {args.out_dir} is in use by another run (it holds {lock.name}): wait for it "
            "to end, or pass another --out_dir"
        )
    except OSError as e:
        sys.exit(f"error: --out_dir {args.out_dir} is not writable: {e}")
    stop = {}  # why this rank should save and stop at the end of the current step
    launcher = os.getppid()
    # -------------------------------------------------------------------------------- distributed
    ddp = int(os.environ.get("RANK", -1)) != -1
    use_cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    if ddp:
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=args.dist_timeout))
        rank, local_rank, world = dist.get_rank(), int(os.environ["LOCAL_RANK"]), dist.get_world_size()
    else:
        rank, local_rank, world = 0, 0, 1
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    master = rank == 0
    torch.manual_seed(args.seed + rank)
    dtype = torch.bfloat16 if args.dtype == "bfloat16" or args.dtype == "auto" and use_cuda else torch.float32
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    log = print if master else (lambda *a, **k: None)

    # -------------------------------------------------------------------------------- data, checked before the model
    cameras = args.cameras.split(",")
    try:
        # only episodes that give samples may be held out: a too-short validation episode would leave none
        keys = dict(action_key=args.action_key, state_key=args.state_key, instruction=args.instruction)
        paths = data.check_episodes(
            data.list_episodes(args.data_dir), cameras, args.chunk, args.action_dim, args.action_offset, **keys
        )
        # what this run trains on, so that a resume can say what changed
        args.data_files = {os.path.basename(p): os.path.getsize(data.split_ref(p)[0]) for p in paths}
        if args.val_data_dir:
            train_paths, val_paths = paths, data.list_episodes(args.val_data_dir)
            if shared := set(map(os.path.realpath, paths)) & set(map(os.path.realpath, val_paths)):
                raise data.DataError(
                    f"--val_data_dir {args.val_data_dir} holds {len(shared)} of --data_dir's files "
                    f"(e.g. {min(shared)}): it would validate on training data"
                )
        elif resume:  # the checkpoint's split, whichever files came or went: its validation episodes never train
            held = {os.path.basename(p) for p in state["args"].get("val_episode_files", [])}
            train_paths, val_paths = ([p for p in paths if (os.path.basename(p) in held) == v] for v in (False, True))
        else:
            train_paths, val_paths = data.split_episodes(paths, args.val_episodes, args.seed)
        stats_file = os.path.join(resume, "dataset_statistics.json") if resume else None
        stats = data.load_stats(stats_file) if resume else None
        proprio_stats = data.load_stats(stats_file, key="proprio") if resume and args.proprio else None
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
        train_set = data.EpisodeDataset(
            train_paths, stats=stats, proprio_stats=proprio_stats, seed=args.seed, image_aug=args.image_aug, **common
        )
        stats, proprio_stats = train_set.stats, train_set.proprio_stats
        saved_stats = dict(
            action_stats=stats,
            proprio_stats=proprio_stats,
            num_transitions=sum(train_set.lengths),
            num_trajectories=len(train_set.paths),
        )
        val_set = (
            data.EpisodeDataset(val_paths, stats=stats, proprio_stats=proprio_stats, instruction_variant=0, **common)
            if val_paths
            else None
        )
        sets = [train_set] + [val_set] * bool(val_set)  # every prompt must fit the LLM: its tokenizer tells, no weights
        data.check_prompts(
            [p for s in sets for p in s.paths],
            [t for s in sets for t in s.instructions],
            args.vla_path,
            len(cameras),
            args.proprio,
            args.chunk,
        )
    except data.DataError as e:
        sys.exit(f"error: {e}")
    if ddp:  # node-local copies that differ would give each rank its own split, statistics and data order
        everyone = [None] * world
        dist.all_gather_object(everyone, args.data_files)
        if differ := [r for r, f in enumerate(everyone) if f != everyone[0]]:
            sys.exit(f"error: --data_dir {args.data_dir}: ranks {differ} hold other files than rank 0" if master else 1)
    was, now = state["args"].get("data_files", args.data_files) if resume else args.data_files, args.data_files
    if was != now:  # the split was kept above; the saved data position now points into another set
        log(
            f"note: --data_dir {args.data_dir} changed since {resume}: added {sorted(now.keys() - was)}, removed "
            f"{sorted(was.keys() - now)}, resized {sorted(n for n in now.keys() & was if now[n] != was[n])}; its "
            "validation episodes stay out of training"
        )
    if not epoch_batches(len(train_set), args, 0, world, 0):
        sys.exit(
            f"error: {len(train_set)} training samples cannot fill one batch of --batch_size {args.batch_size} "
            f"on each of {world} ranks"
        )
    args.val_episode_files = val_paths  # saved in args.json so infer.py can be pointed at episodes never trained on
    args.frame_sizes = train_set.frame_sizes  # so deployment brings live frames to the training frames' size
    args.state_key = train_set.state_key  # what --state_key auto resolved to, for deployment
    global_batch = args.batch_size * args.grad_accum * world
    shown = {k: v for k, v in vars(args).items() if k != "data_files"}  # args.json holds it: one line per episode
    log(json.dumps(shown | {"world_size": world, "global_batch": global_batch}, indent=1))
    log(
        f"train: {len(train_paths)} episodes, {len(train_set)} samples | val: {len(val_paths)} episodes | "
        f"global batch {global_batch} = {args.batch_size} x {args.grad_accum} accum x {world} ranks"
    )

    # -------------------------------------------------------------------------------- model
    vla = model.VLA.from_pretrained(
        args.vla_path,
        dtype=dtype,
        device=device,
        chunk=args.chunk,
        action_dim=args.action_dim,
        proprio_dim=train_set.proprio_dim,
        attention=args.attention,
        image_aug=args.image_aug,
        film=args.film,
    )
    model.add_lora(vla, rank=args.lora_rank)
    if args.grad_ckpt == "auto":  # measured, not estimated: the core does not import bench.py's memory model
        texts = [s for texts in train_set.instructions for s in texts]
        worst = torch.utils.data.default_collate([train_set[0]] * args.batch_size)
        worst["instruction"] = [max(zip(map(len, vla.tokenize(texts)), texts))[1]] * args.batch_size
        oom = torch.tensor(float(use_cuda and out_of_memory(vla, worst, autocast, device)), device=device)
        if ddp:  # one rank's GPU short of memory decides for all: every rank must run the same graph
            dist.all_reduce(oom, op=dist.ReduceOp.MAX)
        args.grad_ckpt = "on" if oom.item() else "off"
        log(f"--grad_ckpt auto: {args.grad_ckpt}")
    if args.grad_ckpt == "on":
        model.enable_grad_ckpt(vla)
    trainable = [p for p in vla.parameters() if p.requires_grad]  # fp32 even on a bf16 base: AdamW needs it
    log(model.param_report(vla))
    opt = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)
    start_step, epoch, pos = 0, 0, 0
    if resume:  # the weights are loaded in place: the optimizer holds the same parameters
        model.load_trained(vla, resume)
        opt.load_state_dict(state["optimizer"])
        start_step, epoch, pos = state["step"], state["epoch"], state["pos"] * state["world_size"] // world
        if state["world_size"] == world:
            torch.set_rng_state(state["rng"][rank]["cpu"])
            if use_cuda and state["rng"][rank]["cuda"] is not None:
                torch.cuda.set_rng_state(state["rng"][rank]["cuda"])
        else:
            log(f"note: resuming on {world} ranks a run saved on {state['world_size']}: data order will differ")
        log(f"resumed from {resume} at step {start_step}")
    train_vla = vla
    if ddp:
        frozen = [n for n, p in vla.named_parameters() if not p.requires_grad] + [n for n, _ in vla.named_buffers()]
        DDP._set_params_and_buffers_to_ignore_for_model(vla, frozen)  # broadcast and sync only what trains
        train_vla = DDP(vla, device_ids=[local_rank] if use_cuda else None)
    metrics_file = os.path.join(args.out_dir, "metrics.jsonl")
    if master and resume and os.path.exists(metrics_file):  # steps after the checkpoint are logged again: once only
        with open(metrics_file) as f:
            rows = [(r, metrics_step(r)) for r in f]
        if bad := [i + 1 for i, (_, s) in enumerate(rows) if s is None]:
            log(f"note: {metrics_file}: dropping unreadable lines {bad}")
        with open(metrics_file, "w") as f:
            f.writelines(r for r, s in rows if s is not None and s <= start_step)
    metrics = open(metrics_file, "a") if master else None

    def record(row, line):
        log(line, flush=True)
        if master:
            print(json.dumps(row), file=metrics, flush=True)

    # -------------------------------------------------------------------------------- training loop
    stream = batch_stream(train_set, args, rank, world, epoch, pos, use_cuda)
    stream_state = (epoch, pos)
    vla.train()
    for name in filter(None, args.preempt_signals.split(",")):
        signal.signal(signal.Signals[name], lambda sig, frame: stop.setdefault("why", signal.Signals(sig).name))
    t_log, steps_since_log = time.time(), 0
    for step in range(start_step + 1, args.max_steps + 1):
        lr = get_lr(step - 1, args)
        for group in opt.param_groups:
            group["lr"] = lr
        try:  # every micro-batch first: a rank whose file fails must not leave the others waiting in DDP's backward
            micro_batches, failed = [next(stream) for _ in range(args.grad_accum)], torch.zeros((), device=device)
        except data.DataError as e:  # from a worker, torch wraps it in a traceback: ours is its last line
            print("error: " + str(e).strip().splitlines()[-1].split("DataError: ")[-1], file=sys.stderr, flush=True)
            failed = torch.ones((), device=device)
        if ddp:
            dist.all_reduce(failed)
        if failed.item():  # exit 65 (EX_DATAERR): a data file failed; the last finished step is saved
            if step - 1 > start_step and (step - 1) % args.save_interval:
                save_checkpoint(vla, opt, step - 1, stream_state, saved_stats, args, world)
            if ddp:  # a rank that exits first gets the others killed, rank 0 perhaps while it saves
                dist.barrier()
            log(f"stopped before step {step}: fix or remove the episode named above, then --resume auto", flush=True)
            sys.exit(65)
        terms = torch.zeros(4, device=device)  # loss, curr, future, and whether any rank must stop after this step
        for micro, (epoch, pos, batch) in enumerate(micro_batches):
            with train_vla.no_sync() if ddp and micro < args.grad_accum - 1 else nullcontext():
                with autocast:
                    pred = train_vla(
                        batch["images"].to(device, non_blocking=True),
                        batch["instruction"],
                        batch.get("state"),
                        batch.get("aug"),
                    )
                loss, curr, future = l1_terms(pred, batch["actions"].to(device, non_blocking=True))
                (loss / args.grad_accum).backward()
            terms[:3] += torch.stack([loss, curr, future]).detach() / args.grad_accum
        if ddp and os.getppid() != launcher:  # torchrun died: nothing would supervise or restart this rank
            stop.setdefault("why", "the launcher exited")
        terms[3] = float(bool(stop))
        if ddp:
            dist.all_reduce(terms)  # every rank stops after the same step
            terms[:3] /= world
        loss, curr, future, stopping = terms.tolist()
        if not math.isfinite(loss):
            sys.exit(
                f"error: loss is {loss} at step {step}; stopping without saving this state "
                f"(last good checkpoint, if any, is in {args.out_dir})"
            )
        opt.step()
        opt.zero_grad(set_to_none=True)
        stream_state = (epoch, pos)
        steps_since_log += 1
        if step % args.log_interval == 0 or step == args.max_steps:
            dt = (time.time() - t_log) / steps_since_log
            eta = dt * (args.max_steps - step)
            record(
                {"step": step, "loss": loss, "curr_l1": curr, "future_l1": future, "lr": lr, "ms": dt * 1000},
                f"step {step}/{args.max_steps} | loss {loss:.4f} | curr l1 {curr:.4f} | future l1 {future:.4f} | "
                f"lr {lr:.2e} | {dt * 1000:.0f} ms | {global_batch / dt:.1f} samples/s | "
                f"eta {int(eta // 3600)}h{int(eta % 3600 // 60):02d}m",
            )
            t_log, steps_since_log = time.time(), 0
        t_aside = time.time()  # evaluation and saving stay out of the step time and the eta
        if val_set is not None and (step % args.eval_interval == 0 or step == args.max_steps):
            row = evaluate(vla, val_set, stats, args, device, autocast, rank, world)
            record({"step": step} | row, f"eval step {step} | " + " | ".join(f"{k} {v:.4f}" for k, v in row.items()))
        if step % args.save_interval == 0 or step == args.max_steps or stopping:
            if ddp:
                log(check_ranks_agree(trainable, world))
            save_checkpoint(vla, opt, step, stream_state, saved_stats, args, world)
        if stopping:
            break
        t_log += time.time() - t_aside
    if ddp:  # no rank may tear gloo down while another's last collective is in flight: that aborts or hangs at exit
        dist.barrier()
    if stopping and step < args.max_steps:
        log(
            f"stopped after step {step} ({stop.get('why', 'asked by another rank')}) and saved it: run the same "
            f"command with --resume auto to continue",
            flush=True,
        )
        sys.exit(75)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # torchrun passes the same Ctrl-C on once more
        print("interrupted: nothing saved since the last checkpoint", file=sys.stderr)
        sys.exit(130)
    except data.DataError as e:  # a validation file failing mid-run; the checkpoints saved so far stand
        print(f"error: {str(e).strip().splitlines()[-1].split('DataError: ')[-1]} (in an evaluation)", file=sys.stderr)
        sys.exit(65)
    finally:  # workers ignore SIGTERM, so exit's terminate-and-join of the ones an error left alive would never end
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would turn their end into another error
        for worker in torch.multiprocessing.active_children():
            worker.kill()
        end = sys.exc_info()[1]  # None when main() returned; a traceback leaves gloo to the interpreter's exit
        if dist.is_initialized() and isinstance(end, (SystemExit, type(None))):  # on purpose, no collective in flight:
            code = getattr(end, "code", None) or 0  # a bare sys.exit(): 0. Skip gloo's teardown, which holds the GIL
            sys.stdout.flush()  # waiting for gloo's thread while it waits for the GIL (a rank hung: 1 run in 75)
            os._exit(code if isinstance(code, int) else print(code, file=sys.stderr) or 1)  # sys.exit("error:...")
