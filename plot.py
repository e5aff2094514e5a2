"""
Plot a replay: one panel per action dimension, recorded actions grey, executed blue, from the report.json that
`python infer.py --episode ...` writes.

    python plot.py out/demo/infer/report.json            # -> out/demo/infer/plot.png
"""

import argparse
import json
import os
import sys

import numpy as np
from PIL import Image, ImageDraw

import data


def plot(executed, recorded, names, stats, path, title):
    """One panel per action dimension, recorded (grey) vs executed (blue), on the dimension's range in the training
    data, so that a joint that barely moves looks flat instead of blowing its noise up to full height."""
    cols, pw, ph, pad = 2, 560, 150, 28
    rows = (len(names) + cols - 1) // cols
    img = Image.new("RGB", (cols * pw, rows * ph + 30), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 8), title, fill="black")
    for i, name in enumerate(names):
        x0, y0 = (i % cols) * pw, 30 + (i // cols) * ph
        lo = min(stats["min"][i], recorded[:, i].min(), executed[:, i].min())
        hi = max(stats["max"][i], recorded[:, i].max(), executed[:, i].max())
        span = hi - lo or 1.0
        draw.rectangle([x0 + pad, y0 + 16, x0 + pw - 10, y0 + ph - 10], outline="#bbbbbb")
        draw.text((x0 + pad, y0 + 2), f"{name}   [{lo:.2f}, {hi:.2f}]", fill="black")
        for series, colour in [(recorded[:, i], "#888888"), (executed[:, i], "#1f5fd0")]:
            xs = x0 + pad + np.arange(len(series)) * (pw - pad - 12) / max(len(series) - 1, 1)
            ys = y0 + ph - 12 - (series - lo) / span * (ph - 30)
            draw.line(list(zip(xs.tolist(), ys.tolist())), fill=colour, width=2)
    draw.text((cols * pw - 260, 8), "grey: recorded   blue: executed", fill="black")
    img.save(path)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("report", help="a report.json of infer.py")
    p.add_argument("--out", help="the PNG to write; default: plot.png beside the report")
    args = p.parse_args()
    try:
        with open(args.report) as f:
            result = json.load(f)
        stats = data.load_stats(os.path.join(result["checkpoint"], "dataset_statistics.json"))
        executed, recorded = np.array(result["executed"]), np.array(result["recorded"])
    except (OSError, ValueError, KeyError) as e:  # data.DataError is a ValueError
        sys.exit(f"error: {args.report}: not a readable infer.py report with its checkpoint's statistics ({e})")
    out = args.out or os.path.join(os.path.dirname(args.report), "plot.png")
    mode = "ensemble" if result.get("ensemble") else f"execute {result.get('execute', 1)}"
    plot(
        executed,
        recorded,
        result["names"],
        stats,
        out,
        f"{os.path.basename(result['episode'])} | {mode} | L1 {result['l1']:.3f} (normalized)",
    )
    print(f"wrote {out}")
