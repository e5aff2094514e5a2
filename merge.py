"""
Fold a training checkpoint's LoRA into its base and write a full OpenVLA-format export (+ the head, the statistics
and args.json) that infer.Policy.from_checkpoint and model.VLA.from_pretrained load. One process, no GPU needed:

    python merge.py out/shoe/step_050000 --out out/shoe-merged --device cpu
    python merge.py checkpoints/step-1000 --base openvla/openvla-7b --out out/merged
"""
import argparse
import os
import shutil

import torch

import model

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt_dir", help="save_trained checkpoint whose LoRA to fold into --base")
    ap.add_argument("--base", help="base checkpoint (directory or hub id); default: the one CKPT_DIR trained on")
    ap.add_argument("--out", metavar="DIR", required=True, help="where the merged OpenVLA-format export goes")
    ap.add_argument("--device", default="cpu", help="device to merge on (cpu keeps the GPUs free)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                    help="dtype of the merged export")
    args = ap.parse_args()
    ckpt = args.ckpt_dir
    try:  # the statistics and run args travel with the weights: both are read before any model loads
        train_args, _ = (model.read_json(os.path.join(ckpt, f)) for f in ("args.json", "dataset_statistics.json"))
        base = args.base or model.trained_base(ckpt, train_args)
        path, out = model.check_base(ckpt, base), os.path.realpath(args.out)
        if any(os.path.commonpath([out, os.path.realpath(d)]) == os.path.realpath(d) for d in (path, ckpt)):
            raise ValueError(f"--out {args.out} is (or is inside) {base} or {ckpt}: pass another --out")
    except (OSError, ValueError, RuntimeError) as e:
        raise SystemExit(f"error: {e}")
    vla = model.VLA.from_pretrained(path, getattr(torch, args.dtype), args.device)
    model.save_pretrained(model.merge_lora(model.load_trained(vla, ckpt)), args.out)
    for f in ("dataset_statistics.json", "args.json"):
        shutil.copy(os.path.join(ckpt, f), args.out)
    print(f"merged {ckpt} into {base} -> {args.out}")
