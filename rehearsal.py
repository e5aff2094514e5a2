"""
The full-size rehearsal behind `python bench.py --what rehearsal`: a random-weight OpenVLA-7B checkpoint written in
the published layout, then the real commands against it, each in its own process, timed, with its peak RSS:
train.py, train.py --resume auto, merge.py, Policy.predict on the training checkpoint and on the merged export, and
serve.py answering one openpi-client request over loopback. bench.py prints the table (see docs/rehearsal.md).

    python bench.py --what rehearsal                      # OpenVLA-7B: ~33 GB of disk under out/rehearsal, ~19 GB RAM
    python bench.py --what rehearsal --dir /big/r --keep  # keep the checkpoint, the runs and the logs
    python bench.py --what rehearsal --llm_layers 2       # 7B width, full towers, 2 LLM layers: ~3 GB of weights
    python bench.py --what rehearsal --model tiny         # the tiny twin through the same path (the CI test)

The checkpoint is written tensor by tensor (never more than one tensor in memory): config.json, 3 safetensors shards
and model.safetensors.index.json, the tokenizer files with Llama-2's vocabulary size, preprocessor_config.json.
Internal: `python rehearsal.py predict CKPT OUT` is the Policy.predict step's own process.
"""

import json
import math
import os
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import torch
from tokenizers import Tokenizer

import data
import demo
import infer
import merge
import model

HERE = os.path.dirname(os.path.abspath(__file__))
GB = 2**30  # as bench.py's memory model
SHARDS = 3  # openvla/openvla-7b's count (model-0000N-of-00003.safetensors); its exact split is not known here
VOCAB = 32000  # Llama-2's SentencePiece pieces; OpenVLA adds <PAD> as id 32000 and pads the embeddings to 32064
TARGET = (1.3, 2 * GB)  # every step's peak RSS at most 1.3 x the bf16 weights + 2 GB: never two copies of the model
# what a process holds besides its tensors, the memory check's margin: Python, torch and transformers (0.4-0.6 GB),
# and in train.py glibc's heap keeping freed tensors' memory (its mmap threshold rises as big blocks are freed): the
# step measured 0.6 GB over the memory model at 7B width with 2 LLM layers, 0.8 with 8, about 1.8 projected at 32
RUNTIME = 2 * GB
DISK_MARGIN = 1 * GB  # the demo episodes, the logs, the small files
# Policy.predict on the training checkpoint and on its merged export, in normalized action units ([-1, 1] over each
# dimension's training range). Both run the same bf16 weights (merge.py writes the sums Policy forms when it merges in
# place), so they may differ only by the kernels' summation order: 2^-7, one bf16 step at 1.0. A path that computes
# otherwise fails it: at 7B width with 2 LLM layers, the LoRA left unmerged moved the chunk by 0.065, fp32 weights
# instead of bf16 by 0.057
TOLERANCE = 2**-7
BF16 = ["--dtype", "bfloat16"]  # on a CPU, train.py and serve.py would load float32 weights: 30 GB at 7B
# train.py's flags for both runs: the brief's, plus one validation episode and batch (the evaluation path, cheaply)
TRAIN_FLAGS = BF16 + [
    *"--grad_ckpt on --batch_size 1 --save_interval 2 --device cpu --num_workers 0".split(),
    *"--val_episodes 1 --eval_batches 1 --log_interval 1".split(),
]
RESUME = "train.py --resume auto"
STEPS = [  # in order; the rehearsal stops at the first that fails
    "write checkpoint",
    "train.py",
    RESUME,
    "merge.py",
    "Policy.predict (checkpoint)",
    "Policy.predict (export)",
    "serve.py + 1 request",
]

# -----------------------------------------------------------------------------
# the checkpoint


def widened_tokenizer():
    """demo.py's tokenizer at Llama-2's vocabulary size: filler pieces no merge can produce take the ids up to 32000,
    and <PAD> becomes id 32000 as in openvla/openvla-7b. Prompts tokenize exactly as with demo's tokenizer."""
    spec = json.loads(demo.make_tokenizer().to_str())
    vocab = spec["model"]["vocab"]
    vocab |= {f"<filler_{i}>": i for i in range(len(vocab), VOCAB)}
    next(t for t in spec["added_tokens"] if t["content"] == "<PAD>")["id"] = VOCAB
    return Tokenizer.from_str(json.dumps(spec))


def base_config(which, llm_layers=None):
    """(config.json, tokenizer) of the checkpoint to write: openvla/openvla-7b's, or the tiny twin's at the widened
    vocabulary; llm_layers keeps only that many LLM layers (the towers and every width stay)."""
    tok = widened_tokenizer()
    config = demo.openvla_7b_config() if which == "7b" else demo.tiny_config(tok)
    if llm_layers:
        config["text_config"] = config["text_config"] | {"num_hidden_layers": llm_layers}
    return config, tok


def unread_shapes(vla):
    """The tower tensors a real checkpoint holds and OpenVLA never reads (model.skipped_prefixes): each tower's last
    block, its final norm and SigLIP's attention pool, as timm names and shapes them."""
    shapes = {}
    for name, tid in zip(model.TOWERS, vla.config["timm_model_ids"]):
        spec, w, prefix = model.VIT[tid], model.VIT[tid]["width"], f"vision_backbone.{name}."
        block = vla.vision_backbone[name].blocks[0].state_dict()
        shapes |= {f"{prefix}blocks.{spec['depth'] - 1}.{k}": tuple(v.shape) for k, v in block.items()}
        shapes |= {f"{prefix}norm.weight": (w,), f"{prefix}norm.bias": (w,)}
        if spec["attn_pool"]:
            pool = {"latent": (1, 1, w), "q.weight": (w, w), "kv.weight": (2 * w, w), "proj.weight": (w, w)}
            pool |= {"mlp.fc1.weight": (spec["mlp"], w), "mlp.fc2.weight": (w, spec["mlp"])}
            pool |= {f"{k}.bias": (n,) for k, n in [("q", w), ("kv", 2 * w), ("proj", w), ("norm", w)]}
            pool |= {"norm.weight": (w,), "mlp.fc1.bias": (spec["mlp"],), "mlp.fc2.bias": (w,)}
            shapes |= {f"{prefix}attn_pool.{k}": s for k, s in pool.items()}
    return shapes


def published_shapes(config):
    """Name -> shape of every tensor in the published checkpoint for `config`: the VLA's state on the meta device
    (no memory; the action head is nanoOFT's, not OpenVLA's) and the unread tower tensors."""
    vla = model.VLA._meta(config, torch.bfloat16, None, None, {})
    own = {k: tuple(v.shape) for k, v in vla.state_dict().items() if not k.startswith(model.HEAD)}
    return own | unread_shapes(vla)


def split_shards(shapes, n=SHARDS):
    """Consecutive names in n groups of about equal bf16 bytes, as a sharded save_pretrained splits them."""
    sizes = {k: 2 * math.prod(s) for k, s in shapes.items()}
    total, done, groups = sum(sizes.values()), 0, [{} for _ in range(n)]
    for k, s in shapes.items():
        groups[min(n - 1, done * n // total)][k] = s
        done += sizes[k]
    return [g for g in groups if g]


def write_safetensors(path, shapes, make, metadata=None):
    """A bf16 safetensors file written one tensor at a time (make(name, shape) -> tensor, freed once written): the
    bytes safetensors' save_file writes for the same dict (tensors in name order, the JSON header padded with spaces
    to 8 bytes), without ever holding the dict."""
    header, offset = ({"__metadata__": metadata} if metadata else {}), 0
    for name in sorted(shapes):
        size = 2 * math.prod(shapes[name])
        header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name in sorted(shapes):
            t = make(name, shapes[name])
            if t.dtype != torch.bfloat16 or tuple(t.shape) != tuple(shapes[name]):
                raise ValueError(f"{name}: made {t.dtype} {tuple(t.shape)}, the header says bf16 {shapes[name]}")
            f.write(memoryview(t.contiguous().view(torch.int16).numpy()))  # the raw bytes, no copy


def random_tensor(name, shape):
    """As VLA.from_config initializes: biases 0, norms and layer scales 1, the rest N(0, 0.02), here in bf16."""
    t = torch.empty(shape, dtype=torch.bfloat16)
    model.init_weights([(name, t)])
    return t


def write_tokenizer(tok, config, out_dir):
    """tokenizer.json and the small files beside it, as the published checkpoint has them (no tokenizer.model:
    nanoOFT reads tokenizer.json only)."""
    merge.write_tokenizer_files(tok, config, out_dir)
    with open(os.path.join(out_dir, "added_tokens.json"), "w") as f:
        json.dump({"<PAD>": tok.token_to_id("<PAD>")}, f, indent=2)


def write_checkpoint(config, tok, out_dir, seed=0):
    """The published layout with random weights, shard by shard and tensor by tensor. -> the weights' bytes."""
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(seed)
    shards = split_shards(published_shapes(config))
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shapes in zip(names, shards):
        write_safetensors(os.path.join(out_dir, name), shapes, random_tensor, {"format": "pt"})
    total = sum(2 * math.prod(s) for shapes in shards for s in shapes.values())
    index = {
        "metadata": {"total_size": total},
        "weight_map": {k: name for name, shapes in zip(names, shards) for k in sorted(shapes)},
    }
    for file, obj in [
        ("model.safetensors.index.json", index),
        ("config.json", config),
        ("preprocessor_config.json", model.default_preprocessor(config)),
    ]:
        with open(os.path.join(out_dir, file), "w") as f:
            json.dump(obj, f, indent=2)
    write_tokenizer(tok, config, out_dir)
    return total


# -----------------------------------------------------------------------------
# the machine


def mem_available():
    """Bytes the kernel can hand out without swapping (/proc/meminfo's MemAvailable)."""
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def disk_free(path):
    """Free bytes on the disk that holds `path` (or would hold it: its nearest existing parent)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free


def needs(weights, trainable, train_estimate):
    """(RAM, disk) bytes the rehearsal needs. RAM: its largest step, training (the memory model's estimate for batch
    1 with grad ckpt) or a load of the weights, plus RUNTIME. Disk: the base and the export, and two training
    checkpoints (adapter + head, and AdamW's two moments: 3 x what trains, in float32)."""
    return max(train_estimate, weights) + RUNTIME, 2 * weights + 2 * 3 * trainable + DISK_MARGIN


def check_machine(root, ram, disk):
    """One line and no write when --dir is in use or the machine is too small."""
    if os.path.exists(root) and (not os.path.isdir(root) or os.listdir(root)):
        raise SystemExit(f"error: --dir {root}: exists and is not an empty directory; pass a new one")
    free, avail = disk_free(root), mem_available()
    if free < disk:
        raise SystemExit(
            f"error: --dir {root}: {free / GB:.1f} GB free on its disk, the rehearsal writes {disk / GB:.1f} GB "
            "(the base and the merged export, two training checkpoints): pass a --dir on a bigger disk"
        )
    if avail < ram:
        raise SystemExit(
            f"error: this machine has {avail / GB:.1f} GB of memory available (MemAvailable), the rehearsal's "
            f"largest step needs {ram / GB:.1f} GB: free some, or run it on a bigger machine"
        )


# -----------------------------------------------------------------------------
# the steps, each in its own process


def observation(cameras):
    """The one observation every prediction gets: seeded random 256x256 frames for the policy's cameras."""
    rng = np.random.default_rng(0)
    return {c: rng.integers(0, 256, (256, 256, 3), dtype=np.uint8) for c in cameras}, demo.SEEN[0]


def predict_main(ckpt, out):
    """The Policy.predict step: load (bf16 on the CPU; merging a training checkpoint's LoRA), one chunk -> OUT.npy,
    and the seconds of each part -> OUT.json."""
    torch.set_num_threads(infer.cpu_threads())  # as serve.py does: pinned to one core, both take one thread
    t0 = time.perf_counter()
    policy = infer.Policy.from_checkpoint(ckpt, device="cpu", dtype=torch.bfloat16)
    t1 = time.perf_counter()
    actions = policy.predict(*observation(policy.cameras))
    np.save(out + ".npy", actions)
    with open(out + ".json", "w") as f:
        json.dump({"load_s": t1 - t0, "predict_s": time.perf_counter() - t1}, f)


# Each command runs under this small launcher, which reads its peak RSS: Linux starts a child's ru_maxrss at the RSS
# of the process it was spawned from (exec keeps the larger), and the rehearsal's own process holds torch and the
# demo's buffers; the launcher holds ~10 MB. It pins the command to the cores given ("" for all), passes SIGTERM on
# (serve.py's stop), and a command killed by signal N exits 128 + N.
LAUNCHER = """
import os, signal, subprocess, sys
if sys.argv[2]:
    os.sched_setaffinity(0, [int(c) for c in sys.argv[2].split(",")])
child = subprocess.Popen(sys.argv[3:])
signal.signal(signal.SIGTERM, lambda sig, frame: child.send_signal(sig))
_, status, usage = os.wait4(child.pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss * 1024))
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


def one_core():
    """The core Policy.predict and serve.py are pinned to. The chunks compared must come from the same sums, and a
    bf16 forward's sums depend on the thread count (at 7B width with 2 LLM layers, 1 and 2 threads differ by 0.06):
    serve.py picks its threads from the free cores (infer.cpu_threads), and on one core both take one thread."""
    return str(min(os.sched_getaffinity(0)))


class Step:
    """One command's row: wall seconds, peak RSS in bytes (of that command's process alone), exit status."""

    def __init__(self, name, log):
        self.name, self.log, self.wall, self.rss, self.rc, self.note, self.last_lines = name, log, 0.0, 0, None, "", []

    def start(self, cmd, cores=""):
        self.t0 = time.perf_counter()
        launch = [sys.executable, "-S", "-c", LAUNCHER, self.log + ".rss", cores, sys.executable, *map(str, cmd)]
        with open(self.log, "w") as f:
            env = os.environ | {"PYTHONUNBUFFERED": "1"}
            self.proc = subprocess.Popen(launch, stdout=f, stderr=subprocess.STDOUT, env=env)
        return self

    def wait(self, block=True):
        """The command's end; None while it runs and block is False."""
        if block:
            self.proc.wait()
        elif self.proc.poll() is None:
            return None
        self.wall, self.rc = time.perf_counter() - self.t0, self.proc.returncode
        if os.path.exists(self.log + ".rss"):
            with open(self.log + ".rss") as f:
                self.rss = int(f.read())
        if self.rc:  # the end of its output, kept for the report: the log goes with --dir unless --keep
            self.last_lines = self.output().strip().splitlines()[-15:]
            self.note = f"exit {self.rc}: {self.last_lines[-1][:200] if self.last_lines else 'no output'}"
        return self

    def output(self):
        with open(self.log) as f:
            return f.read()

    def fail(self, why):
        self.note = self.note or why
        return self

    @property
    def ok(self):
        return self.rc == 0 and not self.note


def run(name, cmd, logs, cores=""):
    """One command to its end, its output in logs/<name>.log."""
    return Step(name, os.path.join(logs, re.sub(r"\W+", "-", name).strip("-") + ".log")).start(cmd, cores).wait()


def serve_step(export, logs, cameras, deadline=3600):
    """serve.py on the export answers one openpi-client request from 127.0.0.1; then SIGTERM. -> (step, actions)."""
    from openpi_client import websocket_client_policy  # requirements-serve.txt; only this step needs it

    step = Step(STEPS[-1], os.path.join(logs, "serve.log"))
    serve = [os.path.join(HERE, "serve.py"), "--checkpoint", export, "--port", "0", "--device", "cpu"] + BF16
    step.start(serve, one_core())
    actions = None
    try:
        while not (port := re.search(r" on ws://127\.0\.0\.1:(\d+) ", step.output())):
            if step.wait(block=False) or time.perf_counter() - step.t0 > deadline:
                return step.fail("serve.py did not start serving"), None
            time.sleep(0.5)
        images, prompt = observation(cameras)
        client = websocket_client_policy.WebsocketClientPolicy("127.0.0.1", int(port[1]))
        actions = client.infer({"images": images, "prompt": prompt})["actions"]
    except Exception as e:  # the server answered with an error frame, or the connection broke
        step.fail(f"the request failed: {type(e).__name__}: {e}")
    finally:
        if step.rc is None:
            step.proc.send_signal(signal.SIGTERM)
            step.wait()
    return step, actions


def disagreement(a, b, ckpt):
    """max |a - b| of two raw chunks in the checkpoint's normalized units."""
    args = model.read_json(os.path.join(ckpt, "args.json"))
    stats = data.load_stats(os.path.join(ckpt, "dataset_statistics.json"))
    return float(np.abs(data.normalize(a, stats, args["norm"]) - data.normalize(b, stats, args["norm"])).max())


def train_steps(root, base, logs, rows):
    """train.py for 2 steps, then --resume auto to 3, on 2-camera demo episodes. -> train.py's step seconds."""
    demo.make_demo(os.path.join(root, "demo"), episodes=2)
    out = os.path.join(root, "run")
    common = [os.path.join(HERE, "train.py"), "--vla_path", base, "--data_dir", os.path.join(root, "demo")]
    common += ["--out_dir", out, "--cameras", ",".join(data.ALL_CAMERAS[:2]), *TRAIN_FLAGS]
    rows.append(run("train.py", common + ["--max_steps", "2"], logs))
    if rows[-1].ok:
        rows.append(run(RESUME, common + ["--max_steps", "3", "--resume", "auto"], logs))
    if not os.path.exists(os.path.join(out, "metrics.jsonl")):
        return []
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [row["ms"] / 1000 for row in map(json.loads, f) if "ms" in row]


def predict_steps(ckpt, export, root, logs, rows, found):
    """Policy.predict on the training checkpoint, then on the export: each chunk, its seconds, and how far apart
    the two are. -> the export's chunk, or None when a step failed."""
    chunks = {}
    for name, path in [("checkpoint", ckpt), ("export", export)]:
        out = os.path.join(root, f"predict-{name}")
        cmd = [os.path.abspath(__file__), "predict", path, out]
        rows.append(run(f"Policy.predict ({name})", cmd, logs, one_core()))
        if not rows[-1].ok:
            return None
        chunks[name] = np.load(out + ".npy")
        with open(out + ".json") as f:
            found[f"{name} seconds"] = json.load(f)
    found["predict diff"] = disagreement(chunks["checkpoint"], chunks["export"], ckpt)
    if found["predict diff"] > TOLERANCE:
        rows[-1].fail(f"its chunk differs from the checkpoint's by {found['predict diff']:.3g} > {TOLERANCE:.3g}")
        return None
    return chunks["export"]


def later_steps(root, base, logs, rows):
    """train, resume, merge, predict on both, serve, appended to rows as they run, stopping at the first that fails.
    -> what the rows do not show: train.py's step seconds, Policy's load and predict seconds, the two agreements."""
    found = {"step seconds": train_steps(root, base, logs, rows)}
    ckpt, export = os.path.join(root, "run", "step_000003"), os.path.join(root, "export")
    if not (rows[-1].ok and rows[-1].name == RESUME):
        return found
    rows.append(run("merge.py", [os.path.join(HERE, "merge.py"), ckpt, "--out", export, "--device", "cpu"], logs))
    chunk = predict_steps(ckpt, export, root, logs, rows, found) if rows[-1].ok else None
    if chunk is None:
        return found
    cameras = model.read_json(os.path.join(export, "args.json"))["cameras"].split(",")
    step, served = serve_step(export, logs, cameras)
    rows.append(step)
    if served is not None:
        found["serve diff"] = disagreement(served, chunk, ckpt)
        if found["serve diff"] > TOLERANCE:
            step.fail(f"its chunk differs from Policy.predict's by {found['serve diff']:.3g} > {TOLERANCE:.3g}")
    return found


def remove_written(root, made):
    """Everything the rehearsal wrote: --dir itself when the rehearsal made it, else what it put into the empty one."""
    if made:
        shutil.rmtree(root)
        return
    for entry in os.listdir(root):
        path = os.path.join(root, entry)
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)


def rehearse(config, tok, root, keep, estimate):
    """The machine checked, the checkpoint written (in this process), then every command in its own process.
    estimate: the memory model's parts of train.py's step (batch 1, grad ckpt). -> the rows and findings."""
    weights = sum(2 * math.prod(s) for s in published_shapes(config).values())
    ram, disk = needs(weights, estimate["trainable weights"], estimate["total"])
    check_machine(root, ram, disk)
    made, logs, base = not os.path.exists(root), os.path.join(root, "logs"), os.path.join(root, "base")
    os.makedirs(logs, exist_ok=True)
    report = {"weights": weights, "target": TARGET[0] * weights + TARGET[1], "ram": ram, "disk": disk, "rows": []}
    try:
        write = Step(STEPS[0], None)
        write.t0 = time.perf_counter()
        try:
            write_checkpoint(config, tok, base)
        except OSError as e:  # the disk filled after all (another writer), or --dir went away: what was written goes
            raise SystemExit(f"error: writing the checkpoint into {base}: {e}") from None
        write.wall, write.rc = time.perf_counter() - write.t0, 0
        write.rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # this process's high-water mark
        report["rows"].append(write)
        report |= later_steps(root, base, logs, report["rows"])
    finally:
        if not keep:
            remove_written(root, made)
    for row in report["rows"]:
        if row.rss > report["target"]:
            row.fail(f"peak RSS over {TARGET[0]} x the weights + {TARGET[1] / GB:.0f} GB")
    return report


if __name__ == "__main__":
    if sys.argv[1:2] != ["predict"] or len(sys.argv) != 4:
        raise SystemExit("usage: python rehearsal.py predict CKPT OUT (the rehearsal's own step; see bench.py)")
    predict_main(*sys.argv[2:])
