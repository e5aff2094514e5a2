"""
Tests of plot.py (needs requirements-plot.txt): a run's curves and a replay drawn from inputs written the way
train.py and infer.py write them, and bad input refused in one line.

    python -m pytest -q tests/test_plot.py
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import data
import plot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLUE = (0x1F, 0x5F, 0xD0)  # the executed actions and the success curve
ORANGE = (0xD0, 0x50, 0x1F)  # val_l1


def write_metrics(run, steps=40, log_interval=5, eval_interval=10):
    """metrics.jsonl as train.py writes it: a training row every log_interval, a validation row every
    eval_interval (after the training row of the same step), one JSON object a line."""
    os.makedirs(run, exist_ok=True)
    with open(os.path.join(run, "metrics.jsonl"), "w") as f:
        for step in range(log_interval, steps + 1, log_interval):
            loss = 0.5 * np.exp(-step / 20)
            row = {"step": step, "loss": loss, "curr_l1": loss * 0.9, "future_l1": loss * 1.01, "lr": 5e-4, "ms": 700}
            print(json.dumps(row), file=f)
            if step % eval_interval == 0:
                val = {"val_l1": 0.3 - step / 400, "val_curr_l1": 0.29, "val_future_l1": 0.3, "val_l1_raw": 0.1}
                print(json.dumps({"step": step} | val | {"val_l1_baseline": 0.315}), file=f)
    return os.path.join(run, "metrics.jsonl")


def write_report(folder, steps=120, names=data.ACTION_NAMES):
    """A report.json of infer.py beside a checkpoint directory holding its dataset_statistics.json."""
    rng = np.random.default_rng(0)
    recorded = np.cumsum(rng.normal(0, 0.02, (steps, len(names))), 0)
    executed = recorded + rng.normal(0, 0.05, recorded.shape)
    checkpoint = os.path.join(folder, "step_000030")
    os.makedirs(checkpoint, exist_ok=True)
    block = {k: getattr(np, k)(recorded, 0).tolist() for k in ("min", "max", "mean", "std")}
    block |= {"q01": block["min"], "q99": block["max"]}
    with open(os.path.join(checkpoint, "dataset_statistics.json"), "w") as f:
        json.dump({"place_shoe": {"action": block}}, f)
    report = {
        "l1": 0.27,
        "names": list(names),
        "executed": executed.tolist(),
        "recorded": recorded.tolist(),
        "checkpoint": checkpoint,
        "episode": "out/d/episode_5.hdf5",
        "execute": 1,
        "ensemble": False,
    }
    path = os.path.join(folder, "report.json")
    with open(path, "w") as f:
        json.dump(report, f)
    return path


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def share(img, colour):
    """Fraction of pixels within a few levels of colour: antialiased line centres keep the exact colour."""
    return float((np.abs(img.astype(int) - colour).max(-1) <= 8).mean())


def test_run_curves_from_a_directory_or_its_metrics_jsonl(tmp_path, capsys):
    """The file of train.py's rows (the old plot.py read it as one JSON: 'Extra data: line 2 column 1') and its
    directory both draw a 1200x800 PNG with the val_l1 curve; the success panel is empty until evaluated."""
    metrics = write_metrics(str(tmp_path / "run"))
    plot.main([metrics])
    out = tmp_path / "run" / "curves.png"
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    img = pixels(out)
    assert img.shape == (800, 1200, 3)
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 50  # text, axes and curves, not a blank canvas
    assert share(img[:400, 600:], ORANGE) > 1e-3  # val_l1 in the top-right panel
    assert share(img[400:, 600:], BLUE) == 0  # no success curve yet
    plot.main([str(tmp_path / "run"), "--out", str(tmp_path / "again.png")])
    np.testing.assert_array_equal(pixels(tmp_path / "again.png"), img)


def test_run_curves_draw_the_success_curve_when_evaluated(tmp_path):
    run = tmp_path / "run"
    write_metrics(str(run))
    curve = {"steps": [10, 20, 30, 40], "success_rate": [0.1, 0.3, 0.45, 0.5], "ci95": [[0.03, 0.2]] * 4}
    (run / plot.SUCCESS_FILE).write_text(json.dumps(curve))
    plot.main([str(run)])
    img = pixels(run / "curves.png")
    assert share(img[400:, 600:], BLUE) > 1e-3 and share(img[400:, :600], BLUE) == 0


def test_run_curves_skip_a_half_written_line(tmp_path, capsys):
    metrics = write_metrics(str(tmp_path))
    with open(metrics, "a") as f:
        f.write('{"step": 45, "lo')  # the run is writing it right now
    train_rows, val_rows = plot.read_metrics(metrics)
    assert [r["step"] for r in train_rows] == list(range(5, 41, 5)) and [r["step"] for r in val_rows] == [
        10,
        20,
        30,
        40,
    ]
    assert capsys.readouterr().err.strip() == f"note: {metrics}: skipping unreadable lines [13]"


@pytest.mark.parametrize("hz", [None, 50])
def test_replay_plot_has_a_panel_per_joint_and_a_time_axis(tmp_path, capsys, hz):
    report = write_report(str(tmp_path))
    argv = [report] if hz is None else [report, "--hz", str(hz)]
    plot.main(argv)
    out = tmp_path / "plot.png"
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    img = pixels(out)
    assert img.shape == (1240, 1200, 3)  # 7 rows of two panels
    assert share(img, BLUE) > 1e-3 and share(img, (0x88, 0x88, 0x88)) > 1e-3


def test_replay_axis_is_steps_or_seconds(tmp_path, monkeypatch):
    """The x axis of the lowest panels: steps by default, seconds with --hz (120 steps at 50 Hz end at 2.38 s)."""
    from matplotlib.figure import Figure

    figures = []
    monkeypatch.setattr(Figure, "savefig", lambda self, path: figures.append(self))
    report = write_report(str(tmp_path), names=["a", "b", "c"])
    plot.plot_replay(report)
    plot.plot_replay(report, hz=50)
    for fig, label, end in zip(figures, ["step", "time (s)"], [119, 119 / 50]):
        visible = [ax for ax in fig.axes if ax.get_visible()]
        assert [ax.get_title(loc="left") for ax in visible] == ["a", "b", "c"]
        assert [ax.get_xlabel() for ax in visible] == ["", label, label]  # b sits above the empty fourth panel
        assert visible[0].lines[1].get_xdata()[-1] == pytest.approx(end)


def test_bad_input_gets_one_line(tmp_path):
    def error(*argv):
        with pytest.raises(SystemExit) as e:
            plot.main(list(map(str, argv)))
        return str(e.value)

    assert error(tmp_path / "nope") == (f"error: {tmp_path / 'nope'}: cannot be read (No such file or directory)")
    assert error(tmp_path) == (
        f"error: {tmp_path / 'metrics.jsonl'}: not found (expected a run directory of train.py or its metrics.jsonl)"
    )
    (tmp_path / "metrics.jsonl").write_text("")
    assert error(tmp_path) == (
        f"error: {tmp_path / 'metrics.jsonl'}: no training or validation rows (a run writes its first at "
        "--log_interval)"
    )
    (tmp_path / "args.json").write_text(json.dumps({"lr": 5e-4}))
    assert error(tmp_path / "args.json") == (
        f"error: {tmp_path / 'args.json'}: not an infer.py report.json with executed, recorded and names "
        "(KeyError('executed'))"
    )
    report = json.loads(open(write_report(str(tmp_path / "r"))).read())
    (tmp_path / "short.json").write_text(json.dumps(report | {"names": ["a"]}))
    assert error(tmp_path / "short.json") == (
        f"error: {tmp_path / 'short.json'}: executed (120, 14) and recorded (120, 14) are not (steps, 1) both"
    )
    write_metrics(str(tmp_path))
    (tmp_path / plot.SUCCESS_FILE).write_text(json.dumps({"steps": [10], "success_rate": [50]}))
    assert error(tmp_path) == f"error: {tmp_path / plot.SUCCESS_FILE}: success_rate holds values outside 0..1"
    assert not os.path.exists(tmp_path / "curves.png")


def test_without_matplotlib_plot_run_raises_import_error(tmp_path, monkeypatch):
    """aloha/evaluate.py --checkpoints calls plot_run and goes on without its PNG on an ImportError; the command
    says what to install in one line."""
    write_metrics(str(tmp_path))
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # what an import of a missing package raises
    with pytest.raises(ImportError, match=r"^plot.py draws with matplotlib: pip install -r requirements-plot.txt$"):
        plot.plot_run(str(tmp_path))
    with pytest.raises(SystemExit) as e:
        plot.main([str(tmp_path)])
    assert str(e.value) == "error: plot.py draws with matplotlib: pip install -r requirements-plot.txt"


@pytest.mark.slow
def test_command_line(tmp_path):
    """As a user runs it: the run's metrics.jsonl, then a report whose checkpoint has gone (a note, still drawn)."""
    metrics = write_metrics(str(tmp_path / "run"))
    r = subprocess.run([sys.executable, "plot.py", metrics], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout == f"wrote {tmp_path / 'run' / 'curves.png'}\n", r.stderr
    report = write_report(str(tmp_path))
    os.remove(tmp_path / "step_000030" / "dataset_statistics.json")
    r = subprocess.run([sys.executable, "plot.py", report], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and (tmp_path / "plot.png").exists(), r.stderr
    assert r.stderr.startswith(f"note: {tmp_path / 'step_000030' / 'dataset_statistics.json'}: not readable")
