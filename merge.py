"""
Fold a training checkpoint's LoRA into its base and write a full OpenVLA-format export (+ the head, the statistics
and args.json) that infer.Policy.from_checkpoint and model.VLA.from_pretrained load. One process, no GPU needed:

    python merge.py out/shoe/step_050000 --out out/shoe-merged --device cpu
    python merge.py checkpoints/step-1000 --base openvla/openvla-7b --out out/merged

The export is in the dtype the checkpoint trained in (train.py's --dtype; its auto is bfloat16 on CUDA, float32 on a
CPU), which the last line names; --dtype overrides it. A non-empty --out (another export) is refused unless
--overwrite; an --out inside, or holding, the base or the checkpoint always is.

    from merge import save_pretrained
    save_pretrained(model.merge_lora(vla), "out/export")  # any VLA without adapters (the tiny twin: demo.py --tiny)
"""

import argparse
import json
import os
import shutil

import torch
from safetensors.torch import save_file

import model


def save_pretrained(vla, out_dir, max_shard_bytes=4 << 30):
    """A full OpenVLA-format directory (+ action_head.safetensors) that from_pretrained reloads."""
    if hasattr(vla, "peft_config"):
        raise ValueError("the model still has LoRA adapters: merge_lora(vla) before save_pretrained")
    os.makedirs(out_dir, exist_ok=True)
    for f in os.listdir(out_dir):  # stale shards of an earlier export would be picked up by the loader
        if f.startswith("model") and (f.endswith(".safetensors") or f.endswith(".index.json")):
            os.remove(os.path.join(out_dir, f))
    shards, size = [{}], 0
    for k, v in vla.state_dict().items():
        if k.startswith(model.HEAD):
            continue
        if size + v.nbytes > max_shard_bytes and shards[-1]:
            shards, size = shards + [{}], 0
        shards[-1][k], size = v.detach().contiguous(), size + v.nbytes
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for name, shard in zip(names, shards):
        save_file(shard, os.path.join(out_dir, name), metadata={"format": "pt"})
    if len(shards) > 1:
        index = dict(
            metadata=dict(total_size=sum(v.nbytes for s in shards for v in s.values())),
            weight_map={k: name for name, s in zip(names, shards) for k in s},
        )
        _write_json(os.path.join(out_dir, "model.safetensors.index.json"), index)
    write_tokenizer_files(vla.tokenizer, vla.config, out_dir)
    for name, obj in [("config.json", vla.config), ("preprocessor_config.json", vla.preprocessor)]:
        _write_json(os.path.join(out_dir, name), obj)
    model.save_head(vla, os.path.join(out_dir, "action_head.safetensors"))


def write_tokenizer_files(tokenizer, config, out_dir):
    """tokenizer.json and the Llama tokenizer's config files beside it, as an OpenVLA checkpoint has them."""
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    special = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<PAD>")
    tokenizer_config = dict(
        tokenizer_class="LlamaTokenizer",
        add_bos_token=True,
        add_eos_token=False,
        legacy=False,
        model_max_length=config["llm_max_length"],
        padding_side="right",
        **special,
    )
    _write_json(os.path.join(out_dir, "special_tokens_map.json"), special)
    _write_json(os.path.join(out_dir, "tokenizer_config.json"), tokenizer_config)


def _write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def check_out(path, flag, overwrite):
    """Refuses, in one line naming it, a `path` that is a file or a non-empty directory unless --overwrite: nothing
    already saved there (another export, a checkpoint's head, a base's shards) is replaced unasked."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a file, not a directory")
    held = sorted(os.listdir(path)) if os.path.isdir(path) else []
    if held and not overwrite:
        shown = ", ".join(held[:3]) + (f" and {len(held) - 3} more" if len(held) > 3 else "")
        raise ValueError(
            f"{flag} {path} is not empty (it holds {shown}): pass --overwrite to write over it, or another directory"
        )


def trained_dtype(ckpt, train_args):
    """The dtype the checkpoint's frozen base ran in while it trained, and how that is known. args.json records
    train.py's --dtype and --device as typed; --dtype auto is bfloat16 on CUDA and float32 on a CPU, and with --device
    auto whether CUDA was there is read from trainer_state.pt, whose CUDA RNG state train.py saves only with CUDA."""
    dtype, device = train_args.get("dtype"), train_args.get("device")
    if dtype in ("bfloat16", "float32"):
        return dtype, f"--dtype {dtype}"
    if dtype != "auto" or device is None:
        raise ValueError(f"{ckpt}/args.json records no --dtype and --device: pass --dtype")
    if device == "auto":
        path = os.path.join(ckpt, "trainer_state.pt")
        try:
            cuda = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["rng"][0]["cuda"] is not None
        except Exception as e:  # missing, truncated or another layout: an OSError, a pickling or a KeyError
            raise ValueError(f"cannot tell whether {ckpt} trained on CUDA ({path}: {e}): pass --dtype") from None
    else:
        cuda = device.startswith("cuda")
    return ("bfloat16", f"--dtype auto on CUDA (--device {device})") if cuda else ("float32", "--dtype auto on a CPU")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt_dir", metavar="CKPT_DIR", help="save_trained checkpoint whose LoRA to fold into --base")
    ap.add_argument("--base", help="base checkpoint (directory or hub id); default: the one CKPT_DIR trained on")
    ap.add_argument("--out", metavar="DIR", required=True, help="where the merged OpenVLA-format export goes")
    ap.add_argument("--overwrite", action="store_true", help="write over a non-empty --out (another export)")
    ap.add_argument("--device", default="cpu", help="device to merge on (cpu keeps the GPUs free)")
    ap.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        help="dtype of the merged export; default: the one the checkpoint trained in (args.json's --dtype)",
    )
    args = ap.parse_args(argv)
    ckpt = args.ckpt_dir
    try:  # the statistics and run args travel with the weights: both are read before any model loads
        train_args = model.check_checkpoint(ckpt)
        base = args.base or model.trained_base(ckpt, train_args)
        path, out = model.check_base(ckpt, base), os.path.realpath(args.out)
        for d, name in [(path, base), (ckpt, ckpt)]:
            if os.path.commonpath([out, os.path.realpath(d)]) == os.path.realpath(d):
                raise ValueError(f"--out {args.out} is (or is inside) {base} or {ckpt}: pass another --out")
            if os.path.commonpath([out, os.path.realpath(d)]) == out:  # the export would be written beside it
                raise ValueError(f"--out {args.out} holds {name}: pass another --out")
        check_out(args.out, "--out", args.overwrite)
        dtype, why = (args.dtype, "--dtype") if args.dtype else trained_dtype(ckpt, train_args)
    except (OSError, ValueError, RuntimeError) as e:
        raise SystemExit(f"error: {e}")
    vla = model.VLA.from_pretrained(path, getattr(torch, dtype), args.device)
    save_pretrained(model.merge_lora(model.load_trained(vla, ckpt)), args.out)
    for f in ("dataset_statistics.json", "args.json"):
        shutil.copy(os.path.join(ckpt, f), args.out)
    trained = "" if args.dtype else "the dtype it trained in: "
    print(f"merged {ckpt} into {base} -> {args.out}, in {dtype} ({trained}{why})")


if __name__ == "__main__":
    main()
