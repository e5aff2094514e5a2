"""
Plot a training run's curves or a replay, with matplotlib (pip install -r requirements-plot.txt).

    python plot.py out/demo                      # -> out/demo/curves.png (out/demo/metrics.jsonl works too)
    python plot.py out/demo/infer/report.json    # -> out/demo/infer/plot.png
    python plot.py out/demo/infer/report.json --hz 50   # the time axis in seconds (ALOHA records at 50 Hz)

A run's curves (train.py's metrics.jsonl): the training loss with its terms curr_l1 and future_l1, val_l1 against
val_l1_baseline (what predicting the training mean would score), the learning rate, and the closed-loop success rate
with its 95% interval when aloha/evaluate.py --checkpoints has written success_curve.json beside metrics.jsonl
({"steps": [...], "success_rate": [...], "ci95": [[lo, hi], ...]}, rates in 0..1).
A replay (the report.json of `python infer.py --episode ...`): one panel per action dimension, recorded actions grey,
executed blue, each on the dimension's range in the checkpoint's training data (so that a joint that barely moves
looks flat), against the step, or against seconds with --hz (the report does not record the control rate).
A PNG is written with the Agg backend; no display is needed.
"""

import argparse
import json
import os
import sys

import numpy as np

import data

SUCCESS_FILE = "success_curve.json"
RECORDED, EXECUTED = "#888888", "#1f5fd0"


class PlotError(ValueError):
    """Bad input, with one line naming the file and what is wrong."""


def new_figure(width, height):
    """A matplotlib figure outside pyplot: no backend state, no display, drawn by Agg when saved. Without matplotlib
    an ImportError saying what to install (aloha/evaluate.py calls plot_run and goes on without the PNG)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("plot.py draws with matplotlib: pip install -r requirements-plot.txt") from e
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


# -------------------------------------------------------------------------------- a run's training curves


def metrics_path(target):
    """The metrics.jsonl of a run directory, or the file itself."""
    path = os.path.join(target, "metrics.jsonl") if os.path.isdir(target) else target
    if not os.path.isfile(path):
        raise PlotError(f"{path}: not found (expected a run directory of train.py or its metrics.jsonl)")
    return path


def read_metrics(path):
    """(training rows, validation rows) of a metrics.jsonl, one JSON object a line, each sorted by step.
    A line that does not parse (a run writing it right now) is skipped with a note."""
    rows, bad = [], []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.append(row)
            elif line.strip():
                bad.append(number)
    if bad:
        print(f"note: {path}: skipping unreadable lines {bad}", file=sys.stderr)
    train_rows = sorted((r for r in rows if "loss" in r), key=lambda r: r["step"])
    val_rows = sorted((r for r in rows if "val_l1" in r), key=lambda r: r["step"])
    if not train_rows and not val_rows:
        raise PlotError(f"{path}: no training or validation rows (a run writes its first at --log_interval)")
    return train_rows, val_rows


def read_success(path):
    """aloha/evaluate.py's success curve: (steps, rates, ci95 as (n, 2) or None), checked; None when absent."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            curve = json.load(f)
        steps, rates = np.array(curve["steps"], float), np.array(curve["success_rate"], float)
        ci = np.array(curve["ci95"], float).reshape(-1, 2) if curve.get("ci95") is not None else None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PlotError(f"{path}: not a success curve of steps, success_rate and ci95 lists ({e})") from None
    if steps.ndim != 1 or rates.shape != steps.shape or (ci is not None and len(ci) != len(steps)):
        raise PlotError(f"{path}: steps, success_rate and ci95 differ in length")
    if ((rates < 0) | (rates > 1)).any():
        raise PlotError(f"{path}: success_rate holds values outside 0..1")
    return steps, rates, ci


def column(rows, key):
    """(steps, values) of the rows that hold key."""
    picked = [r for r in rows if r.get(key) is not None]
    return np.array([r["step"] for r in picked]), np.array([r[key] for r in picked], float)


def empty_panel(ax, title, text):
    ax.set_title(title)
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#666666", wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def draw_loss(ax, train_rows):
    if not train_rows:
        return empty_panel(ax, "training loss", "no training rows yet")
    for key, style in [("loss", "-"), ("curr_l1", ":"), ("future_l1", "--")]:
        ax.plot(*column(train_rows, key), style, label=key, marker="." if len(train_rows) < 30 else None)
    ax.set(title="training loss (L1, normalized actions)", xlabel="step", ylabel="L1")
    ax.legend()


def draw_validation(ax, val_rows):
    if not val_rows:
        return empty_panel(ax, "validation", "no validation rows\n(--val_episodes 0, or before the first eval)")
    ax.plot(*column(val_rows, "val_l1"), "-o", color="#d0501f", label="val_l1")
    ax.plot(*column(val_rows, "val_l1_baseline"), "--", color="#444444", label="val_l1_baseline (the training mean)")
    ax.set(title="held-out episodes", xlabel="step", ylabel="L1 (normalized)")
    ax.legend()


def draw_lr(ax, train_rows):
    if not train_rows:
        return empty_panel(ax, "learning rate", "no training rows yet")
    ax.plot(*column(train_rows, "lr"), color="#2a8f3a")
    ax.set(title="learning rate", xlabel="step", ylabel="lr")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))


def draw_success(ax, success):
    if success is None:
        return empty_panel(
            ax, "closed-loop success", f"not evaluated\n(aloha/evaluate.py --checkpoints writes {SUCCESS_FILE})"
        )
    steps, rates, ci = success
    if ci is not None:
        ax.fill_between(steps, ci[:, 0], ci[:, 1], color="#1f5fd0", alpha=0.2, label="95% interval")
    ax.plot(steps, rates, "-o", color="#1f5fd0", label="success rate")
    ax.set(title="closed-loop success", xlabel="step", ylabel="success rate", ylim=(0, 1))
    ax.legend()


def plot_run(target, out=None):
    """Draw a run's curves into a 2 x 2 PNG; returns its path."""
    path = metrics_path(target)
    train_rows, val_rows = read_metrics(path)
    run = os.path.dirname(path) or "."
    success = read_success(os.path.join(run, SUCCESS_FILE))
    out = out or os.path.join(run, "curves.png")
    last = max(r["step"] for r in train_rows + val_rows)
    title = f"{run}: step {last}"
    if val_rows:
        latest = val_rows[-1]
        title += f" | val_l1 {latest['val_l1']:.4f} (baseline {latest.get('val_l1_baseline', float('nan')):.4f})"
    fig = new_figure(12, 8)
    fig.suptitle(title)
    (loss, val), (lr, success_ax) = fig.subplots(2, 2)
    draw_loss(loss, train_rows)
    draw_validation(val, val_rows)
    draw_lr(lr, train_rows)
    draw_success(success_ax, success)
    fig.savefig(out)
    return out


# -------------------------------------------------------------------------------- a replay


def read_report(path):
    """An infer.py report: (executed, recorded, names, the report), checked."""
    try:
        with open(path) as f:
            report = json.load(f)
        executed, recorded = np.array(report["executed"], float), np.array(report["recorded"], float)
        names = [str(n) for n in report["names"]]
    except OSError as e:
        raise PlotError(f"{path}: cannot be read ({e.strerror})") from None
    except (ValueError, KeyError, TypeError) as e:
        raise PlotError(f"{path}: not an infer.py report.json with executed, recorded and names ({e!r})") from None
    if executed.ndim != 2 or executed.shape != recorded.shape or executed.shape[1] != len(names) or not len(names):
        raise PlotError(
            f"{path}: executed {executed.shape} and recorded {recorded.shape} are not (steps, {len(names)}) both"
        )
    return executed, recorded, names, report


def training_range(report, n):
    """(min, max) of each action dimension in the checkpoint's training data, or None (with a note) when the
    checkpoint's statistics are not where the report says."""
    stats_path = os.path.join(str(report.get("checkpoint")), "dataset_statistics.json")
    try:
        stats = data.load_stats(stats_path, dim=n)
    except (OSError, ValueError) as e:  # data.DataError is a ValueError
        print(
            f"note: {stats_path}: not readable, each panel spans its own data ({str(e).splitlines()[0]})",
            file=sys.stderr,
        )
        return None
    return np.asarray(stats["min"], float), np.asarray(stats["max"], float)


def plot_replay(path, out=None, hz=None):
    """Draw a replay report, one panel per action dimension in two columns; returns the PNG's path."""
    executed, recorded, names, report = read_report(path)
    span = training_range(report, len(names))
    out = out or os.path.join(os.path.dirname(path), "plot.png")
    t = np.arange(len(executed)) / hz if hz else np.arange(len(executed))
    cols = 2
    rows = (len(names) + cols - 1) // cols
    fig = new_figure(12, 1.2 + 1.6 * rows)
    mode = "ensemble" if report.get("ensemble") else f"execute {report.get('execute', 1)}"
    episode = os.path.basename(str(report.get("episode", "?")))
    title = f"{episode} | {mode} | L1 {report.get('l1', float('nan')):.3f} (normalized)"
    if report.get("trained_on"):
        title += " | an episode it trained on"
    fig.suptitle(title)
    axes = fig.subplots(rows, cols, sharex=True, squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= len(names):
            ax.set_visible(False)
            continue
        ax.plot(t, recorded[:, i], color=RECORDED, linewidth=1.6, label="recorded")
        ax.plot(t, executed[:, i], color=EXECUTED, linewidth=1.2, label="executed")
        if span is not None:
            lo = min(span[0][i], recorded[:, i].min(), executed[:, i].min())
            hi = max(span[1][i], recorded[:, i].max(), executed[:, i].max())
            pad = 0.05 * (hi - lo) if hi > lo else 0.5
            ax.set_ylim(lo - pad, hi + pad)
        ax.set_title(names[i], fontsize=10, loc="left")
        ax.grid(alpha=0.3)
    # the lowest visible panel of each column carries the time axis (with an odd count one column ends a row early)
    for i in range(max(0, len(names) - cols), len(names)):
        axes.flat[i].set_xlabel("time (s)" if hz else "step")
        axes.flat[i].xaxis.set_tick_params(labelbottom=True)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper right", ncols=2)
    fig.savefig(out)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", help="a run directory (or its metrics.jsonl), or a report.json of infer.py")
    p.add_argument("--out", help="the PNG to write; default: curves.png in the run, plot.png beside a report")
    p.add_argument("--hz", type=float, help="a replay's control rate: the time axis in seconds instead of steps")
    args = p.parse_args(argv)
    if args.hz is not None and not args.hz > 0:
        p.error(f"--hz {args.hz}: expected a rate above 0 (ALOHA: 50)")
    is_run = os.path.isdir(args.target) or args.target.endswith(".jsonl")
    if is_run and args.hz is not None:
        p.error("--hz is for a replay's report.json, not a run's curves (those are against the step)")
    try:
        out = plot_run(args.target, args.out) if is_run else plot_replay(args.target, args.out, args.hz)
    except (PlotError, ImportError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
