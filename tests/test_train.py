"""
train.py: checkpoints, metrics, exact resume, torchrun, flags checked before the model loads, preemption and signals,
and errors mid-run that end every process.
"""

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import h5py
import numpy as np
import pytest
import torch

import data
import infer
import model
import train
from helpers import (
    ENV,
    P_FLAGS,
    ROOT,
    actions_of,
    edit_json,
    max_diff,
    run_train,
    train_cmd,
    train_flags,
    trained_weights,
    write_episode,
)


@pytest.mark.slow
def test_checkpoint_is_complete(run_a, tiny_dir):
    ckpts = sorted(glob.glob(str(run_a / "step_*")))
    assert [os.path.basename(c) for c in ckpts] == ["step_000003", "step_000006"]
    files = [
        "adapter_model.safetensors",
        "adapter_config.json",
        "action_head.safetensors",
        "dataset_statistics.json",
        "args.json",
        "trainer_state.pt",
    ]
    assert sorted(model.CHECKPOINT_FILES) == sorted(files) and sorted(os.listdir(ckpts[-1])) == sorted(files)
    state = torch.load(os.path.join(ckpts[-1], "trainer_state.pt"), weights_only=True)
    assert state["step"] == 6 and state["optimizer"]["state"]
    assert model.read_trainer_state(ckpts[-1])["step"] == 6 and not model.is_export(ckpts[-1])
    args = json.load(open(os.path.join(ckpts[-1], "args.json")))
    assert model.check_checkpoint(ckpts[-1]) == args
    assert args["vla_path"] == tiny_dir and len(args["val_episode_files"]) == 1
    # the run record: the flags as typed, then what the run resolved from them
    assert args["grad_ckpt"] == "off" and args["state_key"] is None and args["world_size"] == 1
    assert args["frame_sizes"] == {c: [256, 256] for c in data.DEFAULT_CAMERAS}
    assert args["episode_attrs"] == {}  # the demo episodes carry no root attributes


@pytest.mark.slow
def test_metrics_and_lr_decay(run_a):
    rows = [json.loads(line) for line in open(run_a / "metrics.jsonl")]
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "val_l1" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
    for r in train_rows:
        assert {"step", "loss", "curr_l1", "future_l1", "lr"} <= r.keys() and np.isfinite(r["loss"])
    assert [r["lr"] for r in train_rows] == pytest.approx([5e-4] * 4 + [5e-5] * 2)
    assert [r["step"] for r in eval_rows] == [3, 6]
    for r in eval_rows:
        assert r["val_l1_baseline"] > 0 and r["val_l1"] > 0 and r["val_l1_raw"] > 0


@pytest.mark.slow
def test_resume_is_exact(run_a, tiny_dir, demo_dir, tmp_path):
    r = run_train(
        train_flags(
            tiny_dir,
            demo_dir,
            tmp_path,
            "--max_steps",
            6,
            "--save_interval",
            3,
            "--eval_interval",
            3,
            "--lr_decay_step",
            4,
            "--resume",
            run_a / "step_000003",
        )
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout
    resumed, straight = trained_weights(tmp_path / "step_000006"), trained_weights(run_a / "step_000006")
    assert max_diff(resumed, straight) <= 1e-6
    assert max_diff(trained_weights(run_a / "step_000003"), straight) > 1e-4  # the last 3 steps did change them


@pytest.mark.slow
def test_resume_is_exact_with_proprio_full_attention_and_film(run_p, tiny_dir, demo_dir, tmp_path):
    r = run_train(
        train_flags(tiny_dir, demo_dir, tmp_path, *P_FLAGS, "--max_steps", 4, "--resume", run_p / "step_000002")
    )
    assert r.returncode == 0, r.stderr[-3000:]
    resumed, straight = trained_weights(tmp_path / "step_000004"), trained_weights(run_p / "step_000004")
    assert max_diff(resumed, straight) <= 1e-6
    film = [k for k in straight if k.startswith("film_layers.")]  # saved with the head, and trained
    before = trained_weights(run_p / "step_000002")
    assert len(film) == 16 and min((straight[k] - before[k]).abs().max() for k in film) > 0
    args = json.load(open(run_p / "step_000004" / "args.json"))
    assert (args["proprio"], args["attention"], args["image_aug"], args["film"]) == (True, "full", True, True)
    assert args["grad_ckpt"] == "on"  # as typed: the resumed run recomputed its activations too
    (stats,) = json.load(open(run_p / "step_000004" / "dataset_statistics.json")).values()
    train_files = [p for p in data.list_episodes(demo_dir) if p not in args["val_episode_files"]]
    assert stats["proprio"] == json.loads(json.dumps(data.compute_stats([actions_of(p) for p in train_files])))


@pytest.mark.slow
def test_swap_red_blue_trains_bgr_files_as_their_rgb_twins(tiny_dir, demo, tmp_path):
    """Files holding red and blue swapped (RoboTwin's OFT conversion), trained with --swap_red_blue, give exactly the
    weights of the true-colour files, and replay identically: the flag reverses channels end to end."""
    for p in demo[:3]:
        for kind in ("rgb", "bgr"):
            os.makedirs(tmp_path / kind, exist_ok=True)
            with h5py.File(p) as f, h5py.File(tmp_path / kind / os.path.basename(p), "w") as g:
                g["action"], g["seen"] = f["action"][:40], f["seen"][()]
                for c in data.DEFAULT_CAMERAS:
                    g[c] = f[c][:40][..., ::-1] if kind == "bgr" else f[c][:40]
    bgr_set = data.EpisodeDataset(str(tmp_path / "bgr"), swap_red_blue=True)
    assert torch.equal(bgr_set[50]["images"], data.EpisodeDataset(str(tmp_path / "rgb"))[50]["images"])
    assert not torch.equal(bgr_set[50]["images"], data.EpisodeDataset(str(tmp_path / "bgr"))[50]["images"])
    reports = []
    for kind, extra in (("rgb", []), ("bgr", ["--swap_red_blue"])):
        out = tmp_path / f"run_{kind}"
        r = run_train(
            train_flags(
                tiny_dir, tmp_path / kind, out, "--max_steps", 2, "--save_interval", 2, "--eval_interval", 2, *extra
            )
        )
        assert r.returncode == 0, r.stderr[-3000:]
        ckpt = out / "step_000002"
        episode = json.load(open(ckpt / "args.json"))["val_episode_files"][0]
        infer.main(["--checkpoint", str(ckpt), "--episode", episode, "--out", str(out / "infer")])
        reports.append(json.load(open(out / "infer" / "report.json")))
    assert json.load(open(tmp_path / "run_bgr" / "step_000002" / "args.json"))["swap_red_blue"] is True
    assert (
        max_diff(
            trained_weights(tmp_path / "run_rgb" / "step_000002"), trained_weights(tmp_path / "run_bgr" / "step_000002")
        )
        == 0
    )
    assert reports[0]["executed"] == reports[1]["executed"]


@pytest.mark.slow
def test_torchrun_two_ranks(tiny_dir, demo_dir, tmp_path):
    r = run_train(
        train_flags(tiny_dir, demo_dir, tmp_path, "--max_steps", 2, "--save_interval", 2, "--eval_interval", 2), nproc=2
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "trainable weights identical on all 2 ranks" in r.stdout
    assert "global batch 4 = 2 x 1 accum x 2 ranks" in r.stdout
    assert os.path.isfile(tmp_path / "step_000002" / "trainer_state.pt")
    assert not glob.glob(str(tmp_path / "*.tmp"))


@pytest.mark.slow
def test_an_error_exit_under_torchrun_still_prints_its_message(tiny_dir, demo_dir, tmp_path):
    """A rank skips gloo's teardown at exit (os._exit), so it prints sys.exit's message itself (found after init)."""
    r = run_train(train_flags(tiny_dir, demo_dir, tmp_path, "--batch_size", 1000, "--val_episodes", 0), nproc=2)
    assert r.returncode != 0
    message = "error: 1091 training samples cannot fill one batch of --batch_size 1000 on each of 2 ranks"
    assert r.stderr.count(message) == 2, r.stderr[-3000:]  # one per rank, perhaps interleaved


@pytest.mark.slow
def test_grad_accum_matches_bigger_batch(tiny_dir, demo_dir, tmp_path):
    # without augmentation: on these augmented frames one L1 residual of the final bias sits so close to zero that
    # batch 2 vs 2 x batch 1 float noise (1e-7) flips its sign; the accumulation itself is what is tested here
    weights = []
    for name, flags in [("b2", ["--batch_size", 2]), ("b1a2", ["--batch_size", 1, "--grad_accum", 2])]:
        out = tmp_path / name
        r = run_train(
            train_flags(
                tiny_dir, demo_dir, out, "--max_steps", 2, "--save_interval", 2, "--eval_interval", 2, "--no-image_aug"
            )
            + list(map(str, flags))
        )
        assert r.returncode == 0, r.stderr[-3000:]
        weights.append(trained_weights(out / "step_000002"))
    assert max_diff(*weights) <= 1e-5


@pytest.mark.slow
def test_nan_loss_stops_without_saving(tiny_dir, demo_dir, tmp_path):
    r = run_train(train_flags(tiny_dir, demo_dir, tmp_path, "--max_steps", 6, "--save_interval", 1, "--lr", 1e30))
    assert r.returncode != 0
    line = [x for x in r.stderr.splitlines() if "loss is" in x][-1]
    bad_step = int(line.split(" at step ")[1].split(";")[0])
    assert "Traceback" not in r.stderr
    saved = sorted(int(os.path.basename(c)[5:]) for c in glob.glob(str(tmp_path / "step_*")))
    assert saved == list(range(1, bad_step))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--cameras", "head_camera_image,top_cam"], "episode_0.hdf5: missing top_cam"),
        (["--batch_size", "0"], "--batch_size must be positive"),
        (["--chunk", "5000"], "too short"),
        (
            ["--resume", "/nonexistent/step_000100"],
            "--resume /nonexistent/step_000100: /nonexistent/step_000100: not a",
        ),
        (["--lr", "nan"], "--lr must be a finite positive number, got nan"),
        (["--lr", "inf"], "--lr must be a finite positive number, got inf"),
        (["--vla_path", "/"], "--vla_path /: no config.json, tokenizer.json, model*.safetensors there"),
        (["--vla_path", "/nonexistent/openvla-7b"], "no such directory, and not a Hugging Face Hub id"),
        (["--out_dir", "/dev/null/run"], "--out_dir /dev/null/run is not writable"),
        (["--preempt_signals", "SIGTERM,SIGKILL"], "SIGKILL is not a signal a process can catch"),
        pytest.param(
            ["--device", "cuda"],
            "--device cuda: no CUDA device is visible",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is there"),
        ),
        (["--data_dir", "/nonexistent/episodes"], "/nonexistent/episodes: no such file or directory"),
        (["--bidirectional"], "unrecognized arguments: --bidirectional"),
        # cut: no run used or favoured them
        (["--attention", "queries"], "argument --attention: invalid choice: 'queries'"),
        (["--warmup_steps", "10"], "unrecognized arguments: --warmup_steps 10"),
        (["--dist_timeout", "0"], "--dist_timeout must be positive, got 0.0"),
    ],
)
def test_bad_flags_fail_before_the_model_loads(flags, message, tiny_dir, demo_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(model.VLA, "from_pretrained", lambda *a, **k: pytest.fail("model loaded before the check"))
    with pytest.raises(SystemExit) as e:
        train.main(train_flags(tiny_dir, demo_dir, tmp_path) + flags)
    assert e.value.code != 0
    assert message in str(e.value.code) + capsys.readouterr().err


class ModelLoads(Exception):
    """Raised in place of loading the model: the data checks before it have passed."""


def stop_at_model_load(*args, **kwargs):
    raise ModelLoads


def test_validation_split_takes_only_usable_episodes(tiny_dir, tmp_path, monkeypatch, capsys):
    """Seed 7 holds out the first of three episodes; a 1-frame one there must not become the validation episode."""
    paths = [write_episode(tmp_path / f"episode_{i}.hdf5", T=T) for i, T in enumerate([1, 20, 24])]
    monkeypatch.setattr(model.VLA, "from_pretrained", stop_at_model_load)
    with pytest.raises(ModelLoads):  # the data is checked and split before the model loads
        train.main(train_flags(tiny_dir, str(tmp_path), tmp_path / "out"))
    assert paths[0] in capsys.readouterr().err  # too short for one chunk: a warning, skipped
    args = train.get_args(train_flags(tiny_dir, str(tmp_path), tmp_path / "out"))
    proc = train.Process(args)
    train_set, val_set, files = train.load_data(args, None, proc)
    assert (train_set.paths, val_set.paths) == ([paths[2]], [paths[1]])
    assert files == {os.path.basename(p): os.path.getsize(p) for p in paths[1:]}
    record = train.run_record(args, None, train_set, val_set, files, proc)
    assert record["val_episode_files"] == [paths[1]]
    train.show_run(record, train_set, val_set, args, proc)
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{") : out.index("\n}") + 2])["val_episode_files"] == [paths[1]]
    assert "train: 1 episodes" in out and "val: 1 episodes" in out


def test_run_record_is_the_flags_as_typed_and_what_the_run_resolved(tiny_dir, tmp_path, monkeypatch):
    """args stays as typed (a relative --vla_path, --state_key's default None): args.json adds what the run resolved,
    the base by an absolute path, the state key, the files and the split, the frame sizes and the episodes' scalar
    root attributes (one value when all files agree, the distinct values in natural order when they differ)."""
    (tmp_path / "data").mkdir()
    for i, seed in enumerate([11, 3, 5]):
        path = write_episode(tmp_path / "data" / f"episode_{i}.hdf5", T=20 + i)
        with h5py.File(path, "a") as f:
            f.attrs["task"], f.attrs["seed"], f.attrs["sim"], f.attrs["fov"] = "place_shoe", seed, True, 45.0
            f.attrs["cameras"] = np.arange(3)  # not a scalar: left out
            if i == 0:
                f.attrs["operator"] = b"ann"  # in one file only, as bytes
    monkeypatch.chdir(os.path.dirname(tiny_dir))
    relative = os.path.basename(tiny_dir)
    args = train.get_args(train_flags(relative, str(tmp_path / "data"), tmp_path / "out", "--proprio"))
    typed = dict(vars(args))
    proc = train.Process(args)
    train_set, val_set, files = train.load_data(args, None, proc)
    record = train.run_record(args, None, train_set, val_set, files, proc)
    assert vars(args) == typed and args.vla_path == relative and args.state_key is None
    assert {k for k in typed if record[k] != typed[k]} == {"vla_path", "state_key"}
    assert (record["vla_path"], record["state_key"]) == (tiny_dir, "action")
    added = {k: record[k] for k in record if k not in typed}
    assert added == {
        "data_files": {f"episode_{i}.hdf5": os.path.getsize(tmp_path / "data" / f"episode_{i}.hdf5") for i in range(3)},
        "val_episode_files": val_set.paths,
        "frame_sizes": {c: [8, 8] for c in data.DEFAULT_CAMERAS},
        # the training episodes' (seed 7 holds episode_0 out, the only one with an operator)
        "episode_attrs": {"task": "place_shoe", "seed": [3, 5], "sim": True, "fov": 45.0},
        "world_size": 1,
    }
    assert val_set.paths == [str(tmp_path / "data" / "episode_0.hdf5")]
    assert json.loads(json.dumps(record)) == record  # it goes into args.json as it is
    args = train.get_args(train_flags(relative, str(tmp_path / "data"), tmp_path / "out", "--val_episodes", 0))
    train_set, val_set, files = train.load_data(args, None, proc)
    assert val_set is None and train.run_record(args, None, train_set, val_set, files, proc)["episode_attrs"] == {
        "task": "place_shoe",
        "seed": [3, 5, 11],
        "sim": True,
        "fov": 45.0,
        "operator": "ann",
    }


@pytest.mark.parametrize(
    "seen, message",
    [
        (None, "no instructions (no seen dataset or LIBERO problem_info): pass --instruction"),
        (("pick it", "place the shoe " * 1700), "the instruction is too long: "),  # 5,000 words
    ],
)
def test_instructions_are_checked_before_the_model_loads(seen, message, tiny_dir, tmp_path, monkeypatch):
    write_episode(tmp_path / "episode_0.hdf5")
    write_episode(tmp_path / "episode_1.hdf5")
    bad = write_episode(tmp_path / "episode_2.hdf5", seen=seen)
    monkeypatch.setattr(model.VLA, "from_pretrained", lambda *a, **k: pytest.fail("model loaded before the check"))
    for val in ("0", "2"):  # the file in the training or the validation set
        with pytest.raises(SystemExit) as e:
            train.main(train_flags(tiny_dir, str(tmp_path), tmp_path / "out", "--val_episodes", val))
        assert str(e.value.code).startswith(f"error: {bad}: {message}") and "\n" not in str(e.value.code)


@pytest.mark.slow
def test_refuses_to_overwrite_checkpoints(run_a, tiny_dir, demo_dir, monkeypatch):
    monkeypatch.setattr(model.VLA, "from_pretrained", lambda *a, **k: pytest.fail("model loaded before the check"))
    with pytest.raises(SystemExit, match="already holds checkpoints"):
        train.main(train_flags(tiny_dir, demo_dir, run_a))


def find_resume(tiny_dir, demo_dir, out, *extra):
    return train.find_resume(train.get_args(train_flags(tiny_dir, demo_dir, out, "--max_steps", 9, *extra)))


@pytest.mark.slow
@pytest.mark.parametrize(
    "case, name",
    [
        ("truncated", "adapter_model.safetensors"),
        ("truncated", "action_head.safetensors"),
        ("truncated", "trainer_state.pt"),
        ("empty", "trainer_state.pt"),
        ("garbage", "args.json"),
        ("garbage", "dataset_statistics.json"),
        ("garbage", "adapter_config.json"),
        ("missing", "action_head.safetensors"),
        ("empty dir", "adapter_model.safetensors"),
    ],
)
def test_broken_checkpoint_is_named_before_the_model_loads_and_auto_skips_it(
    case, name, run_a, tiny_dir, demo_dir, tmp_path, capsys
):
    out = shutil.copytree(run_a, tmp_path / "run")
    ckpt, path = out / "step_000006", out / "step_000006" / name
    if case == "truncated":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    elif case == "empty":
        open(path, "w").close()
    elif case == "garbage":
        path.write_text('{"step": 6, oops')
    elif case == "missing":
        os.remove(path)
    else:
        shutil.rmtree(ckpt)
        ckpt.mkdir()
    with pytest.raises(SystemExit) as e:
        find_resume(tiny_dir, demo_dir, tmp_path / "new", "--resume", ckpt)
    message = str(e.value.code)
    assert message.startswith(f"error: --resume {ckpt}: ") and name in message and "\n" not in message
    resume = find_resume(tiny_dir, demo_dir, out, "--resume", "auto")
    assert (resume.dir, resume.state["step"], resume.args["max_steps"]) == (str(out / "step_000003"), 3, 6)
    note = capsys.readouterr().out
    assert f"note: --resume auto skips {ckpt}: " in note and name in note


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--chunk", 4], "trained with --chunk 8, not 4"),
        (["--action_dim", 7], "trained with --action_dim 14, not 7"),
        (["--lora_rank", 8], "trained with --lora_rank 4, not 8"),
        (
            ["--cameras", "head_camera_image"],
            f"trained with --cameras {','.join(data.DEFAULT_CAMERAS)}, not head_camera",
        ),
        (["--proprio"], "trained with --proprio False, not True"),
        (["--attention", "full"], "trained with --attention causal, not full"),
        (["--action_offset", 1], "trained with --action_offset 0, not 1"),
        (["--norm", "q99"], "trained with --norm bounds, not q99"),
        (["--swap_red_blue"], "trained with --swap_red_blue False, not True"),
        (["--no-image_aug"], "trained with --image_aug True, not False"),
        (["--film"], "trained with --film False, not True"),
    ],
)
def test_resume_refuses_flags_that_change_shapes_or_data(flags, message, run_a, tiny_dir, demo_dir, tmp_path):
    with pytest.raises(SystemExit, match=message):
        find_resume(tiny_dir, demo_dir, tmp_path, "--resume", run_a / "step_000003", *flags)


@pytest.mark.slow
def test_resume_refuses_another_base(run_a, tiny_dir, demo_dir, tmp_path):
    """Same shapes, another config: the adapter and head would load into it and train on without a word."""
    other = shutil.copytree(tiny_dir, tmp_path / "other-base")
    edit_json(other / "config.json", lambda c: c.update(norm_stats={"libero": {}}))
    ckpt = str(run_a / "step_000003")
    with pytest.raises(
        SystemExit,
        match=f"^error: --resume {ckpt}: {ckpt} was trained on another base than {other} "
        r"\(config.json [0-9a-f]{16}; .*'s: [0-9a-f]{16}\): pass the base",
    ):
        find_resume(str(other), demo_dir, tmp_path / "new", "--resume", ckpt)
    out = shutil.copytree(run_a, tmp_path / "run")
    with pytest.raises(SystemExit, match="^error: --resume auto: no usable checkpoint in --out_dir"):
        find_resume(str(other), demo_dir, out, "--resume", "auto")
    assert find_resume(tiny_dir, demo_dir, out, "--resume", "auto")[0] == str(out / "step_000006")


@pytest.mark.slow
def test_resume_rules(run_a, tiny_dir, demo_dir, tmp_path, monkeypatch, capsys):
    ckpt = str(run_a / "step_000003")
    # another batch size only changes the data order: a note
    assert find_resume(tiny_dir, demo_dir, tmp_path / "b", "--resume", ckpt, "--batch_size", 3)[0] == ckpt
    assert "note: " + ckpt + " was trained with --batch_size 2" in capsys.readouterr().out
    # resuming an older checkpoint into its own run would write over the newer one
    out = shutil.copytree(run_a, tmp_path / "run")
    with pytest.raises(SystemExit, match="would write over the newer step_000006 in --out_dir"):
        find_resume(tiny_dir, demo_dir, out, "--resume", out / "step_000003")
    # --resume auto on a finished run: says so and touches nothing, not even metrics.jsonl
    before = {p: os.path.getmtime(p) for p in glob.glob(str(out / "**"), recursive=True)}
    monkeypatch.setattr(model.VLA, "from_pretrained", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(SystemExit) as e:
        train.main(train_flags(tiny_dir, demo_dir, out, "--max_steps", 6, "--resume", "auto"))
    assert e.value.code == 0 and "the run is finished, nothing to do" in capsys.readouterr().out
    assert {p: os.path.getmtime(p) for p in glob.glob(str(out / "**"), recursive=True)} == before


@pytest.mark.slow
def test_full_disk_during_a_save_keeps_the_previous_checkpoint(tiny_dir, demo_dir, tmp_path, monkeypatch):
    real_save = torch.save

    def save(obj, path, *a, **k):  # what torch.save raises when the disk fills (seen on a full tmpfs)
        if "step_000002" in str(path):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(SystemExit) as e:
        train.main(
            train_flags(tiny_dir, demo_dir, tmp_path, "--max_steps", 3, "--save_interval", 1, "--eval_interval", 9)
        )
    assert f"could not save {tmp_path / 'step_000002'} (RuntimeError: " in str(e.value.code)
    assert sorted(os.listdir(tmp_path)) == [".lock", "metrics.jsonl", "step_000001"]
    assert model.read_trainer_state(str(tmp_path / "step_000001"))["step"] == 1


@pytest.mark.slow
def test_metrics_hold_each_step_once_after_a_resume(run_a, tiny_dir, demo_dir, tmp_path):
    """A run killed after logging step 6 but before saving it logs steps 4-6 again when resumed from step 3."""
    out = shutil.copytree(run_a, tmp_path / "run")
    shutil.rmtree(out / "step_000006")
    rows = open(out / "metrics.jsonl").readlines()
    with open(out / "metrics.jsonl", "w") as f:  # a garbage line, and the half-written row of a kill -9
        f.writelines(rows[:2] + ["\x00garbage\n"] + rows[2:] + ['{"step": 7, "lo'])
    r = run_train(
        train_flags(
            tiny_dir,
            demo_dir,
            out,
            "--max_steps",
            6,
            "--save_interval",
            3,
            "--eval_interval",
            3,
            "--lr_decay_step",
            4,
            "--resume",
            "auto",
        )
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"note: {out / 'metrics.jsonl'}: dropping unreadable lines [3, 10]" in r.stdout
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in rows if "val_l1" in r] == [3, 6]
    straight = [json.loads(line) for line in open(run_a / "metrics.jsonl")]
    assert [r.get("loss", r.get("val_l1")) for r in rows] == pytest.approx(
        [r.get("loss", r.get("val_l1")) for r in straight], abs=1e-6
    )
    assert max_diff(trained_weights(out / "step_000006"), trained_weights(run_a / "step_000006")) <= 1e-6


def start_train(flags, nproc=1, until="train:"):
    """A run in the background, returned once it printed a line starting with `until` (before the model loads), with
    a function that waits until every process writing its output (every rank) has exited and returns the output."""
    p = subprocess.Popen(
        train_cmd(flags, nproc),
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines = []
    reader = threading.Thread(target=lambda: [lines.append(line) for line in p.stdout], daemon=True)
    reader.start()
    while until and reader.is_alive() and not any(line.startswith(until) for line in lines):
        time.sleep(0.1)
    assert not until or any(line.startswith(until) for line in lines), "".join(lines)[-3000:]

    def output():
        reader.join(timeout=300)
        assert not reader.is_alive(), "a process never exited:\n" + "".join(lines)[-3000:]
        p.wait()
        return "".join(lines)

    return p, output


@pytest.mark.slow
def test_preemption_saves_the_step_and_resumes_exactly(run_a, tiny_dir, demo_dir, tmp_path):
    """SIGTERM to every process of the run, its data worker too, as a cluster sends it: run_a's flags but more steps
    (identical up to step 6), stopped at some step k, resumed to step 6 ends as run_a did."""
    flags = train_flags(
        tiny_dir,
        demo_dir,
        tmp_path,
        "--save_interval",
        3,
        "--eval_interval",
        3,
        "--lr_decay_step",
        4,
        "--num_workers",
        1,
    )
    p, output = start_train(flags + ["--max_steps", "1000"], until="step 1/")
    os.killpg(p.pid, signal.SIGTERM)
    out = output()
    assert p.returncode == 75, out[-3000:]
    k = int(out.splitlines()[-1].split()[3])
    assert out.splitlines()[-1] == (
        f"stopped after step {k} (SIGTERM) and saved it: run the same command with --resume auto to continue"
    )
    assert f"step_{k:06d}" in os.listdir(tmp_path) and not glob.glob(str(tmp_path / "*.tmp"))
    assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")][-1] == k
    r = run_train(flags + ["--max_steps", "6", "--resume", "auto"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert max_diff(trained_weights(tmp_path / "step_000006"), trained_weights(run_a / "step_000006")) <= 1e-6


@pytest.mark.slow
def test_ctrl_c_is_one_line(tiny_dir, demo_dir, tmp_path):
    # a suite started in the background (`cmd &` without job control) ignores SIGINT, and exec keeps an ignored
    # signal ignored but resets a caught one to its default: catch it here so that train.py gets Ctrl-C as from a shell
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        p, output = start_train(train_flags(tiny_dir, demo_dir, tmp_path, "--max_steps", 6))
    finally:
        signal.signal(signal.SIGINT, previous)
    p.send_signal(signal.SIGINT)
    out = output()
    assert p.returncode == 130 and "Traceback" not in out, out[-3000:]
    assert out.splitlines()[-1] == "interrupted: nothing saved since the last checkpoint"


@pytest.mark.slow
def test_ranks_stop_together_on_one_ranks_signal_and_without_their_launcher(tiny_dir, demo_dir, tmp_path):
    flags = ["--max_steps", 50, "--save_interval", 50, "--val_episodes", 0]
    signalled, signalled_output = start_train(
        train_flags(tiny_dir, demo_dir, tmp_path / "usr1", *flags), nproc=2, until="step 1/"
    )  # in start-up a signalled rank exits at once
    ranks = open(f"/proc/{signalled.pid}/task/{signalled.pid}/children").read().split()
    rank1 = [pid for pid in ranks if "\0RANK=1\0" in open(f"/proc/{pid}/environ").read()]
    os.kill(int(rank1[0]), signal.SIGUSR1)  # rank 1 alone: rank 0 must stop after the same step and save it
    orphaned, orphaned_output = start_train(train_flags(tiny_dir, demo_dir, tmp_path / "orphans", *flags), nproc=2)
    orphaned.kill()  # torchrun killed: its ranks must not train on unsupervised
    out = signalled_output()
    stopped = re.search(r"stopped after step (\d+) \(asked by another rank\) and saved it", out)
    assert stopped, out[-3000:]
    k = int(stopped[1])
    assert sorted(os.listdir(tmp_path / "usr1")) == [".lock", "metrics.jsonl", f"step_{k:06d}"]
    out = orphaned_output()  # returns once both orphaned ranks have exited
    assert "(the launcher exited) and saved it" in out, out[-3000:]
    assert [os.path.basename(c) for c in glob.glob(str(tmp_path / "orphans" / "step_*"))] == ["step_000001"]


@pytest.mark.slow
def test_two_rank_runs_always_exit(tiny_dir, demo_dir, tmp_path):
    """Gloo's teardown deadlocked a rank after its last save in 3 of 86 runs (slow: three runs at once)."""
    runs = [
        start_train(
            train_flags(tiny_dir, demo_dir, tmp_path / str(i), "--max_steps", 1, "--val_episodes", 0),
            nproc=2,
            until=None,
        )
        for i in range(3)
    ]
    for i, (p, output) in enumerate(runs):
        out = output()
        assert p.returncode == 0 and os.path.isdir(tmp_path / str(i) / "step_000001"), out[-3000:]


@pytest.mark.slow
def test_one_run_per_out_dir_and_a_killed_run_leaves_no_lock(tiny_dir, demo_dir, tmp_path, monkeypatch):
    (tmp_path / "run").mkdir()
    lock = tmp_path / "run" / ".lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
            "fcntl.lockf(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(120)",
            str(lock),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline() == "locked\n"
    monkeypatch.setattr(model.VLA, "from_pretrained", lambda *a, **k: pytest.fail("model loaded before the check"))
    with pytest.raises(SystemExit) as e:
        train.main(train_flags(tiny_dir, demo_dir, tmp_path / "run"))
    assert str(e.value.code) == (
        f"error: --out_dir {tmp_path / 'run'} is in use by another run (it holds {lock}): "
        "wait for it to end, or pass another --out_dir"
    )
    holder.kill()
    holder.wait()
    monkeypatch.setattr(model.VLA, "from_pretrained", stop_at_model_load)
    with pytest.raises(ModelLoads):  # its .lock is still there, its lock is not
        train.main(train_flags(tiny_dir, demo_dir, tmp_path / "run"))


def test_sigterm_in_start_up_exits_at_once_with_75(tiny_dir, demo_dir, tmp_path, monkeypatch, capsys):
    def slow_load(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)
        pytest.fail("SIGTERM did not stop the start-up")

    monkeypatch.setattr(model.VLA, "from_pretrained", slow_load)
    with pytest.raises(SystemExit) as e:
        train.main(train_flags(tiny_dir, demo_dir, tmp_path))
    assert e.value.code == 75
    last = capsys.readouterr().err.splitlines()[-1]
    assert last == "stopped in start-up (SIGTERM): run the same command to start again"


def test_ranks_must_read_the_same_files_and_get_the_dist_timeout(tiny_dir, demo_dir, tmp_path, monkeypatch):
    got = {}
    for name, value in [("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "2")]:
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(train.dist, "init_process_group", lambda backend, timeout: got.update(timeout=timeout))
    monkeypatch.setattr(train.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(train.dist, "get_world_size", lambda: 2)

    def all_gather_object(everyone, files):  # rank 1's node-local copy lacks one episode
        everyone[:] = [files, dict(list(files.items())[1:])]

    monkeypatch.setattr(train.dist, "all_gather_object", all_gather_object)
    monkeypatch.setattr(model.VLA, "from_pretrained", lambda *a, **k: pytest.fail("model loaded before the check"))
    with pytest.raises(SystemExit) as e:
        train.main(train_flags(tiny_dir, demo_dir, tmp_path, "--dist_timeout", 0.5))
    assert str(e.value.code) == f"error: --data_dir {demo_dir}: ranks [1] hold other files than rank 0"
    assert got["timeout"].total_seconds() == 30


def test_val_data_dir_holding_the_training_files_is_refused(tiny_dir, demo_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(model.VLA, "from_pretrained", lambda *a, **k: pytest.fail("model loaded before the check"))
    os.symlink(demo_dir, tmp_path / "same")
    first = min(os.path.realpath(p) for p in data.list_episodes(demo_dir))
    for val_dir in (demo_dir, str(tmp_path / "same")):
        with pytest.raises(SystemExit) as e:
            train.main(train_flags(tiny_dir, demo_dir, tmp_path / "out", "--val_data_dir", val_dir))
        assert str(e.value.code) == (
            f"error: --val_data_dir {val_dir} holds 6 of --data_dir's files (e.g. {first}): "
            "it would validate on training data"
        )


@pytest.mark.slow
def test_checkpoints_are_ordered_by_step_number_and_copies_ignored(run_a, tiny_dir, demo_dir, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run_a / "step_000003", out / "step_999999")
    shutil.copytree(run_a / "step_000006", out / "step_1000000")
    shutil.copytree(run_a / "step_000006", out / "step_000004_v2")
    (out / "step_1000001.tmp").mkdir()
    assert train.checkpoints(str(out)) == [(999999, str(out / "step_999999")), (1000000, str(out / "step_1000000"))]
    assert find_resume(tiny_dir, demo_dir, out, "--resume", "auto", "--max_steps", 2000000)[0] == str(
        out / "step_1000000"
    )


@pytest.mark.slow
def test_keep_last_never_deletes_the_resumed_or_the_saved_checkpoint(run_a, tiny_dir, demo_dir, tmp_path, capsys):
    """The newest checkpoint is corrupt: --resume auto takes step 3, and pruning to 1 must keep what it saves."""
    out = shutil.copytree(run_a, tmp_path / "run")
    with open(out / "step_000006" / "trainer_state.pt", "r+b") as f:
        f.truncate(100)
    shutil.copytree(out / "step_000003", out / "step_000003_v2")
    train.main(
        train_flags(
            tiny_dir,
            demo_dir,
            out,
            "--max_steps",
            5,
            "--save_interval",
            1,
            "--eval_interval",
            9,
            "--keep_last",
            1,
            "--resume",
            "auto",
        )
    )
    assert f"note: --resume auto skips {out / 'step_000006'}: " in capsys.readouterr().out
    assert sorted(os.listdir(out)) == [".lock", "metrics.jsonl", "step_000003_v2", "step_000005", "step_000006"]
    assert model.read_trainer_state(str(out / "step_000005"))["step"] == 5
    assert model.read_trainer_state(str(out / "step_000003_v2"))["step"] == 3
    assert find_resume(tiny_dir, demo_dir, out, "--resume", "auto")[0] == str(out / "step_000005")


@pytest.mark.slow
def test_resume_keeps_the_validation_split_and_says_what_changed(
    run_a, tiny_dir, demo_dir, tmp_path, monkeypatch, capsys
):
    ckpt = run_a / "step_000003"
    val = [os.path.basename(p) for p in json.load(open(ckpt / "args.json"))["val_episode_files"]]
    files = [os.path.basename(p) for p in data.list_episodes(demo_dir)]
    gone = [f for f in files if f not in val][0]
    (tmp_path / "data").mkdir()
    for f in files:
        if f != gone:
            os.symlink(os.path.join(demo_dir, f), tmp_path / "data" / f)
    shutil.copy(os.path.join(demo_dir, gone), added := tmp_path / "data" / "episode_99.hdf5")
    with h5py.File(added, "r+") as f:
        f["action"][...] = f["action"][()] * 0.5
    flags = train_flags(
        tiny_dir,
        str(tmp_path / "data"),
        tmp_path / "out",
        "--max_steps",
        9,
        "--resume",
        ckpt,
        "--seed",
        8,
        "--val_episodes",
        2,
        "--grad_accum",
        2,
    )
    monkeypatch.setattr(model.VLA, "from_pretrained", stop_at_model_load)
    with pytest.raises(ModelLoads):  # said before the model loads
        train.main(flags)
    out = capsys.readouterr().out
    assert (
        f"note: --data_dir {tmp_path / 'data'} changed since {ckpt}: added ['episode_99.hdf5'], removed "
        f"['{gone}'], resized []; its validation episodes stay out of training"
    ) in out
    for note in [
        "--seed 7, not 8: its validation split is kept",
        "--val_episodes 1, not 2: its validation split is kept",
        "--grad_accum 1, not 2: the global batch changes",
    ]:
        assert f"note: {ckpt} was trained with {note}" in out
    # the run record keeps the checkpoint's split, and its --val_episodes and --seed's split with it
    args = train.get_args(flags)
    resume, proc = train.find_resume(args), train.Process(args)
    train_set, val_set, files = train.load_data(args, resume, proc)
    record = train.run_record(args, resume, train_set, val_set, files, proc)
    assert [os.path.basename(p) for p in record["val_episode_files"]] == val and len(train_set.paths) == 5
    assert (record["val_episodes"], record["seed"], record["grad_accum"]) == (1, 8, 2)
    assert train_set.stats == data.load_stats(ckpt / "dataset_statistics.json")  # the checkpoint's normalization


def run_patched(patch, flags):
    """train.py run as a script after `patch` (Python run first, inherited by the forked data workers): its exit
    code, its output, and whether some process of the run outlived it (a hang is killed after 120 s)."""
    code = (
        f"import runpy, sys, torch, data, model\n{patch}\nsys.argv = ['train.py', *{list(map(str, flags))!r}]\n"
        "runpy.run_path('train.py', run_name='__main__')"
    )
    p = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out = p.communicate(timeout=120)[0]
    except subprocess.TimeoutExpired:
        p.kill()
        out = p.communicate()[0] + "\n(hung: killed after 120 s)"
    try:
        os.killpg(p.pid, signal.SIGKILL)  # a data worker left behind
        return p.returncode, out, True
    except ProcessLookupError:
        return p.returncode, out, False


OOM_AT_STEP_3 = """
real, calls = model.VLA.forward, []
def forward(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    return real(self, *args, **kwargs)
model.VLA.forward = forward
"""


# worker 0 of 1 makes batches 0, 1, 2... of batch size 2: its 5th sample is step 3's first (as data.py will raise it)
FILE_FAILS_AT_STEP_3 = """
real, calls = data.EpisodeDataset.__getitem__, []
def getitem(self, i):
    calls.append(i)
    if len(calls) == 5 and self.image_aug:
        raise data.DataError(f"{self.paths[self.index[i][0]]}:demo: wrong B-tree signature")
    return real(self, i)
data.EpisodeDataset.__getitem__ = getitem
"""


@pytest.mark.slow
def test_an_error_in_a_step_ends_every_process(tiny_dir, demo_dir, tmp_path):
    """Data workers ignore SIGTERM (for preemption); an error with them alive used to hang at exit for ever."""
    code, out, left = run_patched(
        OOM_AT_STEP_3,
        train_flags(tiny_dir, demo_dir, tmp_path, "--max_steps", 9, "--num_workers", 1, "--eval_interval", 9),
    )
    assert code == 1 and not left and "torch.OutOfMemoryError: CUDA out of memory" in out, out[-3000:]


@pytest.mark.slow
def test_a_data_file_failing_mid_run_saves_the_last_step_and_exits_65(tiny_dir, demo_dir, tmp_path, monkeypatch):
    """Also: a relative --vla_path is recorded absolute, so the checkpoint loads from another working directory."""
    flags = train_flags(
        os.path.relpath(tiny_dir, ROOT),
        demo_dir,
        tmp_path / "run",
        "--max_steps",
        9,
        "--num_workers",
        1,
        "--eval_interval",
        9,
        "--save_interval",
        100,
    )
    code, out, left = run_patched(FILE_FAILS_AT_STEP_3, flags)
    assert code == 65 and not left and "Traceback" not in out, out[-3000:]
    assert re.search(r"^error: \S+episode_\d+\.hdf5:demo: wrong B-tree signature$", out, re.M), out[-3000:]
    assert "stopped before step 3: fix or remove the episode named above, then --resume auto" in out
    ckpt = tmp_path / "run" / "step_000002"
    assert sorted(os.listdir(tmp_path / "run")) == [".lock", "metrics.jsonl", "step_000002"]
    args, state = model.check_checkpoint(str(ckpt)), model.read_trainer_state(str(ckpt))
    assert state["step"] == 2 and state["pos"] == 2 and args["vla_path"] == tiny_dir
    assert args["data_files"] == {os.path.basename(p): os.path.getsize(p) for p in data.list_episodes(demo_dir)}
    monkeypatch.chdir(tmp_path)
    assert infer.Policy.from_checkpoint(str(ckpt), device="cpu").vla.chunk == 8


VAL_FILE_FAILS = """
real = data.EpisodeDataset.__getitem__
def getitem(self, i):
    if not self.image_aug:  # the validation set: train_flags leaves augmentation on for training
        raise data.DataError(f"{self.paths[self.index[i][0]]}: frame {self.index[i][1]} no longer reads (truncated)")
    return real(self, i)
data.EpisodeDataset.__getitem__ = getitem
"""


@pytest.mark.slow
def test_a_validation_file_failing_mid_run_is_one_line_and_keeps_what_was_saved(tiny_dir, demo_dir, tmp_path):
    flags = train_flags(
        tiny_dir, demo_dir, tmp_path, "--max_steps", 9, "--num_workers", 1, "--eval_interval", 3, "--save_interval", 2
    )
    code, out, left = run_patched(VAL_FILE_FAILS, flags)
    assert code == 65 and not left and "Traceback" not in out, out[-3000:]
    assert re.search(
        r"^error: \S+episode_\d+\.hdf5: frame \d+ no longer reads \(truncated\) \(in an evaluation\)$", out, re.M
    ), out[-3000:]
    assert "step 3/9" in out and "step 4/9" not in out
    assert sorted(os.listdir(tmp_path)) == [".lock", "metrics.jsonl", "step_000002"]
    assert model.read_trainer_state(str(tmp_path / "step_000002"))["step"] == 2


@pytest.mark.slow
def test_a_killed_data_worker_ends_every_process(tiny_dir, demo_dir, tmp_path):
    p, output = start_train(
        train_flags(tiny_dir, demo_dir, tmp_path, "--max_steps", 1000, "--num_workers", 2), until="step 1/"
    )
    workers = open(f"/proc/{p.pid}/task/{p.pid}/children").read().split()
    os.kill(int(workers[0]), signal.SIGKILL)  # as the OOM killer does
    out = output()
    # torch names the worker one of two ways, depending on whether the kill lands while the worker is handing over
    # a batch ("exited unexpectedly", seen in CI) or between batches ("is killed by signal: Killed")
    named = rf"DataLoader worker \(pid {workers[0]}\) is killed by signal: Killed"
    named += rf"|DataLoader worker \(pid\(s\) {workers[0]}\) exited unexpectedly"
    assert p.returncode == 1 and re.search(named, out), out[-3000:]
    with pytest.raises(ProcessLookupError):
        os.killpg(p.pid, 0)


@pytest.mark.parametrize(
    "flags, value",
    [
        ([], "off"),
        (["--grad_ckpt"], "on"),
        (["--grad_ckpt", "on"], "on"),
        (["--grad_ckpt", "off"], "off"),
        (["--no-grad_ckpt"], "off"),
    ],
)
def test_grad_ckpt_flag_forms(flags, value):
    assert train.get_args(["--data_dir", "d", *flags]).grad_ckpt == value


def test_grad_ckpt_is_on_or_off(capsys):
    """--grad_ckpt auto (a trial step to see whether a GPU needs it) was cut: argparse refuses it in one line."""
    with pytest.raises(SystemExit) as e:
        train.get_args(["--data_dir", "d", "--grad_ckpt", "auto"])
    assert e.value.code == 2
    # quoted or not, depending on the Python version
    last = capsys.readouterr().err.splitlines()[-1]
    assert re.search(r"argument --grad_ckpt: invalid choice: 'auto' \(choose from '?on'?, '?off'?\)$", last), last
