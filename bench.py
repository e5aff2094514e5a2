"""
Measure nanoOFT: data loader throughput, training step time / memory / MFU, inference latency per chunk. Each
--what prints one table under a line naming the machine, ready for the README's performance table.

    python bench.py --what data --data_dir out/demo_data      # loader samples/s with 0 and 2 workers, RoboTwin's
                                                              # layout and real ALOHA's (3 cameras of 480x640 JPEGs)
    python bench.py --what train                              # CPU: tiny twin, float32; CUDA: 7B-shaped, bf16
    python bench.py --what train --device cuda --vla_path DIR # a real checkpoint instead of random 7B weights
    python bench.py --what recipe                             # aloha/train.sh's CPU step: float32, bf16, compiled
    python bench.py --what infer --no-compile                 # latency per chunk: LoRA unmerged vs merged, eager
    python bench.py --what flops --model 7b                   # training FLOPs per sample by part (meta device)
    python bench.py --what memory                             # 7B training step's peak memory, fit table (no GPU)
    python bench.py --what memory --film                      # the same with OFT+'s FiLM layers (train.py --film)
    python bench.py --what memory --measure                   # check the memory model against real CPU peaks
    OMP_NUM_THREADS=2 python bench.py --what all              # data, train and infer with 2 CPU threads
    python bench.py --what serve --cameras 1 --iters 100      # serve.py round trip vs Policy.predict (loopback)
    python bench.py --what rehearsal --dir out/rehearsal      # OpenVLA-7B's shapes through train, resume, merge,
                                                              # predict and serve, each command's peak RSS (CPU)
    python bench.py --what rehearsal --llm_layers 2           # the same at 7B width with 2 LLM layers (minutes)

Without --vla_path the model is a random-weight twin built on the device (no download): tiny on CPU, 7B on CUDA.
--what rehearsal writes a random-weight checkpoint in openvla/openvla-7b's layout (--model tiny: the tiny twin's
shapes) under --dir, runs the real commands against it (rehearsal.py; docs/rehearsal.md) and removes it unless
--keep; it checks memory and disk first, prints one row per command and ends with
`rehearsal: N of N steps ok, peak RSS X GB (weights Y GB)`, exiting 0 only when every step ran, stayed within
1.3 x the weights + 2 GB and agreed.
"""

import argparse
import gc
import itertools
import math
import multiprocessing
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from types import SimpleNamespace
from unittest import mock

import numpy as np
import torch
import torch.nn as nn
import transformers.masking_utils
from PIL import Image
from torch._C._profiler import _EventType
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker
from torch.nn.attention import SDPBackend, sdpa_kernel

import data
import demo
import infer
import model
import rehearsal
import train

HERE = os.path.dirname(os.path.abspath(__file__))

GPU_PEAK_TFLOPS = {"H100 PCIe": 756, "H100 NVL": 835, "H200 NVL": 835, "H100": 989, "H200": 989, "A100": 312}
FLOPS_FORMULA = [  # matmuls only: norms, activations, softmax and the optimizer are noise next to them
    "FLOPs per token of a weight matrix: forward 2 + input gradient 2 (+ weight gradient 2 if it trains) per "
    "element: frozen 4 x params, trainable (LoRA, head) 6 x",
    "attention QK^T and AV: 2 matmuls x 2 FLOPs per (query, key) pair per channel forward, twice that backward: "
    "12 x layers x width x pairs",
    "ViTs per image: T = 256 patches + prefix tokens, pairs T^2, frozen patch embedding forward only; projector: "
    "N x 256 tokens; LLM: T = 1 + N x 256 + prompt + K queries, causal pairs T(T+1)/2; head: K tokens",
    "grad ckpt recomputes the ViT blocks' and LLM layers' forward (2 x params + 4 x layers x width x pairs per "
    "token): hardware FLOPs (HFU), not model FLOPs (MFU)",
]


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--what",
        choices=["data", "train", "recipe", "infer", "flops", "memory", "serve", "rehearsal", "all"],
        default="all",
        help="all: data, train and infer",
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (pick the GPU with CUDA_VISIBLE_DEVICES)")
    p.add_argument(
        "--model",
        choices=["auto", "tiny", "7b"],
        default="auto",
        help="the random twin without --vla_path (and always for --what flops and rehearsal); auto: 7b on CUDA "
        "and for --what rehearsal",
    )
    p.add_argument("--vla_path", help="an OpenVLA-format checkpoint (directory or hub id) instead of a random twin")
    p.add_argument(
        "--checkpoint",
        help="--what serve: a trained checkpoint; default: the tiny twin trained one step "
        "on 2 demo episodes with --cameras cameras",
    )
    p.add_argument("--data_dir", default="out/demo_data", help="episode_*.hdf5 files for --what data")
    p.add_argument("--batch_size", type=int, default=8, help="training and loader batch")
    p.add_argument("--cameras", type=int, default=2, help="images per sample: the first N of data.ALL_CAMERAS")
    p.add_argument(
        "--jpeg_episodes",
        type=int,
        default=4,
        help="--what data: episodes of the real ALOHA layout made "
        "from the first demo episodes (kept beside --data_dir)",
    )
    p.add_argument("--lora_rank", type=int, default=32)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps / chunks / batches first")
    p.add_argument("--iters", type=int, default=10, help="timed steps / chunks, or batches per loader repeat")
    p.add_argument(
        "--repeats", type=int, default=3, help="loader repeats whose median is reported; --what recipe: rounds"
    )
    p.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=True, help="also time torch.compile in --what infer"
    )
    p.add_argument("--compile_mode", default="default", help="torch.compile mode, e.g. reduce-overhead (CUDA graphs)")
    p.add_argument("--grad_ckpt", action="store_true", help="--what memory: the parts with grad ckpt")
    p.add_argument("--film", action="store_true", help="the model with OFT+'s FiLM layers, as train.py --film")
    p.add_argument(
        "--measure",
        action="store_true",
        help="--what memory: also run real steps on this CPU and compare their peak with the model's",
    )
    p.add_argument(
        "--dir",
        default=os.path.join(HERE, "out", "rehearsal"),
        help="--what rehearsal: a new or empty directory for the checkpoint, the runs and the export (~33 GB at 7B)",
    )
    p.add_argument("--keep", action="store_true", help="--what rehearsal: keep what it wrote under --dir")
    p.add_argument(
        "--llm_layers",
        type=int,
        help="--what rehearsal: only this many LLM layers (every width and both towers stay): a quicker check",
    )
    p.add_argument(
        "--peak_tflops",
        type=float,
        help="device peak for MFU; default: bf16 dense spec by GPU name, a measured fp32 matmul on CPU",
    )
    return p.parse_args(argv)


def machine(device):
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":")[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):  # not Linux
        cpu = platform.processor()
    gpu = f" | {torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})" if device.type == "cuda" else ""
    return f"{cpu} ({os.cpu_count()} cores){gpu} | torch {torch.__version__} | {torch.get_num_threads()} threads"


def table(title, header, rows, notes=()):
    """Aligned columns; a row shorter than the header (a failure message) runs on from its first cell."""
    cells = [header] + [
        [c if isinstance(c, str) else f"{c:,.1f}" if abs(c) >= 1 else f"{c:.3g}" for c in r] for r in rows
    ]
    width = [max(len(r[i]) for r in cells if len(r) == len(header)) for i in range(len(header))]
    print(f"\n## {title}")
    for r in cells:
        print(
            "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, width)))
            if len(r) == len(header)
            else f"{r[0].ljust(width[0])}  {'  '.join(r[1:])}"
        )
    print("\n".join(notes))


class HostEvent:
    """torch.cuda.Event's interface on the host clock, for the CPU, where the work is done when the call returns."""

    def record(self):
        self.t = time.perf_counter()

    def elapsed_time(self, end):
        return 1000 * (end.t - self.t)


def timed(fn, device, warmup, iters):
    """Seconds per call after `warmup` calls (compilation, allocation, autotuning), and the warm-up's seconds. CUDA
    events time the device's own work; they are read after a synchronize."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    event = (lambda: torch.cuda.Event(enable_timing=True)) if device.type == "cuda" else HostEvent
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    sync()
    warm, events = time.perf_counter() - t0, [(event(), event()) for _ in range(iters)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    sync()
    return np.array([start.elapsed_time(end) / 1000 for start, end in events]), warm


def build(args, device, dtype):
    """--vla_path, else a random-weight twin built directly on `device` (the tiny twin's tokenizer for both).
    On the meta device (shapes only, for FLOP counts) always the --model twin: weights cannot load there."""
    if args.vla_path and str(device) != "meta":
        return model.VLA.from_pretrained(args.vla_path, dtype, device, film=args.film)
    tok = demo.make_tokenizer()
    config = demo.openvla_7b_config() if args.model == "7b" else demo.tiny_config(tok)
    return model.VLA.from_config(config, dtype, device, tokenizer=tok, film=args.film)


def inputs(args, batch, device):
    """Random uint8 frames at the demo's 256x256 (the model resizes to 224, as in training), the demo's instructions;
    pinned like train.py's loader so the copy to the GPU is part of the step."""
    images = torch.randint(0, 256, (batch, args.cameras, 3, 256, 256), dtype=torch.uint8)
    return images.pin_memory() if device.type == "cuda" else images, (demo.SEEN * batch)[:batch]


# -----------------------------------------------------------------------------
# FLOPs, by FLOPS_FORMULA


def matmul_flops(modules, tokens):
    """(fwd+bwd, fwd) FLOPs of the nn.Linear weights (base layers and LoRA A/B alike) over `tokens` tokens."""
    ws = [m.weight for mod in modules for m in mod.modules() if isinstance(m, nn.Linear)]
    return tokens * sum((6 if w.requires_grad else 4) * w.numel() for w in ws), tokens * 2 * sum(w.numel() for w in ws)


def flops_per_sample(vla, n_images, prompt_len):
    """Training FLOPs of one sample by part: (model FLOPs, the forward that grad ckpt recomputes). prompt_len counts
    BOS. Counted though autograd skips it: the input gradient of the first ViT block's frozen qkv (nothing trainable
    precedes it), 0.05% of the 7B's total."""
    patches, parts = (vla.image_size // model.PATCH) ** 2, {}
    for (name, tower), tid in zip(vla.vision_backbone.items(), vla.config["timm_model_ids"]):
        T = patches + sum(t.shape[1] for t in (tower.cls_token, tower.reg_token) if t is not None)
        attention = 4 * len(tower.blocks) * tower.pos_embed.shape[-1] * T * T
        full, fwd = matmul_flops(tower.blocks, T)
        embed = 2 * tower.patch_embed.proj.weight.numel() * patches
        parts[f"{name} ({tid.split('.')[0]})"] = n_images * (full + 3 * attention + embed), n_images * (fwd + attention)
    parts["projector"] = (matmul_flops([vla.projector], n_images * patches)[0], 0)
    T, cfg = n_images * patches + prompt_len + vla.chunk, vla.llm.config
    attention = 4 * cfg.num_hidden_layers * cfg.hidden_size * T * (T + 1) // 2  # flash skips the masked pairs
    full, fwd = matmul_flops(vla.llm.model.layers, T)
    parts["llm"] = (full + 3 * attention, fwd + attention)
    parts["action head"] = (matmul_flops([vla.action_head], vla.chunk)[0], 0)
    return parts


def bench_flops(args, device):
    vla = model.add_lora(build(args, "meta", torch.bfloat16), args.lora_rank)  # shapes only: the 7B costs nothing
    parts = flops_per_sample(vla, args.cameras, len(vla.tokenize(demo.SEEN[:1])[0]))
    rows = [[k, f / 1e9, r / 1e9] for k, (f, r) in parts.items()]
    table(
        f"training FLOPs per sample: {args.model}, {args.cameras} cameras, LoRA rank {args.lora_rank}, "
        f"{demo.SEEN[0]!r}",
        ["part", "model GFLOP", "+ grad ckpt GFLOP"],
        rows + [["total", sum(r[1] for r in rows), sum(r[2] for r in rows)]],
        FLOPS_FORMULA,
    )


# -----------------------------------------------------------------------------
# memory: train.py's step counted on fake tensors (shapes, no storage) by torch's MemTracker

FUSED = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]  # CUDA's kernels: no T x T matrix kept
PROMPT_LEN = 20  # BOS + the demo's prompt, as --what flops counts it
FIT_GB, MARGIN = (24, 40, 80), 1.1
GB = 2**30  # GPU memory is quoted in GiB ("80 GB" H100s hold 80 GiB)


def fake_vla(config, depths, lora_rank, dtype, **vla_options):
    """The VLA as train.py sets it up (frozen base in `dtype`; LoRA, head and queries in float32) with only `depths` =
    (DINOv2 blocks, SigLIP blocks, LLM layers) kept, on fake tensors. peft cannot inject into fake tensors, so it is
    built and injected on the meta device and handed fake tensors afterwards."""
    vla = model.VLA._meta(config, dtype, None, None, vla_options)
    for tower, n in zip(vla.vision_backbone.values(), depths):
        del tower.blocks[n:]
    del vla.llm.model.layers[depths[2] :]
    vla.llm.config.num_hidden_layers = depths[2]
    vla._finish("meta")
    model.add_lora(vla, lora_rank)
    vla.fake = FakeTensorMode()
    with vla.fake:
        for m in vla.modules():
            for name, t in list(m._parameters.items()) + list(m._buffers.items()):
                if t is not None:
                    x = torch.empty(t.shape, dtype=t.dtype)
                    setattr(m, name, nn.Parameter(x, t.requires_grad) if isinstance(t, nn.Parameter) else x)
    return vla


def prepared_step(vla, batch_size, cameras, prompt_len, dtype, grad_ckpt):
    """train.py's step on random inputs (prompts of prompt_len tokens, a state and augmentation draws when the model
    takes them), AdamW's state already made as from the second step on; -> (step, optimizer, inputs)."""
    B = batch_size
    vla.tokenize = lambda instructions: [[1] + [3] * (prompt_len - 1)] * len(instructions)
    # FiLM's language vector averages the stop token </s> in too: its id comes from a tokenizer (the tiny twin's)
    vla.tokenizer = demo.make_tokenizer()
    if grad_ckpt:
        model.enable_grad_ckpt(vla)
    vla.train()
    images = torch.randint(0, 256, (B, cameras, 3, 256, 256), dtype=torch.uint8)
    state = torch.rand(B, vla.proprio_dim) * 2 - 1 if vla.proprio_dim else None
    aug = torch.rand(B, cameras, 6) if vla.image_aug else None
    target = torch.rand(B, vla.chunk, vla.action_dim) * 2 - 1
    trainable = [p for p in vla.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=5e-4, weight_decay=0.01, foreach=True)  # foreach: the default on CUDA
    for p in trainable:
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    autocast = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else nullcontext()

    def step():
        with sdpa_kernel(FUSED):  # a shape that needs sdpa's math kernel (T x T kept) raises instead of counting it
            with autocast:
                pred = vla(images, ["x"] * B, state, aug)
            train.l1_terms(pred, target)[0].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, opt, [t for t in (images, state, aug, target) if t is not None]


def tracked_peak(config, depths, batch_size, grad_ckpt, cameras, prompt_len, lora_rank, dtype, **vla_options):
    """Bytes alive at the peak of each phase (forward, backward, optimizer) by part, on fake tensors: MemTracker sees
    every tensor made, and none is allocated. Phases are kept apart because each grows linearly with depth, their
    maximum does not: at batch 1 with grad ckpt the optimizer step peaks highest at 1 layer, not at full depth."""
    vla = fake_vla(config, depths, lora_rank, dtype, **vla_options)
    with vla.fake:
        step, opt, inputs = prepared_step(vla, batch_size, cameras, prompt_len, dtype, grad_ckpt)
    mt, no_hook, peaks = MemTracker(), SimpleNamespace(remove=lambda: None), {}
    for p in vla.parameters():  # MemTracker hooks every parameter's gradient: frozen ones refuse hooks
        if not p.requires_grad:
            mt._param_to_grad_hook_handles[p] = (no_hook, no_hook)

    def phase_peaks(_state):  # instead of MemTracker's peaks per module: half the time, never read here
        snap = mt._curr_mem_snap.get(torch.device("cpu"), {"Total": 0})
        phase = "optimizer" if mt._in_opt else "backward" if mt._mod_tracker.is_bw else "forward"
        if snap["Total"] > peaks.get(phase, {}).get("Total", 0):
            peaks[phase] = dict(snap)

    mt._update_peak_stats = phase_peaks
    mt.track_external(vla, opt, *inputs)
    # transformers takes fake tensors for tracing and then builds a (B, 1, T, T) causal mask that a real run skips
    # (reading the positions' values to rule out packed sequences): a real step's path, as the positions here are
    # one unpacked sequence per row
    real_path = mock.patch.multiple(
        transformers.masking_utils, is_tracing=lambda *a: False, find_packed_sequence_indices=lambda position_ids: None
    )
    with vla.fake, mt, real_path:
        step()
    trainable = sum(p.nbytes for p in vla.parameters() if p.requires_grad)
    out = {}
    for phase, snap in peaks.items():
        peak = {str(getattr(k, "value", k)): v for k, v in snap.items()}
        out[phase] = {
            "frozen weights": peak["Parameter"] - trainable + peak["Buffer"],
            "trainable weights": trainable,
            "gradients": peak["Gradient"],
            "AdamW state": peak["Optstate"],
            "activations": peak["Activation"],
            "temporaries": peak["Temp"] + peak["Other"],
            "total": peak["Total"],
        }
    return out


def estimate_memory(
    config,
    batch_size=8,
    grad_ckpt=False,
    cameras=2,
    prompt_len=PROMPT_LEN,
    lora_rank=32,
    dtype=torch.bfloat16,
    depths=None,
    **vla_options,
):
    """Peak accelerator bytes of one train.py step (forward, backward, AdamW) by part, and the phase it falls in,
    computed on the CPU without allocating. Each phase's peak grows linearly with identical blocks, so each stage
    (DINOv2, SigLIP, LLM) is measured at 1 and 2 blocks and extrapolated to its depth; depths=(dino, siglip, llm)
    runs those depths directly. Assumes CUDA's fused attention (flash / memory-efficient). vla_options: chunk,
    action_dim, proprio_dim, attention, image_aug, film, as VLA takes them."""

    def run(d):
        return tracked_peak(config, d, batch_size, grad_ckpt, cameras, prompt_len, lora_rank, dtype, **vla_options)

    if depths:
        est = run(depths)
    else:
        full = [model.VIT[tid]["depth"] - 1 for tid in config["timm_model_ids"]]  # the last block is never built
        full.append(model.LlamaConfig(**config["text_config"]).num_hidden_layers)
        base = run((1, 1, 1))
        est = base
        for i, n in enumerate(full):
            if n > 1:
                more = run(tuple(1 + (j == i) for j in range(3)))
                est = {
                    ph: {k: v + (n - 1) * (more[ph][k] - base[ph][k]) for k, v in parts.items()}
                    for ph, parts in est.items()
                }
    phase = max(est, key=lambda ph: est[ph]["total"])
    return est[phase] | {"phase": phase}


def measured_peak(config, batch_size, grad_ckpt, cameras, prompt_len, lora_rank, dtype, **vla_options):
    """The same step for real on this CPU: the bytes it holds before (weights, AdamW state, inputs) plus the highest
    running total of the CPU allocator's own allocations during the step, from torch.profiler's memory events."""
    vla = model.add_lora(model.VLA.from_config(config, dtype, "cpu", **vla_options), lora_rank)
    step, opt, inputs = prepared_step(vla, batch_size, cameras, prompt_len, dtype, grad_ckpt)
    state = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    held = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
        for t in itertools.chain(vla.parameters(), vla.buffers(), state, inputs)
    }
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events, totals = prof.profiler.kineto_results.experimental_event_tree(), [0]
    while events:
        e = events.pop()
        events += e.children
        totals += [e.extra_fields.total_allocated] if e.tag == _EventType.Allocation else []
    return sum(held.values()) + max(totals)


def fit_lines(rows):
    """rows: (batch, bytes without grad ckpt, bytes with) -> the lines scripts read, then which cards fit."""
    lines = [f"batch {b}: {off / GB:.1f} GB without grad ckpt, {on / GB:.1f} GB with" for b, off, on in rows]

    def fits(r, c):
        return "yes" if r[1] * MARGIN <= c * GB else "grad ckpt" if r[2] * MARGIN <= c * GB else "no"

    lines += [
        "",
        f"fits with a {MARGIN - 1:.0%} margin: yes, only with grad ckpt, or no",
        "batch " + "".join(f"{c} GB".rjust(11) for c in FIT_GB),
    ]
    return lines + [f"{r[0]:<5} " + "".join(fits(r, c).rjust(11) for c in FIT_GB) for r in rows]


def film_parameters(config):
    """The FiLM layers' parameter count and the (blocks, tower width) they modulate, from the model's own shapes."""
    vla = model.VLA._meta(config, torch.bfloat16, None, None, dict(film=True))
    towers = [(len(t.blocks), t.pos_embed.shape[-1]) for t in vla.vision_backbone.values()]
    return sum(p.numel() for p in vla.film_layers.parameters()), towers


def bench_memory(args, device):
    options = dict(image_aug=True, film=args.film)  # train.py's default: augmentation draws come with every batch
    config, t0 = demo.openvla_7b_config(), time.perf_counter()
    if args.film:
        n, towers = film_parameters(config)
        d = model.LlamaConfig(**config["text_config"]).hidden_size
        print(
            f"FiLM layers: {n:,} parameters = 2 x ({d} + 1) x ({' + '.join(f'{b} x {w}' for b, w in towers)}) "
            f"(scale and shift, LLM width -> tower width, in every block used); {4 * n / GB:.2f} GB in float32, "
            f"{16 * n / GB:.2f} GB with their gradients and AdamW state"
        )
    parts = estimate_memory(
        config, args.batch_size, args.grad_ckpt, args.cameras, PROMPT_LEN, args.lora_rank, **options
    )
    what = (
        f"{args.cameras} cameras, {PROMPT_LEN}-token prompt, LoRA rank {args.lora_rank}{', FiLM' * args.film}, "
        "bf16 base, AdamW"
    )
    table(
        f"training step peak memory (estimate): 7B, batch {args.batch_size}, "
        f"{'with' if args.grad_ckpt else 'without'} grad ckpt, {what}",
        ["part", "GB"],
        [[k, v / GB] for k, v in parts.items() if k != "phase"] + [["peak during", parts["phase"]]],
        [
            "method: the step on fake tensors under torch's MemTracker, stages measured at 1 and 2 blocks and "
            "extrapolated to full depth; fused (flash / memory-efficient) attention assumed, as on CUDA; GB = 2^30 B"
        ],
    )
    rows = [
        (
            b,
            *(
                estimate_memory(config, b, ckpt, args.cameras, PROMPT_LEN, args.lora_rank, **options)["total"]
                for ckpt in (False, True)
            ),
        )
        for b in (1, 2, 4, 8, 16)
    ]
    print(f"\n## fit table (estimate): 7B, {what}\n" + "\n".join(fit_lines(rows)))
    print(f"({time.perf_counter() - t0:.0f} s)")
    if args.measure:
        tiny, width = demo.tiny_config(demo.make_tokenizer()), demo.openvla_7b_config()
        width["text_config"] = {**width["text_config"], "num_hidden_layers": 2}
        checks = [
            ("tiny twin, float32", tiny, 8, torch.float32),
            ("7B width, 2 LLM layers, bf16", width, 1, torch.bfloat16),
        ]
        out = []
        for (name, config, b, dtype), ckpt in itertools.product(checks, (False, True)):
            common = (config, b, ckpt, args.cameras, PROMPT_LEN, args.lora_rank, dtype)
            est, real = estimate_memory(*common, **options)["total"], measured_peak(*common, **options)
            out.append(
                [f"{name}, batch {b}{', grad ckpt' if ckpt else ''}", est / 2**20, real / 2**20, 100 * (est / real - 1)]
            )
        table(
            "memory model vs a real step on this CPU",
            ["config", "estimate MiB", "measured MiB", "error %"],
            out,
            [
                "measured: bytes held before the step + the peak running total of the CPU allocator during it "
                "(torch.profiler memory events)"
            ],
        )


# -----------------------------------------------------------------------------
# the three benchmarks


def loader_rows(dataset, args):
    """samples/s of the loader (median, min, max over repeats) and per process, with 0 and 2 workers."""
    rows, n = [], args.batch_size * (args.warmup + args.repeats * args.iters)
    for workers in (0, 2):
        # one sampler for every batch: no epoch boundary (worker restart) inside a timed repeat
        sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=n)
        batches = iter(torch.utils.data.DataLoader(dataset, args.batch_size, sampler=sampler, num_workers=workers))
        for _ in range(args.warmup):  # worker start-up, first file opens
            next(batches)
        rates = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            for _ in range(args.iters):
                next(batches)
            rates.append(args.iters * args.batch_size / (time.perf_counter() - t0))
        rows.append([str(workers), float(np.median(rates)), min(rates), max(rates), np.median(rates) / max(workers, 1)])
    return rows


def bench_data(args, device):
    header = ["num_workers", "samples/s", "min", "max", "per process"]
    notes = [f"median of {args.repeats} repeats of {args.iters} batches after {args.warmup} warm-up batches"]
    dataset = data.EpisodeDataset(args.data_dir, cameras=data.ALL_CAMERAS[: args.cameras])
    table(
        f"data loader: {args.data_dir}, {len(dataset.paths)} episodes, {args.cameras} cameras, batch {args.batch_size}",
        header,
        loader_rows(dataset, args),
        notes,
    )
    # real ALOHA's layout: the demo's first episodes as 3 cameras of 480x640 JPEGs (quality 50, as its recorder)
    jpeg_dir = os.path.join(args.data_dir, "..", "bench_aloha_jpeg")
    os.makedirs(jpeg_dir, exist_ok=True)
    for i, path in enumerate(dataset.paths[: args.jpeg_episodes]):
        target = os.path.join(jpeg_dir, f"episode_{i}.hdf5")
        if not os.path.exists(target):
            episode = data.read_episode(path, data.ALL_CAMERAS[:3])
            frames = np.stack([episode["frames"](t).permute(0, 2, 3, 1).numpy() for t in range(episode["length"])], 1)
            big = {
                f"cam_{c}": np.stack([np.asarray(Image.fromarray(x).resize((640, 480), Image.BICUBIC)) for x in f])
                for c, f in zip(("high", "left_wrist", "right_wrist"), frames)
            }
            demo.write_aloha(target + ".tmp", big, episode["actions"], episode["actions"])
            os.replace(target + ".tmp", target)
            episode["close"]()
    cameras = [f"observations/images/cam_{c}" for c in ("high", "left_wrist", "right_wrist")]
    jpeg = data.EpisodeDataset(jpeg_dir, cameras=cameras, instruction="place the shoe on the mat")
    table(
        f"data loader: real ALOHA layout ({jpeg_dir}), {len(jpeg.paths)} episodes, 3 cameras of 480x640 JPEG "
        f"frames, batch {args.batch_size}",
        header,
        loader_rows(jpeg, args),
        notes,
    )


def train_row(args, device, ckpt):
    """One configuration, stepping exactly as train.py does. It builds its own model so that the peak memory is
    weights + optimizer state + activations, and nothing another row left behind."""
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    vla = model.add_lora(build(args, device, dtype), args.lora_rank)
    if ckpt:
        model.enable_grad_ckpt(vla)
    vla.train()
    opt = torch.optim.AdamW([p for p in vla.parameters() if p.requires_grad], lr=5e-4, weight_decay=0.01)
    images, instructions = inputs(args, args.batch_size, device)
    target = torch.rand(args.batch_size, vla.chunk, vla.action_dim, device=device) * 2 - 1

    def step():
        with autocast:
            pred = vla(images.to(device, non_blocking=True), instructions)
        loss = train.l1_terms(pred, target)[0]
        loss.backward()
        if not math.isfinite(loss.item()):  # train.py reads the loss every step too: keep its synchronization
            raise RuntimeError(f"loss is {loss.item()}")
        opt.step()
        opt.zero_grad(set_to_none=True)

    name = "grad ckpt" if ckpt else "no grad ckpt"
    try:
        s = float(np.median(timed(step, device, args.warmup, args.iters)[0]))
    except torch.OutOfMemoryError:
        return [name, f"out of memory ({torch.cuda.max_memory_reserved(device) / 2**30:.1f} GiB reserved)"]
    counts = [flops_per_sample(vla, args.cameras, len(ids)) for ids in vla.tokenize(instructions)]  # unpadded
    flops, recomputed = (sum(c[part][i] for c in counts for part in c) for i in (0, 1))

    def util(f):
        return 100 * f / s / 1e12 / args.peak_tflops if args.peak_tflops else "n/a"

    def gib(b):
        return f"{b / 2**30:.1f}"

    memory = (
        f"{gib(torch.cuda.max_memory_allocated(device))}/{gib(torch.cuda.max_memory_reserved(device))}"
        if device.type == "cuda"
        else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 2**20
    )
    return [
        name,
        1000 * s,
        args.batch_size / s,
        memory,
        flops / s / 1e12,
        util(flops),
        util(flops + recomputed * ckpt),
        flops / args.batch_size / 1e9,
    ]


def bench_train(args, device):
    rows = []
    for ckpt in (False, True):
        if device.type == "cuda":
            rows.append(train_row(args, device, ckpt))
            gc.collect()  # the last row's model and optimizer state must be gone before the next peak is read
            torch.cuda.empty_cache()
        else:  # ru_maxrss is a high-water mark that never comes down: each CPU row gets a fresh process
            with multiprocessing.get_context("spawn").Pool(1) as pool:
                rows.append(pool.apply(train_row, (args, device, ckpt)))
    memory = (
        "peak GiB allocated/reserved (torch.cuda)"
        if device.type == "cuda"
        else "peak RSS growth GiB of a fresh process (getrusage ru_maxrss)"
    )
    table(
        f"training step: {args.vla_path or f'random {args.model} twin'}, "
        f"{'bf16 autocast' if device.type == 'cuda' else 'float32'}, batch {args.batch_size}, {args.cameras} "
        f"cameras, LoRA rank {args.lora_rank}, AdamW",
        ["config", "step ms", "samples/s", "memory", "TFLOP/s", "MFU %", "HFU %", "GFLOP/sample"],
        rows,
        [
            f"median of {args.iters} steps after {args.warmup} warm-up steps; memory: {memory}, weights included",
            f"MFU: model FLOPs / step time / peak ({args.peak_source}); per part: --what flops",
            *FLOPS_FORMULA,
        ],
    )


RECIPE_MODES = {
    "float32": dict(dtype=torch.float32, compiled=False),
    "bf16 (train.py --dtype bfloat16)": dict(dtype=torch.bfloat16, compiled=False),
    "float32, torch.compile": dict(dtype=torch.float32, compiled=True),
    "bf16, torch.compile": dict(dtype=torch.bfloat16, compiled=True),
}


def recipe_step(dtype, compiled, batch_size, lora_rank):
    """One training step of aloha/train.sh's recipe on the tiny twin: one 240x320 camera, --attention full,
    --no-image_aug, LoRA, AdamW. bf16 is what train.py --dtype bfloat16 does: the frozen base in bf16 and bf16
    autocast, LoRA and head in float32."""
    tok = demo.make_tokenizer()
    vla = model.VLA.from_config(demo.tiny_config(tok), dtype, "cpu", tokenizer=tok, attention="full")
    vla = model.add_lora(vla, lora_rank).train()
    forward = torch.compile(vla) if compiled else vla
    autocast = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else nullcontext()
    opt = torch.optim.AdamW([p for p in vla.parameters() if p.requires_grad], lr=2e-4, weight_decay=0.01)
    images = torch.randint(0, 256, (batch_size, 1, 3, 240, 320), dtype=torch.uint8)
    target = torch.rand(batch_size, vla.chunk, vla.action_dim) * 2 - 1

    def step():
        with autocast:
            pred = forward(images, ["transfer the cube"] * batch_size)
        train.l1_terms(pred, target)[0].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def bench_recipe(args, device):
    """The recipe's step in each mode, the modes alternated round by round in one process, so that a machine whose
    load changes slows them alike; the median over rounds."""
    steps, warm = {}, {}
    for name, mode in RECIPE_MODES.items():
        steps[name] = recipe_step(mode["dtype"], mode["compiled"], args.batch_size, args.lora_rank)
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            steps[name]()
        warm[name] = time.perf_counter() - t0
    times = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():
            times[name].extend(timed(step, device, 0, args.iters)[0])
    base = float(np.median(times["float32"]))
    rows = []
    for name in steps:
        s = float(np.median(times[name]))
        rows.append([name, 1000 * s, args.batch_size / s, base / s, warm[name]])
    table(
        f"aloha/train.sh's training step on the CPU: tiny twin, batch {args.batch_size}, 1 camera 240x320, attention "
        f"full, LoRA rank {args.lora_rank}, {torch.get_num_threads()} thread(s)",
        ["mode", "step ms", "samples/s", "speed-up", "warm-up s"],
        rows,
        [
            f"median of {args.repeats} rounds x {args.iters} steps, modes alternated each round, after {args.warmup} "
            f"warm-up steps each (compilation included in warm-up s); load average {os.getloadavg()[0]:.1f}",
        ],
    )


def bench_infer(args, device):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    # a training checkpoint's LoRA (random here: merged or not it costs the same), then folded in as Policy does
    vla = model.add_lora(build(args, device, dtype), args.lora_rank).eval()
    images, instructions = inputs(args, 1, device)
    rows = []
    for name in ["eager, LoRA unmerged", "eager, LoRA merged"] + [
        f"torch.compile ({args.compile_mode}), merged"
    ] * args.compile:
        if name == "eager, LoRA merged":
            model.merge_lora(vla)

        @torch.no_grad()
        def chunk():  # as infer.Policy.predict: frames from host memory in, a float32 chunk back on the host
            with autocast:
                return net(images, instructions).float().cpu()

        try:
            net = vla if name.startswith("eager") else torch.compile(vla, mode=args.compile_mode)
            times, warm = timed(chunk, device, args.warmup, args.iters)
        except Exception as e:  # inductor may lack a compiler or support here: report it, measure the rest
            rows.append([name, f"failed: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}"])
            continue
        ms = 1000 * times
        rows.append([name, float(np.percentile(ms, 50)), float(np.percentile(ms, 95)), 1000 / ms.mean(), warm])
    table(
        f"inference: {args.vla_path or f'random {args.model} twin'}, LoRA rank {args.lora_rank}, {dtype}, batch 1, "
        f"{args.cameras} cameras, chunk {vla.chunk} x {vla.action_dim}",
        ["path", "p50 ms", "p95 ms", "chunks/s", "warm-up s"],
        rows,
        [
            f"{args.iters} chunks after {args.warmup} warm-up chunks (compilation happens there); "
            f"{'CUDA events' if device.type == 'cuda' else 'perf_counter'}, synchronized; chunks/s = 1 / mean",
            f"merged / unmerged p50: {rows[1][1] / rows[0][1]:.2f} (infer.Policy merges a training checkpoint's LoRA)",
        ],
    )


def serve_checkpoint(args, root):
    if args.checkpoint:
        return args.checkpoint
    demo.make_demo(os.path.join(root, "demo"), episodes=2)
    demo.make_tiny(os.path.join(root, "tiny"))
    flags = [
        "--vla_path",
        os.path.join(root, "tiny"),
        "--data_dir",
        os.path.join(root, "demo"),
        "--out_dir",
        os.path.join(root, "run"),
        "--cameras",
        ",".join(data.ALL_CAMERAS[: args.cameras]),
        "--lora_rank",
        str(args.lora_rank),
        "--val_episodes",
        "1",
        "--batch_size",
        "2",
        "--num_workers",
        "0",
        "--max_steps",
        "1",
        "--save_interval",
        "1",
        "--eval_interval",
        "1",
        "--eval_batches",
        "1",
        "--device",
        "cpu",
    ]
    subprocess.run([sys.executable, os.path.join(HERE, "train.py"), *flags], check=True, capture_output=True)
    return os.path.join(root, "run", "step_000001")


def bench_serve(args, device):
    """The chunk as a robot gets it from serve.py over loopback with openpi's client, against Policy.predict in
    process on the same observation, alternating call by call so that both see the same machine (this process holds
    a second copy of the model). What the protocol costs (msgpack, websocket, the worker thread) is the round trip
    less the server's own infer_ms of the same call."""
    try:
        from openpi_client import websocket_client_policy  # the robot's side: only this mode needs it
    except ImportError:
        raise SystemExit(
            "--what serve talks to serve.py with openpi's client: pip install -r requirements-serve.txt "
            "&& pip install --no-deps openpi-client==0.1.2"
        ) from None
    with tempfile.TemporaryDirectory() as root:
        ckpt = serve_checkpoint(args, root)
        with open(os.path.join(root, "serve.log"), "w") as log:
            server = subprocess.Popen(
                [
                    sys.executable,
                    os.path.join(HERE, "serve.py"),
                    "--checkpoint",
                    ckpt,
                    "--port",
                    "0",
                    "--device",
                    str(device),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            policy = infer.Policy.from_checkpoint(ckpt, device=str(device))
            deadline = time.time() + 900  # a 7B checkpoint loads for minutes
            while not (port := re.search(r" on ws://127\.0\.0\.1:(\d+) ", open(log.name).read())):
                if server.poll() is not None or time.time() > deadline:
                    raise SystemExit(f"serve.py did not start:\n{open(log.name).read()[-2000:]}")
                time.sleep(0.2)
            client = websocket_client_policy.WebsocketClientPolicy("127.0.0.1", int(port[1]))
            rng = np.random.default_rng(0)
            obs = {
                "images": {c: rng.integers(0, 256, (256, 256, 3), dtype=np.uint8) for c in policy.cameras},
                "prompt": demo.SEEN[0],
            }
            obs |= {"state": np.zeros(policy.vla.proprio_dim)} if policy.vla.proprio_dim else {}
            ms = []
            for _ in range(args.warmup + args.iters):  # predict's copy to the host waits for the GPU: host time
                t0 = time.perf_counter()
                policy.predict(obs["images"], obs["prompt"], obs.get("state"))
                t1 = time.perf_counter()
                inside = client.infer(obs)["server_timing"]["infer_ms"]
                ms.append([1000 * (t1 - t0), inside, 1000 * (time.perf_counter() - t1)])
        finally:
            server.terminate()
            server.wait(60)
    ms = np.array(ms[args.warmup :])
    rows = [
        [name, *(float(f(ms[:, i])) for f in (np.median, lambda x: np.percentile(x, 95), np.mean))]
        for i, name in enumerate(
            [
                "Policy.predict in process",
                "serve.py infer_ms (predict in its thread)",
                "round trip, openpi-client over loopback",
            ]
        )
    ]
    table(
        f"serving: {args.checkpoint or 'tiny twin, 1 training step'}, {len(policy.cameras)} camera(s) "
        f"({', '.join(policy.cameras)}) at 256x256, chunk {policy.vla.chunk} x {policy.vla.action_dim}, {device}",
        ["path", "p50 ms", "p95 ms", "mean ms"],
        rows,
        [
            f"{args.iters} pairs (predict, then the round trip) after {args.warmup} warm-up pairs, perf_counter, the "
            f"same observation every time; what the protocol adds, round trip - infer_ms of the same call: p50 "
            f"{np.median(ms[:, 2] - ms[:, 1]):.1f} ms, p95 {np.percentile(ms[:, 2] - ms[:, 1], 95):.1f} ms; load "
            f"average {os.getloadavg()[0]:.1f}"
        ],
    )


# -----------------------------------------------------------------------------
# the rehearsal: OpenVLA-7B's shapes through every command, each command's peak RSS


def rehearsal_notes(report, estimate):
    """What the rows do not show: the target, the training step against the memory model, Policy's seconds and
    the agreements."""
    weights, rows = report["weights"], report["rows"]
    notes = [
        f"weights: {weights / GB:.2f} GB of bf16 tensors in {rehearsal.SHARDS} shards; target: every peak RSS <= "
        f"{rehearsal.TARGET[0]} x weights + {rehearsal.TARGET[1] / GB:.0f} GB = {report['target'] / GB:.1f} GB; "
        "GB = 2^30 B",
        "peak RSS: ru_maxrss of each command's own process (spawned by a 10 MB launcher, so that it starts from 0); "
        "the checkpoint is written by this process (its high-water mark, the memory model's run included); "
        "Policy.predict and serve.py pinned to one core (comparable sums); checked first: "
        f"{report['ram'] / GB:.1f} GB of memory available, {report['disk'] / GB:.1f} GB of disk free",
    ]
    train_row = next((r for r in rows if r.name == "train.py" and r.rc == 0), None)
    if train_row:
        trains = sum(estimate[k] for k in ("trainable weights", "gradients", "AdamW state"))
        notes += [
            f"train.py: step seconds {', '.join(f'{s:.1f}' for s in report['step seconds'])} (steps 1-2, then 3 "
            f"resumed); the memory model's estimate of its step (batch 1, grad ckpt, 2 cameras, {PROMPT_LEN}-token "
            f"prompt, LoRA r32, bf16 base): {estimate['total'] / GB:.2f} GB (weights "
            f"{estimate['frozen weights'] / GB:.2f}, LoRA + head with gradients and AdamW {trains / GB:.2f}, "
            f"activations {estimate['activations'] / GB:.2f})",
            f"train.py's measured peak RSS {train_row.rss / GB:.2f} GB: {(train_row.rss - estimate['total']) / GB:+.2f}"
            " GB beside the estimate, the process's own (Python, torch, transformers, the data, allocator slack)",
        ]
    for name in ("checkpoint", "export"):
        if f"{name} seconds" in report:
            t = report[f"{name} seconds"]
            notes.append(f"Policy ({name}): loads in {t['load_s']:.1f} s, one chunk in {t['predict_s']:.1f} s")
    for key, what in [("predict diff", "checkpoint vs export"), ("serve diff", "serve.py vs Policy.predict")]:
        if key in report:
            notes.append(
                f"{what}: max |difference| {report[key]:.3g} in normalized action units "
                f"(tolerance {rehearsal.TOLERANCE:.3g})"
            )
    for row in rows:
        if row.last_lines:
            notes.append(f"{row.name} failed; the end of its output:\n" + "\n".join(row.last_lines))
    return notes


def bench_rehearsal(args, device):
    """rehearsal.py's commands on this CPU, one row each; exits 1 unless every step ran, fit and agreed."""
    config, tok = rehearsal.base_config(args.model, args.llm_layers)
    # train.py's step as the rehearsal runs it (LoRA rank 32 is its default; augmentation is on by default)
    estimate = estimate_memory(config, 1, True, 2, PROMPT_LEN, 32, image_aug=True)
    report = rehearsal.rehearse(config, tok, args.dir, args.keep, estimate)
    rows = report["rows"]
    layers = model.LlamaConfig(**config["text_config"]).num_hidden_layers
    table(
        f"rehearsal: random {args.model} twin ({layers} LLM layers), bf16, CPU, {args.dir}"
        f"{' (kept)' if args.keep else ' (removed)'}",
        ["step", "wall s", "peak RSS GB", "weights GB", "RSS / weights", "status"],
        [
            [r.name, r.wall, r.rss / GB, report["weights"] / GB, r.rss / report["weights"], "ok" if r.ok else r.note]
            for r in rows
        ]
        + [[name, "not run"] for name in rehearsal.STEPS[len(rows) :]],
        rehearsal_notes(report, estimate),
    )
    n = len(rehearsal.STEPS)
    ok = sum(r.ok for r in rows)
    peak = max(r.rss for r in rows) / GB
    print(f"rehearsal: {ok} of {n} steps ok, peak RSS {peak:.1f} GB (weights {report['weights'] / GB:.1f} GB)")
    if ok != n:
        sys.exit(1)


def main(argv=None):
    args = get_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if args.model == "auto":
        args.model = "7b" if device.type == "cuda" or args.what == "rehearsal" else "tiny"
    if args.llm_layers is not None and args.llm_layers < 1:
        raise SystemExit(f"error: --llm_layers must be at least 1, got {args.llm_layers}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as train.py
    source = "--peak_tflops"
    if args.peak_tflops is None and device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        args.peak_tflops = next((v for k, v in GPU_PEAK_TFLOPS.items() if k in name), None)
        source = "bf16 dense spec" if args.peak_tflops else f"no spec known for {name}: pass --peak_tflops"
    elif args.peak_tflops is None:  # no spec number fits a CPU: the best fp32 matmul rate at this thread count
        a = torch.randn(1024, 1024)
        args.peak_tflops = 2 * 1024**3 / timed(lambda: a @ a, device, 2, 20)[0].min() / 1e12
        source = "measured fp32 1024^2 matmul"
    args.peak_source = f"{args.peak_tflops:.4g} TFLOP/s, {source}" if args.peak_tflops else source
    print(f"machine: {machine(device)}")
    for what in [args.what] if args.what != "all" else ["data", "train", "infer"]:
        try:
            dict(
                flops=bench_flops,
                memory=bench_memory,
                data=bench_data,
                train=bench_train,
                recipe=bench_recipe,
                infer=bench_infer,
                serve=bench_serve,
                rehearsal=bench_rehearsal,
            )[what](args, device)
        except data.DataError as e:  # no episodes: say how to make some, measure the rest
            print(f"\n## data loader: {e}\n(make episodes with: python demo.py {args.data_dir})")


if __name__ == "__main__":
    main()
