"""train.py --log: TensorBoard event files read back with TensorBoard's own reader, and W&B offline without a
network; metrics.jsonl stays the record either way."""

import glob
import json
import os

import pytest

import train

pytest.importorskip("tensorboard")


def flags(tiny_dir, demo_dir, out, *extra):
    argv = ["--vla_path", tiny_dir, "--data_dir", demo_dir, "--out_dir", out, "--max_steps", 3, "--batch_size", 2]
    argv += ["--log_interval", 1, "--eval_interval", 3, "--eval_batches", 1, "--save_interval", 3]
    argv += ["--num_workers", 0, "--val_episodes", 1, "--lora_rank", 4, *extra]
    return [str(a) for a in argv]


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_tensorboard_holds_what_metrics_jsonl_holds(tiny_dir, demo_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train.main(flags(tiny_dir, demo_dir, out, "--log", "tensorboard"))
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    rows = metrics(out)
    for name in ("loss", "curr_l1", "future_l1", "lr", "ms", "val_l1", "val_l1_baseline"):
        logged = {e.step: e.value for e in events.Scalars(name)}
        expected = {r["step"]: r[name] for r in rows if name in r}
        assert logged.keys() == expected.keys() and expected
        assert all(abs(logged[s] - v) <= 1e-6 * max(1, abs(v)) for s, v in expected.items()), name
    # the run's flags, as args.json holds them
    text = events.Tensors("args/text_summary")[0].tensor_proto.string_val[0].decode()
    assert json.loads(text)["log"] == "tensorboard" and json.loads(text)["max_steps"] == 3


@pytest.mark.slow
def test_wandb_runs_offline_without_a_network_and_says_how_to_sync(tiny_dir, demo_dir, tmp_path, monkeypatch, capsys):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setattr(train, "reachable", lambda host: False)
    out = tmp_path / "run"
    train.main(flags(tiny_dir, demo_dir, out, "--log", "wandb"))
    import wandb

    wandb.finish()
    assert "W&B is offline: sync later with: wandb sync" in capsys.readouterr().out
    runs = glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(runs) == 1 and os.path.getsize(runs[0]) > 0
    assert [r["step"] for r in metrics(out) if "loss" in r] == [1, 2, 3]


def test_log_refuses_an_unknown_tracker(tiny_dir, demo_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.get_args(flags(tiny_dir, demo_dir, tmp_path, "--log", "mlflow"))
    assert "--log: invalid choice: 'mlflow'" in capsys.readouterr().err
