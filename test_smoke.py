"""
nanoOFT's test suite: CPU only, a few minutes on 2 cores, on the tiny twin checkpoint and synthetic demo episodes.

    pip install -r requirements.txt && python -m pytest -q test_smoke.py robotwin/test_robotwin.py
"""

import ast
import glob
import io
import json
import math
import os
import pickle
import re
import runpy
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import nullcontext

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from PIL import Image
from safetensors.torch import load_file, save_file

import bench
import data
import infer
import model
import train
from demo import SEEN, make_demo, make_tiny, make_tokenizer, tiny_config
from merge import save_pretrained
from model import (
    VLA,
    Block,
    ViT,
    add_lora,
    check_keys,
    enable_grad_ckpt,
    load_trained,
    merge_lora,
    openvla_7b_config,
    param_report,
    save_trained,
    skipped_prefixes,
)

torch.set_num_threads(1)
HERE = os.path.dirname(os.path.abspath(__file__))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("demo"))
    make_demo(out, episodes=6, seed=0)
    return out


@pytest.fixture(scope="session")
def demo(demo_dir):
    return data.list_episodes(demo_dir)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return make_tiny(str(tmp_path_factory.mktemp("tiny-openvla")))


# ----------------------------------------------------------------------------------------------------
# data.py


def write_episode(path, T=20, cameras=data.ALL_CAMERAS, res=8, width=14, frames=None, seen=("pick it", "place it")):
    """A tiny episode in the real layout (8x8 frames keep the tests fast); seen=None leaves the instructions out."""
    rng = np.random.default_rng([T, *os.path.basename(str(path)).encode()])  # two episodes are never the same
    with h5py.File(path, "w") as f:
        for c in cameras:
            f[c] = rng.integers(0, 256, (frames or T, res, res, 3), dtype=np.uint8)
        if width:
            f["action"] = rng.normal(size=(T, width))
        if seen is not None:
            f.create_dataset("seen", data=list(seen), dtype=h5py.string_dtype())
    return str(path)


def actions_of(path):
    with h5py.File(path, "r") as f:
        return f["action"][()]


def run_cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, os.path.join(HERE, "data.py"), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_demo_has_the_real_layout(demo):
    assert len(demo) == 6
    lengths = []
    for p in demo:
        with h5py.File(p, "r") as f:
            assert set(f) == {*data.ALL_CAMERAS, "action", "relative_action", "seen", "unseen"}
            T = len(f["action"])
            lengths.append(T)
            for c in data.ALL_CAMERAS:
                assert f[c].shape == (T, 256, 256, 3) and f[c].dtype == np.uint8 and f[c].chunks == (1, 256, 256, 3)
                assert f[c].compression in ("gzip", "lzf")
            a, rel = f["action"][()], f["relative_action"][()]
            assert a.shape == (T, 14) and a.dtype == np.float64 and rel.shape == (T, 14) and rel.dtype == np.float64
            np.testing.assert_allclose(rel[:-1], a[1:] - a[:-1])
            np.testing.assert_array_equal(rel[-1], rel[-2])
            for key in ("seen", "unseen"):
                assert f[key].ndim == 1 and h5py.check_string_dtype(f[key].dtype).encoding == "utf-8"
                assert len(set(f[key].asstr()[()])) >= 24
            assert not set(f["seen"].asstr()[()]) & set(f["unseen"].asstr()[()])
            grips = a[:, [6, 13]]
            assert grips.min() == 0 and grips.max() == 1 and ((grips >= 0) & (grips <= 1)).all()
            joints = [i for i in range(14) if i not in (6, 13)]
            assert np.abs(rel[:, joints]).max() < 0.15 and np.abs(rel).max() < 0.35  # smooth motion, no jumps
            # the frames change while the arm moves: the cameras show what the actions do
            assert not np.array_equal(f["head_camera_image"][0], f["head_camera_image"][T // 2])
    assert 140 <= min(lengths) and max(lengths) <= 240 and len(set(lengths)) > 1


def test_demo_is_reproducible_by_seed(tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        make_demo(str(tmp_path / name), episodes=1, seed=seed)
    a, b, c = (actions_of(tmp_path / name / "episode_0.hdf5") for name in "abc")
    np.testing.assert_array_equal(a, b)
    assert a.shape != c.shape or not np.array_equal(a, c)
    with pytest.raises(data.DataError, match="already holds"):
        make_demo(str(tmp_path / "a"), episodes=1)


@pytest.mark.parametrize("offset", [0, 1])
def test_sample_counts_and_targets(demo, offset):
    ds = data.EpisodeDataset(demo, chunk=8, action_offset=offset)
    lengths = [len(actions_of(p)) for p in demo]
    assert len(ds) == sum(T - 8 - offset + 1 for T in lengths)
    last = max(i for i, (e, _) in enumerate(ds.index) if e == 2)
    for i in (0, 57, last):
        s = ds[i]
        rows = actions_of(demo[s["episode"]])[s["t"] + offset : s["t"] + offset + 8]
        assert len(rows) == 8
        np.testing.assert_allclose(data.unnormalize(s["actions"].numpy(), ds.stats), rows, atol=1e-5)
    assert ds[last]["t"] == lengths[2] - 8 - offset
    assert ds[-1]["t"] == ds.index[-1][1] and ds[-1]["instruction"] == ds[len(ds) - 1]["instruction"]


def test_sample_shapes_and_camera_order(demo):
    ds = data.EpisodeDataset(demo[:2], cameras=["low_cam_image", "head_camera_image", "right_wrist_image"])
    s = ds[40]
    assert s["images"].dtype == torch.uint8 and s["images"].shape == (3, 3, 256, 256)
    assert s["actions"].dtype == torch.float32 and s["actions"].shape == (8, 14)
    assert isinstance(s["instruction"], str) and s["instruction"]
    assert (s["episode"], s["t"]) == ds.index[40]
    with h5py.File(demo[s["episode"]], "r") as f:
        for k, c in enumerate(ds.cameras):
            assert torch.equal(s["images"][k], torch.from_numpy(f[c][s["t"]]).permute(2, 0, 1))
    assert s["actions"].abs().max() <= 1


def test_q99_dataset_round_trip_clips(demo):
    ds = data.EpisodeDataset(demo[:2], norm="q99")
    e, t = ds.index[-1]
    s = ds[len(ds) - 1]
    lo, hi = np.array(ds.stats["q01"]), np.array(ds.stats["q99"])
    rows = actions_of(demo[e])[t : t + 8]
    flat = hi - lo < 1e-8
    expect = np.where(flat, lo, np.clip(rows, lo, hi))
    np.testing.assert_allclose(data.unnormalize(s["actions"], ds.stats, "q99").numpy(), expect, atol=1e-5)


def test_normalize_modes_zero_range_mask_and_types():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 4))
    a[:, 2] = 0.25  # a constant dimension
    stats = {
        "min": a.min(0).tolist(),
        "max": a.max(0).tolist(),
        "q01": np.quantile(a, 0.01, 0).tolist(),
        "q99": np.quantile(a, 0.99, 0).tolist(),
        "mask": [True] * 4,
    }
    n = data.normalize(a, stats)
    assert isinstance(n, np.ndarray) and n.dtype == np.float64
    assert n.min() == pytest.approx(-1) and n.max() == pytest.approx(1) and (n[:, 2] == 0).all()
    np.testing.assert_allclose(data.unnormalize(n, stats), a, atol=1e-12)
    q = data.normalize(a, stats, "q99")
    assert q.min() == -1 and q.max() == 1 and (q[:, 2] == 0).all()
    clipped = np.clip(a, stats["q01"], stats["q99"])
    np.testing.assert_allclose(data.unnormalize(q, stats, "q99"), clipped, atol=1e-12)
    assert (np.abs(a - clipped).max(0)[[0, 1, 3]] > 0).all()  # the clipping really happened
    t = torch.tensor(a, dtype=torch.float32)
    nt = data.normalize(t, stats)
    assert torch.is_tensor(nt) and nt.dtype == torch.float32
    np.testing.assert_allclose(nt.numpy(), n, atol=1e-5)
    back = data.unnormalize(nt, stats)
    assert torch.is_tensor(back) and torch.allclose(back, t, atol=1e-5) and (back[:, 2] == 0.25).all()
    assert data.normalize(a.astype(np.float32), stats).dtype == np.float32
    raw = {**stats, "mask": [True, False, True, True]}  # OpenVLA's mask leaves False dims untouched
    np.testing.assert_array_equal(data.normalize(a, raw)[:, 1], a[:, 1])
    np.testing.assert_array_equal(data.unnormalize(n, raw)[:, 1], n[:, 1])
    with pytest.raises(ValueError, match="bounds or q99"):
        data.normalize(a, stats, "minmax")


def test_stats_match_numpy_and_save_load(demo, tmp_path):
    stats = data.compute_stats([actions_of(p) for p in demo[:3]])
    a = np.concatenate([actions_of(p) for p in demo[:3]])
    for key, fn in (("mean", np.mean), ("std", np.std), ("min", np.min), ("max", np.max)):
        np.testing.assert_allclose(stats[key], fn(a, axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats["q01"], np.quantile(a, 0.01, axis=0))
    np.testing.assert_allclose(stats["q99"], np.quantile(a, 0.99, axis=0))
    assert stats["mask"] == [True] * 14
    path = tmp_path / "dataset_statistics.json"
    data.save_stats(path, stats, num_transitions=len(a), num_trajectories=3)
    saved = json.loads(path.read_text())
    assert saved == {"place_shoe": {"action": stats, "num_transitions": len(a), "num_trajectories": 3}}
    assert data.load_stats(path) == stats
    data.save_stats(path, stats, dataset_name="other")  # counts unknown: only the action block
    assert json.loads(path.read_text()) == {"other": {"action": stats}} and data.load_stats(path) == stats
    path.write_text(json.dumps({"a": saved["place_shoe"], "b": saved["place_shoe"]}))
    assert data.load_stats(path, "b") == stats
    with pytest.raises(data.DataError, match="dataset_statistics.json"):
        data.load_stats(path)
    path.write_text(json.dumps({"action": {"min": [0]}}))
    with pytest.raises(data.DataError, match="dataset_statistics.json"):
        data.load_stats(path)


def test_dataset_uses_given_stats(demo):
    stats = data.compute_stats([actions_of(p) for p in demo])
    ds = data.EpisodeDataset(demo[:1], stats=stats)
    assert ds.stats is stats
    np.testing.assert_allclose(ds[0]["actions"].numpy(), data.normalize(actions_of(demo[0])[:8], stats), atol=1e-6)
    with pytest.raises(data.DataError, match="13"):
        data.EpisodeDataset(demo[:1], stats={k: v[:13] for k, v in stats.items()})


def test_split_by_episode(demo):
    train, val = data.split_episodes(demo, 2, seed=0)
    assert len(val) == 2 and not set(train) & set(val) and sorted(train + val) == sorted(demo)
    assert data.split_episodes(demo[::-1], 2, seed=0) == (train, val)
    assert len({tuple(data.split_episodes(demo, 2, seed=s)[1]) for s in range(8)}) > 1
    assert data.split_episodes(demo, 0, seed=0) == (demo, [])
    with pytest.raises(data.DataError, match="val_episodes"):
        data.split_episodes(demo, 6, seed=0)


def test_list_episodes_natural_order(tmp_path):
    for i in (10, 2, 1):
        write_episode(tmp_path / f"episode_{i}.hdf5")
    (tmp_path / "notes.txt").write_text("not an episode")
    names = [os.path.basename(p) for p in data.list_episodes(str(tmp_path))]
    assert names == ["episode_1.hdf5", "episode_2.hdf5", "episode_10.hdf5"]
    explicit = [str(tmp_path / "episode_10.hdf5"), str(tmp_path / "episode_2.hdf5")]
    assert data.list_episodes(explicit) == explicit[::-1]


@pytest.mark.parametrize("form", ["vlen", "fixed_bytes", "scalar_str", "scalar_bytes"])
def test_instruction_storage_forms(tmp_path, form):
    texts = ["pick up the shoe", "put the shoe on the mat", "move the shoe"]
    path = write_episode(tmp_path / "episode_0.hdf5", seen=None)
    with h5py.File(path, "a") as f:
        if form == "vlen":
            f.create_dataset("seen", data=texts, dtype=h5py.string_dtype())
        elif form == "fixed_bytes":
            f["seen"] = np.array([t.encode() for t in texts], dtype="S40")
        elif form == "scalar_str":
            f["seen"] = texts[1]
        else:
            f["seen"] = np.bytes_(texts[1].encode())
    expect = texts if form in ("vlen", "fixed_bytes") else texts[1:2]
    with h5py.File(path, "r") as f:
        assert data.read_instructions(f, f, "seen") == expect
    for k in range(4):
        ds = data.EpisodeDataset([path], instruction_variant=k)
        assert {ds[i]["instruction"] for i in range(len(ds))} == {expect[k % len(expect)]}
    drawn = {data.EpisodeDataset([path], seed=s)[i]["instruction"] for s in range(3) for i in range(13)}
    assert drawn == set(expect)


def test_instruction_draws_are_seeded(demo):
    a, b, c = (data.EpisodeDataset(demo[:2], seed=s) for s in (0, 0, 1))

    def draw(ds):
        return [ds[i]["instruction"] for i in range(0, len(ds), 7)]

    assert draw(a) == draw(b) and draw(a) != draw(c)
    b.set_epoch(1)
    assert draw(a) != draw(b)
    unseen = data.EpisodeDataset(demo[:1], instructions="unseen", instruction_variant=3)
    with h5py.File(demo[0], "r") as f:
        assert unseen[5]["instruction"] == f["unseen"].asstr()[3]


def test_workers_yield_the_same_samples(demo):
    ds = data.EpisodeDataset(demo, seed=5)
    ds[0]  # the main process holds open handles now: forked workers must not reuse them
    subset = torch.utils.data.Subset(ds, range(0, len(ds), 61))
    batches = [list(torch.utils.data.DataLoader(subset, batch_size=4, num_workers=w)) for w in (0, 2)]
    assert len(batches[0]) == len(batches[1]) >= 4
    for x, y in zip(*batches):
        assert x["instruction"] == y["instruction"]
        for key in ("images", "actions", "episode", "t"):
            assert torch.equal(x[key], y[key])
    inherited = ds._files[0][0]
    ds._pid = -1  # what a forked worker sees: handles opened under another pid, which it must not use
    ds[0]
    assert ds._files[0][0] is not inherited and ds._files[0][0].id.valid
    clone = pickle.loads(pickle.dumps(ds))  # spawned workers receive the dataset pickled, without handles
    assert clone._files == {} and torch.equal(clone[7]["images"], ds[7]["images"])


def test_state_comes_from_the_file_or_the_action_bounded_and_clipped(tmp_path, demo):
    a, b = (write_episode(tmp_path / f"episode_{i}.hdf5", T=20 + i) for i in (0, 1))
    for path in (a, b):
        with h5py.File(path, "a") as f:
            f["state"] = np.linspace(-1, 3, 5 * len(f["action"])).reshape(-1, 5) + (path == b)
    ds = data.EpisodeDataset([a, b], proprio=True)
    states = np.concatenate([np.linspace(-1, 3, 100).reshape(20, 5), np.linspace(-1, 3, 105).reshape(21, 5) + 1])
    assert ds.proprio_dim == 5 and ds.proprio_stats["min"] == states.min(0).tolist()
    lo, hi = states.min(0), states.max(0)
    np.testing.assert_allclose(ds[25]["state"].numpy(), 2 * (states[20 + 12] - lo) / (hi - lo) - 1, atol=1e-6)
    np.testing.assert_array_equal(data.normalize_state(hi + 1, ds.proprio_stats), np.ones(5))  # clipped
    assert "state" not in data.EpisodeDataset([a, b])[0]
    without = write_episode(tmp_path / "episode_2.hdf5", T=20)  # no `state`: the recorded joint vector
    with pytest.raises(
        data.DataError,
        match=r"--proprio: .*episode_0.hdf5 reads its state from state \(5 wide\), "
        r"but .*episode_2.hdf5 from action \(14 wide\): pass --state_key",
    ):
        data.EpisodeDataset([a, without], proprio=True)
    demo_set = data.EpisodeDataset(demo[:1], proprio=True, action_offset=1)
    actions = actions_of(demo[0])
    np.testing.assert_allclose(demo_set[9]["state"].numpy(), data.normalize(actions[9], demo_set.stats), atol=1e-6)
    np.testing.assert_allclose(
        demo_set[9]["actions"].numpy(), data.normalize(actions[10:18], demo_set.stats), atol=1e-6
    )
    with h5py.File(without, "a") as f:
        f["state"] = np.full((20, 5), np.nan)
    with pytest.raises(data.DataError, match="episode_2.hdf5: state holds NaN or inf"):
        data.check_episodes([without], data.ALL_CAMERAS, 8, 14)


def test_read_episode(demo):
    ep = data.read_episode(demo[1], ["head_camera_image", "left_wrist_image"])
    ds = data.EpisodeDataset(demo[1:2])
    assert ep["length"] == len(ds) + 7 and ep["actions"].shape == (ep["length"], 14)
    np.testing.assert_array_equal(ep["actions"], actions_of(demo[1]))
    assert torch.equal(ep["frames"](30), ds[30]["images"])
    assert len(ep["seen"]) >= 24 and len(ep["unseen"]) >= 24
    ep["close"]()


@pytest.fixture
def broken(tmp_path):
    """One directory with every kind of broken file, named by the problem it has."""
    good = write_episode(tmp_path / "episode_0.hdf5")
    (tmp_path / "episode_1.hdf5").write_text("this is not HDF5")
    with open(good, "rb") as f:
        (tmp_path / "episode_2.hdf5").write_bytes(f.read()[:3000])  # truncated
    write_episode(tmp_path / "episode_3.hdf5", cameras=["head_camera_image"])  # no left_wrist_image
    write_episode(tmp_path / "episode_4.hdf5", width=0)  # no action
    write_episode(tmp_path / "episode_5.hdf5", frames=19)  # 19 frames, 20 actions
    write_episode(tmp_path / "episode_6.hdf5", width=13)
    write_episode(tmp_path / "episode_7.hdf5", T=5)  # too short: a warning, skipped
    return tmp_path


EXPECTED = {
    1: "not a readable HDF5",
    2: "truncated file",
    3: "missing left_wrist_image",
    4: "missing action",
    5: "differ in length: action 20, head_camera_image 19",
    6: "expected (T, 14)",
}


def test_check_names_every_broken_file(broken, capsys):
    paths = data.list_episodes(str(broken))
    with pytest.raises(data.DataError) as err:
        data.check_episodes(paths, data.DEFAULT_CAMERAS, 8, 14)
    lines = str(err.value).splitlines()
    assert len(lines) == len(EXPECTED)
    for line, (i, problem) in zip(lines, EXPECTED.items()):
        assert line.startswith(str(broken / f"episode_{i}.hdf5") + ":") and problem in line
    assert "episode_7.hdf5" in capsys.readouterr().err
    with pytest.raises(data.DataError, match="episode_5.hdf5"):
        data.EpisodeDataset(str(broken))


def test_short_episodes_are_skipped_until_none_is_left(tmp_path, capsys):
    good, short = write_episode(tmp_path / "episode_0.hdf5"), write_episode(tmp_path / "episode_1.hdf5", T=8)
    assert data.check_episodes([good, short], data.DEFAULT_CAMERAS, 8, 14) == [good, short]
    assert data.check_episodes([good, short], data.DEFAULT_CAMERAS, 8, 14, action_offset=1) == [good]
    assert "episode_1.hdf5" in capsys.readouterr().err
    with pytest.raises(data.DataError, match="no episode is long enough"):
        data.check_episodes([short], data.DEFAULT_CAMERAS, 8, 14, action_offset=1)
    with pytest.raises(data.DataError, match="episode_0.hdf5: missing wrist .a RoboTwin .flat. episode"):
        data.check_episodes([good], ["head_camera_image", "wrist"], 8, 14)
    with pytest.raises(data.DataError, match="frame sizes differ"):
        data.check_episodes([good, write_episode(tmp_path / "episode_2.hdf5", res=16)], data.DEFAULT_CAMERAS, 8, 14)
    with pytest.raises(data.DataError, match="no 'unseen' instructions"):
        data.EpisodeDataset([good], instructions="unseen")


def test_cli_reports_problems_without_traceback(broken, tmp_path):
    r = run_cli(broken)
    assert r.returncode != 0 and "Traceback" not in r.stdout + r.stderr
    for i in EXPECTED:
        assert str(broken / f"episode_{i}.hdf5") in r.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run_cli(empty, "--cameras", "head_camera_image,wrist_cam")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "no episode_*.hdf5 (or other .hdf5) files" in r.stderr
    r = run_cli(broken / "episode_0.hdf5", "--cameras", "head_camera_image,wrist_cam")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "missing wrist_cam" in r.stderr


def test_cli_summary(tmp_path):
    write_episode(tmp_path / "episode_0.hdf5", T=30)
    write_episode(tmp_path / "episode_1.hdf5", T=5)
    r = run_cli(tmp_path, "--action_offset", "1")
    assert r.returncode == 0, r.stderr
    assert "warning" in r.stderr and "episode_1.hdf5" in r.stderr
    out = r.stdout
    assert "1 episodes, 30 frames" in out and "22 samples" in out and "at 8x8" in out
    assert "right_gripper" in out and "seen: 2-2 variants per episode, e.g. pick it | place it" in out


def blank_instructions(tmp_path):
    """A good episode, then seen missing, empty, all blank, and unseen present but blank."""
    paths = [
        write_episode(tmp_path / f"episode_{i}.hdf5", seen=seen)
        for i, seen in enumerate([("pick it",), None, (), (" ", ""), ("pick it",)])
    ]
    with h5py.File(paths[4], "a") as f:
        f.create_dataset("unseen", data=["  "], dtype=h5py.string_dtype())
    return paths


def test_check_refuses_missing_empty_and_blank_instructions(tmp_path):
    paths = blank_instructions(tmp_path)
    with pytest.raises(data.DataError) as err:
        data.check_episodes(paths, data.DEFAULT_CAMERAS, 8, 14)
    lines = str(err.value).splitlines()
    assert [line.split(":")[0] for line in lines] == paths[1:]
    assert lines[0].endswith(
        ': no instructions (no seen dataset or LIBERO problem_info): pass --instruction "what the robot should do"'
    )
    assert all(line.endswith(": seen instructions missing, empty or all blank") for line in lines[1:3])
    assert lines[3].endswith(": unseen instructions missing, empty or all blank")
    r = run_cli(tmp_path)
    assert r.returncode != 0 and "Traceback" not in r.stderr and r.stderr.strip().splitlines() == lines
    assert data.check_episodes(paths[:1], data.DEFAULT_CAMERAS, 8, 14) == paths[:1]


def test_check_measures_prompts_with_the_models_tokenizer(tmp_path, tiny_dir, capsys):
    """A 5,000-word instruction is ~5,000 tokens: with the image patches, past Llama-2's 2,048 positions."""
    good = write_episode(tmp_path / "episode_0.hdf5", seen=("pick it", "put the shoe on the mat"))
    config, tok = model.load_tokenizer(tiny_dir)
    n = model.check_sequence_length(config, tok, "put the shoe on the mat", 2, True, 8)
    assert n == len(model.prompt_ids(tok, "put the shoe on the mat")) + 2 * 256 + 1 + 8

    def summarize(**kw):
        return data.summarize(str(tmp_path), data.DEFAULT_CAMERAS, 8, 14, 0, **kw)

    summarize(vla_path=tiny_dir, proprio=True)
    assert f"prompts: the longest instruction fills {n} of the LLM's 2048 positions" in capsys.readouterr().out
    long = write_episode(tmp_path / "episode_1.hdf5", seen=("pick it", "place the shoe " * 1700))
    summarize()  # without --vla_path there is no tokenizer to measure with
    with pytest.raises(data.DataError, match="nowhere: no such checkpoint directory"):
        summarize(vla_path=str(tmp_path / "nowhere"))
    r = run_cli(tmp_path, "--vla_path", tiny_dir)
    assert r.returncode != 0 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith(f"{long}: the instruction is too long: ") and "2048" in r.stderr and good not in r.stderr


def test_arm_check_flags_instructions_of_other_episodes(demo, tmp_path, capsys):
    """Demo episodes move one arm and hold the other still; give them instructions that name the moving arm or,
    in some, the other one (as RoboTwin's OFT conversion did by pairing episodes with other episodes' texts)."""
    moving = {}
    for src in demo:
        shutil.copy(src, tmp_path / os.path.basename(src))
        still = [np.ptp(actions_of(src)[:, arm], 0).max() == 0 for arm in (slice(0, 7), slice(7, 14))]
        assert sum(still) == 1
        moving[os.path.basename(src)] = "right" if still[0] else "left"
    assert set(moving.values()) == {"left", "right"}

    def check(wrong):
        for name, arm in moving.items():
            other = {"left": "right", "right": "left"}[arm]
            said, against = (other, arm) if name in wrong else (arm, other)
            seen = [
                f"Put the shoe down with the {said} arm.",
                f"{said.upper()} gripper: place the shoe",
                f"Use the {against} arm.",
                "Place it using the left and right arms.",
                "Put the shoe on the leftmost mat.",
            ]
            with h5py.File(tmp_path / name, "a") as f:
                del f["seen"]
                f.create_dataset("seen", data=seen, dtype=h5py.string_dtype())
        data.summarize(str(tmp_path), data.DEFAULT_CAMERAS, 8, 14, 0)
        return [line for line in capsys.readouterr().out.splitlines() if line.startswith("arms:")]

    assert check(set()) == ["arms: all 6 episodes whose instructions name an arm move that arm most"]
    lines = check({"episode_1.hdf5", "episode_4.hdf5"})
    assert lines == [
        "arms: in 2 of 6 episodes the instructions name one arm and the other arm moves most: "
        "episode_1.hdf5, episode_4.hdf5"
    ]
    lines = check({f"episode_{i}.hdf5" for i in (0, 1, 2, 4, 5)})
    assert len(lines) == 2 and lines[0].startswith("arms: in 5 of 6 episodes") and "episode_3" not in lines[0]
    assert "RoboTwin's OFT conversion" in lines[1] and "python robotwin/convert.py" in lines[1]
    assert data.named_arm(["Use the left and the right arm.", "no arm here", "Rightly placed"]) is None
    assert data.named_arm(["LEFT arm", "right arm", "the left one"]) == "left"
    assert data.moving_arm(np.zeros((5, 14))) is None

    other = tmp_path / "thirteen"  # only the 14-D two-arm layout is checked
    other.mkdir()
    write_episode(other / "episode_0.hdf5", T=30, width=13, seen=("use the left arm", "the left arm"))
    data.summarize(str(other), data.DEFAULT_CAMERAS, 8, 13, 0)
    assert "arms:" not in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------
# model.py

INSTR = ["pick up the shoe", "Grab the left shoe and put it onto the pad next to the blue mat", "place it"]


def images(b=len(INSTR), n=2, size=224, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, n, 3, size, size), dtype=torch.uint8, generator=g)


def lora_vla(tiny_dir, **kw):
    """The tiny model with LoRA whose B matrices are non-zero, as after some training."""
    torch.manual_seed(0)
    vla = add_lora(VLA.from_pretrained(tiny_dir, **kw), rank=32)
    with torch.no_grad():
        for n, p in vla.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return vla.eval()


def openvla_7b_keys():
    """openvla-7b's state dict as the facts file describes it, written out independently of model.py."""
    keys = {}

    def vit(prefix, w, depth, mlp, prefix_tokens, layer_scale, attn_pool):
        keys[f"{prefix}.patch_embed.proj.weight"], keys[f"{prefix}.patch_embed.proj.bias"] = (w, 3, 14, 14), (w,)
        keys.update({f"{prefix}.{k}": v for k, v in prefix_tokens.items()})
        keys[f"{prefix}.pos_embed"] = (1, 256, w)
        for i in range(depth):
            b = f"{prefix}.blocks.{i}"
            keys.update(
                {
                    f"{b}.norm1.weight": (w,),
                    f"{b}.norm1.bias": (w,),
                    f"{b}.norm2.weight": (w,),
                    f"{b}.norm2.bias": (w,),
                    f"{b}.attn.qkv.weight": (3 * w, w),
                    f"{b}.attn.qkv.bias": (3 * w,),
                    f"{b}.attn.proj.weight": (w, w),
                    f"{b}.attn.proj.bias": (w,),
                    f"{b}.mlp.fc1.weight": (mlp, w),
                    f"{b}.mlp.fc1.bias": (mlp,),
                    f"{b}.mlp.fc2.weight": (w, mlp),
                    f"{b}.mlp.fc2.bias": (w,),
                }
            )
            if layer_scale:
                keys[f"{b}.ls1.scale_factor"], keys[f"{b}.ls2.scale_factor"] = (w,), (w,)
        keys[f"{prefix}.norm.weight"], keys[f"{prefix}.norm.bias"] = (w,), (w,)
        if attn_pool:
            p = f"{prefix}.attn_pool"
            keys.update(
                {
                    f"{p}.latent": (1, 1, w),
                    f"{p}.q.weight": (w, w),
                    f"{p}.q.bias": (w,),
                    f"{p}.kv.weight": (2 * w, w),
                    f"{p}.kv.bias": (2 * w,),
                    f"{p}.proj.weight": (w, w),
                    f"{p}.proj.bias": (w,),
                    f"{p}.norm.weight": (w,),
                    f"{p}.norm.bias": (w,),
                    f"{p}.mlp.fc1.weight": (mlp, w),
                    f"{p}.mlp.fc1.bias": (mlp,),
                    f"{p}.mlp.fc2.weight": (w, mlp),
                    f"{p}.mlp.fc2.bias": (w,),
                }
            )

    vit(
        "vision_backbone.featurizer",
        1024,
        24,
        4096,
        {"cls_token": (1, 1, 1024), "reg_token": (1, 4, 1024)},
        layer_scale=True,
        attn_pool=False,
    )
    vit("vision_backbone.fused_featurizer", 1152, 27, 4304, {}, layer_scale=False, attn_pool=True)
    for i, (o, n) in enumerate([(8704, 2176), (4096, 8704), (4096, 4096)], 1):
        keys[f"projector.fc{i}.weight"], keys[f"projector.fc{i}.bias"] = (o, n), (o,)
    lm = "language_model.model"
    keys[f"{lm}.embed_tokens.weight"], keys["language_model.lm_head.weight"] = (32064, 4096), (32064, 4096)
    keys[f"{lm}.norm.weight"] = (4096,)
    for i in range(32):
        b = f"{lm}.layers.{i}"
        keys.update({f"{b}.self_attn.{p}_proj.weight": (4096, 4096) for p in "qkvo"})
        keys.update(
            {
                f"{b}.mlp.gate_proj.weight": (11008, 4096),
                f"{b}.mlp.up_proj.weight": (11008, 4096),
                f"{b}.mlp.down_proj.weight": (4096, 11008),
                f"{b}.input_layernorm.weight": (4096,),
                f"{b}.post_attention_layernorm.weight": (4096,),
            }
        )
    return keys


def test_7b_keys_and_shapes_match_the_checkpoint_except_the_skip_list():
    vla = VLA.from_config(openvla_7b_config(), torch.bfloat16, "meta")  # shapes only, no memory
    head = {k for k in vla.state_dict() if k.startswith(("action_head.", "action_queries"))}
    ckpt = {k: torch.empty(s, dtype=torch.bfloat16, device="meta") for k, s in openvla_7b_keys().items()}
    unused = {
        k
        for k in ckpt
        if k.startswith(
            (
                "vision_backbone.featurizer.blocks.23.",
                "vision_backbone.featurizer.norm.",
                "vision_backbone.fused_featurizer.blocks.26.",
                "vision_backbone.fused_featurizer.norm.",
                "vision_backbone.fused_featurizer.attn_pool.",
            )
        )
    }
    ours = {k: tuple(v.shape) for k, v in vla.state_dict().items() if k not in head}
    assert ours == {k: tuple(v.shape) for k, v in ckpt.items() if k not in unused}
    assert {k for k in ckpt if k.startswith(tuple(skipped_prefixes(vla.config)))} == unused
    check_keys(vla, ckpt.keys(), "openvla-7b")  # the loader's own check accepts it...
    with pytest.raises(ValueError, match="unexpected keys .*language_model.model.rotary_emb.inv_freq"):
        check_keys(vla, [*ckpt, "language_model.model.rotary_emb.inv_freq"], "openvla-7b")  # ...and nothing more
    result = vla.load_state_dict({k: v for k, v in ckpt.items() if k not in unused}, strict=False, assign=True)
    assert set(result.missing_keys) == head and not result.unexpected_keys  # and no shape mismatch was raised
    assert sum(p.numel() for p in vla.action_head.parameters()) == pytest.approx(50e6, rel=0.02)
    assert vla.llm.model.rotary_emb.inv_freq.dtype == torch.float32


def test_tiny_loads_from_its_directory(tiny_dir):
    assert not os.path.exists(os.path.join(tiny_dir, "action_head.safetensors"))  # a base checkpoint
    vla = VLA.from_pretrained(tiny_dir)
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in vla.parameters())
    ckpt = load_file(os.path.join(tiny_dir, "model.safetensors"))
    assert any(k.startswith("vision_backbone.fused_featurizer.attn_pool.") for k in ckpt)  # the skip list is used
    for k, v in vla.state_dict().items():
        if k in ckpt:
            assert torch.equal(v, ckpt[k]), k
    rope = vla.llm.model.rotary_emb.inv_freq
    hd = vla.llm.config.hidden_size // vla.llm.config.num_attention_heads
    assert torch.allclose(rope, 1.0 / 10000 ** (torch.arange(0, hd, 2).float() / hd))
    ids = vla.tokenize(["Pick up the shoe and place it on the mat"])[0]
    tok = vla.tokenizer
    assert ids[0] == tok.token_to_id("<s>") == 1 and ids[-1] == tok.token_to_id("▁")
    prompt = "In: What action should the robot take to pick up the shoe and place it on the mat?\nOut:"
    assert tok.decode(ids) == prompt + " "  # + the bare "▁"
    assert len(ids) < 30  # words are pieces, not bytes
    pre = json.load(open(os.path.join(tiny_dir, "preprocessor_config.json")))["tvf_normalize_params"]
    assert pre[0]["mean"] == [0.484375, 0.455078125, 0.40625]
    assert pre[0]["std"] == [0.228515625, 0.2236328125, 0.224609375]
    assert pre[1]["mean"] == [0.5] * 3 and pre[1]["std"] == [0.5] * 3


@pytest.mark.parametrize("cameras, proprio_dim, chunk", [(1, 0, 8), (3, 5, 2)])
def test_sequence_length_is_what_forward_builds(tiny_dir, cameras, proprio_dim, chunk):
    vla = VLA.from_pretrained(tiny_dir, proprio_dim=proprio_dim, chunk=chunk)
    lengths = []
    vla.llm.model.register_forward_pre_hook(
        lambda m, a, k: lengths.append(k["inputs_embeds"].shape[1]), with_kwargs=True
    )
    for text in ["pick it", "Put the red sneaker onto the green mat, then let go of it."]:
        vla(images(b=1, n=cameras, size=64), [text], torch.zeros(1, proprio_dim) if proprio_dim else None)
        assert lengths[-1] == model.check_sequence_length(vla.config, vla.tokenizer, text, cameras, proprio_dim, chunk)
    assert model.max_positions(vla.config) == vla.llm.config.max_position_embeddings == 2048  # Llama-2's default
    n = lengths[-1]
    for limit in (n, n - 1):  # the limit comes from the config, and a sequence of exactly the limit fits
        config = vla.config | {"text_config": vla.config["text_config"] | {"max_position_embeddings": limit}}

        def check():
            return model.check_sequence_length(config, vla.tokenizer, text, cameras, proprio_dim, chunk)

        if limit == n:
            assert check() == n
        else:
            with pytest.raises(ValueError, match=f"too long: .* = {n} positions, more than the LLM's {n - 1}$"):
                check()


def test_forward_shape_and_bf16(tiny_dir):
    vla = VLA.from_pretrained(tiny_dir)
    out = vla(images(size=256), INSTR)  # 256x256 frames are resized to 224
    assert out.shape == (3, 8, 14) and out.dtype == torch.float32 and out.isfinite().all()
    bf = VLA.from_pretrained(tiny_dir, dtype=torch.bfloat16)
    assert bf.projector.fc1.weight.dtype == torch.bfloat16 and bf.action_head[1].weight.dtype == torch.float32
    assert bf.llm.model.rotary_emb.inv_freq.dtype == torch.float32
    assert bf(images(size=256), INSTR).dtype == torch.float32


def test_embed_images_shape_camera_order_and_preprocessing(tiny_dir):
    vla = VLA.from_pretrained(tiny_dir)
    a, b = images(1, 1, seed=1), images(1, 1, seed=2)
    ea, eb, eab, eba = (vla.embed_images(x) for x in (a, b, torch.cat([a, b], 1), torch.cat([b, a], 1)))
    assert eab.shape == (1, 512, vla.llm.config.hidden_size)
    torch.testing.assert_close(eab, torch.cat([ea, eb], 1))
    torch.testing.assert_close(eba, torch.cat([eb, ea], 1))
    # by hand: per-tower normalization from preprocessor_config.json, DINOv2 channels first, GELU projector
    pre = json.load(open(os.path.join(tiny_dir, "preprocessor_config.json")))["tvf_normalize_params"]
    x = a[:, 0].float() / 255
    feats = [
        tower((x - torch.tensor(p["mean"]).view(3, 1, 1)) / torch.tensor(p["std"]).view(3, 1, 1))
        for tower, p in zip([vla.vision_backbone.featurizer, vla.vision_backbone.fused_featurizer], pre)
    ]
    assert feats[0].shape == (1, 256, 64) and feats[1].shape == (1, 256, 96)
    p = vla.projector
    torch.testing.assert_close(ea, p.fc3(F.gelu(p.fc2(F.gelu(p.fc1(torch.cat(feats, -1)))))))
    assert vla.embed_images(images(2, 3, size=200)).shape == (2, 768, vla.llm.config.hidden_size)
    # 256x256 frames are squashed to 224 exactly as the reference's PIL bicubic resize does it
    big = images(1, 1, size=256)
    assert torch.equal(tower_input(vla, big)[0].round(), pil_resized(big[0, 0]))


def tower_input(vla, frames, aug=None, run=None):
    """The pixels the DINOv2 tower receives from vla.embed_images(frames, aug) (or from run()), in 0-255 levels."""
    seen = []
    hook = vla.vision_backbone.featurizer.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    run() if run else vla.embed_images(frames, aug)
    hook.remove()
    mean, std = (torch.tensor(vla.preprocessor["tvf_normalize_params"][0][k]).view(3, 1, 1) for k in ("mean", "std"))
    return (seen[0].float() * std + mean) * 255


def pil_resized(frame, box=None):
    """PIL itself: a (3, H, W) uint8 frame through Image.resize((224, 224), BICUBIC, box), as (3, 224, 224) floats."""
    img = Image.fromarray(np.asarray(frame.permute(1, 2, 0))).resize((224, 224), Image.BICUBIC, box=box)
    return torch.tensor(np.asarray(img)).permute(2, 0, 1).float()


@pytest.mark.parametrize("height, width", [(256, 256), (240, 320)])
def test_resize_is_pils_bicubic_bit_for_bit(demo, height, width):
    """OpenVLA's processor resizes PIL images: the batched resize must give PIL's levels on camera-like scenes, noisy
    ones and pure noise (the bound asked for is <= 1 level on <= 1% of pixels; it is exact)."""
    with h5py.File(demo[0]) as f:
        scene = np.asarray(Image.fromarray(f["head_camera_image"][60]).resize((width, height), Image.BICUBIC))
    rng = np.random.default_rng(0)
    frames = np.stack(
        [
            scene,
            np.clip(scene + rng.normal(0, 12, scene.shape), 0, 255).astype(np.uint8),
            rng.integers(0, 256, scene.shape, dtype=np.uint8),
        ]
    )
    frames = torch.from_numpy(frames).permute(0, 3, 1, 2)
    ours = model.resize_like_pil(frames, 224)
    assert torch.equal(ours, torch.stack([pil_resized(f) for f in frames]))
    square = images(2, 1)[:, 0]  # already 224x224: untouched
    assert torch.equal(model.resize_like_pil(square, 224), square.float())


def test_jitter_matches_tf_ops_computed_with_colorsys():
    """OFT's colour augmentation (TF's adjust_brightness/contrast/saturation/hue, each clipped) against a per-pixel
    reference written with Python's colorsys."""
    import colorsys

    g = torch.Generator().manual_seed(0)
    x, u = torch.rand(3, 3, 5, 6, generator=g), torch.rand(3, 4, generator=g)
    ours = model.jitter(x, u)
    for i in range(3):
        b, c, s, h = ((2 * u[i] - 1) * torch.tensor([0.2, 0.2, 0.2, 0.05])).tolist()
        y = np.clip(x[i].numpy().astype(np.float64) + b, 0, 1)
        y = np.clip((y - y.mean((1, 2), keepdims=True)) * (1 + c) + y.mean((1, 2), keepdims=True), 0, 1)
        for r, col in np.ndindex(y.shape[1:]):
            hh, ss, vv = colorsys.rgb_to_hsv(*y[:, r, col])
            y[:, r, col] = colorsys.hsv_to_rgb((hh + h) % 1, min(ss * (1 + s), 1.0), vv)
        np.testing.assert_allclose(ours[i].numpy(), y, atol=2e-6)
    torch.testing.assert_close(model.jitter(x, torch.full((3, 4), 0.5)), x, atol=2e-6, rtol=0)  # strength 0


def test_augmentation_is_seeded_per_sample_and_train_only(tiny_dir, demo):
    train, again, other = (data.EpisodeDataset(demo[:2], image_aug=True, seed=s) for s in (3, 3, 4))
    assert "aug" not in data.EpisodeDataset(demo[:2])[5]  # validation sets draw nothing
    batch, same, different = (torch.utils.data.default_collate([d[i] for i in (5, 90)]) for d in (train, again, other))
    assert batch["aug"].shape == (2, 2, 6) and torch.equal(batch["aug"], same["aug"])
    assert not torch.equal(batch["aug"], different["aug"]) and not torch.equal(batch["aug"][:, 0], batch["aug"][:, 1])
    vla = VLA.from_pretrained(tiny_dir, image_aug=True).train()
    x = batch["images"]
    augmented = tower_input(vla, x, batch["aug"])
    assert torch.equal(augmented, tower_input(vla, x, same["aug"]))  # same seed, same augmented batch
    centre = tower_input(vla, x)  # no draws (evaluation, deployment): the centre crop, never random
    assert torch.equal(centre, tower_input(vla.eval(), x))
    assert ((augmented - centre).abs().flatten(1).mean(1) > 3).all()  # every camera of every sample changed
    # the centre crop is PIL's crop + resize of the frame's middle 90% of the area
    lo, hi = (1 - 0.9**0.5) / 2 * 256, (1 + 0.9**0.5) / 2 * 256
    assert torch.equal(centre.round(), torch.stack([pil_resized(f, (lo, lo, hi, hi)) for f in x.flatten(0, 1)]))
    assert not torch.equal(centre.round(), torch.stack([pil_resized(f) for f in x.flatten(0, 1)]))


def test_vit_block_and_tower_by_hand():
    torch.manual_seed(0)
    d, heads, mlp = 8, 2, 16
    block = Block(d, heads, mlp, layer_scale=True).double()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_()
    x = torch.randn(2, 5, d, dtype=torch.float64)

    def ln(t, w, b):
        mu, var = t.mean(-1, keepdim=True), t.var(-1, unbiased=False, keepdim=True)
        return (t - mu) / torch.sqrt(var + 1e-6) * w + b

    sd = {k: v.detach() for k, v in block.state_dict().items()}
    h = ln(x, sd["norm1.weight"], sd["norm1.bias"]) @ sd["attn.qkv.weight"].T + sd["attn.qkv.bias"]
    q, k, v = h[..., :d], h[..., d : 2 * d], h[..., 2 * d :]  # rows [q; k; v], heads contiguous
    out = []
    for i in range(heads):
        s = slice(i * d // heads, (i + 1) * d // heads)
        att = torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / math.sqrt(d // heads), -1)
        out.append(att @ v[..., s])
    x1 = x + sd["ls1.scale_factor"] * (torch.cat(out, -1) @ sd["attn.proj.weight"].T + sd["attn.proj.bias"])
    m = ln(x1, sd["norm2.weight"], sd["norm2.bias"]) @ sd["mlp.fc1.weight"].T + sd["mlp.fc1.bias"]
    m = 0.5 * m * (1 + torch.erf(m / math.sqrt(2)))  # exact GELU
    expected = x1 + sd["ls2.scale_factor"] * (m @ sd["mlp.fc2.weight"].T + sd["mlp.fc2.bias"])
    torch.testing.assert_close(block(x), expected)

    # the tower: pos_embed added to the patches, then cls + registers prepended, last block not run, prefix dropped
    spec = dict(width=d, depth=3, heads=heads, mlp=mlp, cls=True, regs=4, layer_scale=True)
    vit = ViT(spec, 28).double()
    with torch.no_grad():
        for p in vit.parameters():
            p.normal_(0, 0.5)
    assert len(vit.blocks) == 2
    img = torch.randn(1, 3, 28, 28, dtype=torch.float64)
    w = vit.patch_embed.proj.weight
    patches = (
        torch.stack(
            [
                (img[0, :, 14 * r : 14 * r + 14, 14 * c : 14 * c + 14] * w).sum((1, 2, 3))
                for r in range(2)
                for c in range(2)
            ]
        )[None]
        + vit.patch_embed.proj.bias
        + vit.pos_embed
    )
    t = torch.cat([vit.cls_token, vit.reg_token, patches], 1)
    torch.testing.assert_close(vit(img), vit.blocks[1](vit.blocks[0](t))[:, 5:])


def timm_film_block(sd, x, heads, gamma, beta):
    """timm's ViT Block.forward (fused qkv, softmax attention, exact GELU) wrapped as OpenVLA-OFT's
    FiLMedVisionTransformerBlock: x * (1 + gamma) + beta between the attention and the MLP residuals."""
    B, T, d = x.shape

    def ls(name, t):
        return t * sd[f"{name}.scale_factor"] if f"{name}.scale_factor" in sd else t

    qkv = (
        F.linear(
            F.layer_norm(x, (d,), sd["norm1.weight"], sd["norm1.bias"], 1e-6),
            sd["attn.qkv.weight"],
            sd["attn.qkv.bias"],
        )
        .reshape(B, T, 3, heads, d // heads)
        .permute(2, 0, 3, 1, 4)
    )
    q, k, v = qkv.unbind(0)
    attn = ((q * (d // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
    a = (attn @ v).transpose(1, 2).reshape(B, T, d)
    x = x + ls("ls1", F.linear(a, sd["attn.proj.weight"], sd["attn.proj.bias"]))
    x = x * (1 + gamma.view(B, 1, d)) + beta.view(B, 1, d)
    m = F.linear(
        F.layer_norm(x, (d,), sd["norm2.weight"], sd["norm2.bias"], 1e-6), sd["mlp.fc1.weight"], sd["mlp.fc1.bias"]
    )
    return x + ls("ls2", F.linear(F.gelu(m), sd["mlp.fc2.weight"], sd["mlp.fc2.bias"]))


def tower_outputs(vla, x, instructions):
    """What each tower receives and gives in vla(x, instructions): {tower name: (pixels, features)}."""
    seen, hooks = (
        {},
        [
            t.register_forward_hook(lambda m, args, out, name=name: seen.update({name: (args[0], out)}))
            for name, t in vla.vision_backbone.items()
        ],
    )
    with torch.no_grad():
        vla(x, instructions)
    for h in hooks:
        h.remove()
    return seen


def test_film_is_ofts_formula_on_each_samples_prompt_and_listens_to_it(tiny_dir):
    """--film against an independent implementation: timm-style blocks with OFT's FiLM, the same weights (read by
    their names film_layers.{tower}.{block}), e = the mean input embedding of each sample's own prompt (BOS, prompt,
    "▁") taken row by row, so the batch's padding cannot enter. Then: another instruction, other image features."""
    torch.manual_seed(0)
    vla = VLA.from_pretrained(tiny_dir, film=True).eval()
    x, tok = images(3, 2), vla.tokenizer
    assert len({len(t) for t in vla.tokenize(INSTR)}) == 3  # the two shorter prompts are padded in the batch
    table, sd = vla.llm.model.embed_tokens.weight.detach(), vla.state_dict()
    e = torch.stack([table[model.prompt_ids(tok, s)].mean(0) for s in INSTR]).repeat_interleave(2, 0)  # per camera
    seen = tower_outputs(vla, x, INSTR)
    for name, tid in zip(model.TOWERS, vla.config["timm_model_ids"]):
        (pixels, out), tower, spec = seen[name], vla.vision_backbone[name], model.VIT[tid]
        h = F.conv2d(pixels, tower.patch_embed.proj.weight, tower.patch_embed.proj.bias, stride=14)
        h = h.flatten(2).transpose(1, 2) + tower.pos_embed
        prefix = [t.expand(len(h), -1, -1) for t in (tower.cls_token, tower.reg_token) if t is not None]
        h = torch.cat(prefix + [h], 1)
        for i in range(spec["depth"] - 1):  # features from the second-to-last block: those are FiLMed
            block = {
                k[len(f"vision_backbone.{name}.blocks.{i}.") :]: v
                for k, v in sd.items()
                if k.startswith(f"vision_backbone.{name}.blocks.{i}.")
            }

            def film(part):
                return F.linear(
                    e, sd[f"film_layers.{name}.{i}.{part}.weight"], sd[f"film_layers.{name}.{i}.{part}.bias"]
                )

            h = timm_film_block(block, h, spec["heads"], film("scale"), film("shift"))
        expected = h[:, spec["regs"] + spec["cls"] :]
        assert (out - expected).abs().max() < 1e-5, name
    assert sorted(k for k in sd if k.startswith("film_layers.")) == sorted(
        f"film_layers.{t}.{i}.{p}.{w}"
        for t in model.TOWERS
        for i in range(2)
        for p in ("scale", "shift")
        for w in ("weight", "bias")
    )
    # only the instruction changes: with FiLM the features follow it, without they cannot
    other = ["place it", "pick up the shoe", INSTR[2]]  # and a shorter batch: sample 2 sees other padding
    for film, vla in [(True, vla), (False, VLA.from_pretrained(tiny_dir).eval())]:
        a, b = tower_outputs(vla, x, INSTR), tower_outputs(vla, x, other)
        for name in model.TOWERS:
            diff = (a[name][1] - b[name][1]).abs().amax((1, 2))  # per image: samples 0 and 1 changed, sample 2 not
            assert (diff[:4].min() > 1e-3) if film else diff.max() == 0, (film, name, diff)
            assert diff[4:].max() == 0


@pytest.mark.parametrize("proprio_dim, film", [(0, False), (5, True)])
def test_one_step_trains_only_lora_and_head(tiny_dir, proprio_dim, film):
    torch.manual_seed(0)
    vla = add_lora(VLA.from_pretrained(tiny_dir, proprio_dim=proprio_dim, film=film), rank=32).train()
    cfg = vla.peft_config["default"]
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.init_lora_weights) == (32, 16, 0.0, "gaussian")
    wrapped = {n for n, m in vla.named_modules() if isinstance(m, LoraLayer)}
    assert len(wrapped) == 2 * 2 * 4 + 3 + 2 * 7  # 2 towers x 2 blocks x 4, projector, 2 LLM layers x 7
    assert not any(n.startswith(("action_head", "language_model.lm_head", "film_layers")) for n in wrapped)
    trainable = {n for n, p in vla.named_parameters() if p.requires_grad}
    head = ("action_head.", "action_queries", "proprio_projector.", "film_layers.")
    assert all("lora_" in n or n.startswith(head) for n in trainable)
    fully = {n for n, p in vla.named_parameters() if n.startswith(head)}
    assert {n for n in trainable if "lora_" not in n} == fully and all(
        vla.get_parameter(n).dtype == torch.float32 for n in fully
    )
    assert len([n for n in fully if n.startswith("proprio_projector.")]) == 4 * (proprio_dim > 0)  # 2 Linear layers
    assert len([n for n in fully if n.startswith("film_layers.")]) == 16 * film  # 2 towers x 2 blocks x 2 Linear
    assert [n for n, p in vla.named_parameters() if p.requires_grad] == [
        n
        for n, p in add_lora(VLA.from_pretrained(tiny_dir, proprio_dim=proprio_dim, film=film)).named_parameters()
        if p.requires_grad
    ]
    frozen = {n: p.detach().clone() for n, p in vla.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in vla.parameters() if p.requires_grad], lr=1e-3)
    x, target, state = images(2), torch.randn(2, 8, 14), torch.rand(2, proprio_dim) * 2 - 1
    out0 = vla(x, INSTR[:2], state)
    (out0 - target).abs().mean().backward()
    for n, p in vla.named_parameters():
        assert (p.grad is not None) == (n in trainable), n
    # lora_B starts at zero, so lora_A has no gradient until B has moved: after one step every gradient is non-zero
    opt.step()
    opt.zero_grad()
    out1 = vla(x, INSTR[:2], state)
    (out1 - target).abs().mean().backward()
    assert [n for n, p in vla.named_parameters() if n in trainable and not p.grad.abs().sum() > 0] == []
    assert not torch.equal(out0, out1)
    if proprio_dim:  # the state token is read: another state, another chunk; none at all is refused
        assert (vla(x, INSTR[:2], state.flip(0)) - out1).abs().max() > 1e-3
        with pytest.raises(ValueError, match="trained with proprioception: pass state"):
            vla(x, INSTR[:2])
    for n, p in vla.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert "trainable" in param_report(vla)


@pytest.mark.parametrize("film", [False, True])
def test_grad_ckpt_gives_the_same_gradients(tiny_dir, film):
    def grads(ckpt):
        vla = lora_vla(tiny_dir, film=film).train()
        if ckpt:
            enable_grad_ckpt(vla)
        vla(images(1), INSTR[:1]).square().sum().backward()
        return {n: p.grad for n, p in vla.named_parameters() if p.requires_grad}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys() and sum(n.startswith("film_layers.") for n in plain) == 16 * film
    for n in plain:
        torch.testing.assert_close(plain[n], ckpt[n], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("attention", model.ATTENTION)
def test_batched_equals_one_by_one(tiny_dir, attention):
    vla = VLA.from_pretrained(tiny_dir, attention=attention)
    assert len({len(t) for t in vla.tokenize(INSTR)}) == 3
    x = images()
    batched = vla(x, INSTR)
    single = torch.cat([vla(x[i : i + 1], INSTR[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-4)
    swapped = vla(x[[0, 0]], [INSTR[0], INSTR[1]])  # same image, another prompt: the prompt matters
    assert (swapped[0] - swapped[1]).abs().max() > 1e-3


def test_attention_modes_differ_and_never_see_padding(tiny_dir):
    vla = VLA.from_pretrained(tiny_dir)
    x, queries = images(2), vla.action_queries.detach().clone()

    def run(attention, bump):  # bump the last action query and see which chunk steps notice
        vla.attention = attention
        with torch.no_grad():
            vla.action_queries.copy_(queries)
            vla.action_queries[-1] += bump
            return vla(x, INSTR[:2])

    out = {(a, bump): run(a, bump) for a in model.ATTENTION for bump in (0.0, 1.0)}
    c0, c1 = out["causal", 0.0], out["causal", 1.0]
    torch.testing.assert_close(c0[:, :-1], c1[:, :-1], atol=1e-6, rtol=0)  # causal: earlier queries never see it
    for a in ("queries", "full"):  # every query sees it
        assert (out[a, 0.0][:, :-1] - out[a, 1.0][:, :-1]).abs().amax((0, 2)).min() > 1e-4
    for a, b in [("causal", "queries"), ("causal", "full"), ("queries", "full")]:
        assert (out[a, 0.0] - out[b, 0.0])[:, 0].abs().max() > 1e-3, (a, b)
    one = VLA.from_pretrained(tiny_dir, chunk=1)  # one query: causal and queries agree, as nothing else sees it
    causal = one(x, INSTR[:2])
    one.attention = "queries"
    torch.testing.assert_close(one(x, INSTR[:2]), causal, atol=1e-6, rtol=1e-5)
    # right padding: the shorter prompts' rows hold pads; no mode may let a real token read them
    x3, pad = images(), vla.config["pad_token_id"]
    for a in model.ATTENTION:
        vla.attention = a
        with torch.no_grad():
            vla.action_queries.copy_(queries)
            before = vla(x3, INSTR)
            vla.llm.model.embed_tokens.weight[pad] += 5.0
            after = vla(x3, INSTR)
            vla.llm.model.embed_tokens.weight[pad] -= 5.0
        assert torch.equal(before, after), a


def test_save_and_load_trained_reproduce_outputs(tiny_dir, tmp_path):
    vla = lora_vla(tiny_dir, chunk=4, action_dim=7, attention="queries", proprio_dim=3, image_aug=True, film=True)
    x, state = images(2), torch.rand(2, 3) * 2 - 1
    out = vla(x, INSTR[:2], state)
    save_trained(vla, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [
        "action_head.safetensors",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert all(k.startswith("base_model.model.") for k in load_file(tmp_path / "adapter_model.safetensors"))
    fresh = VLA.from_pretrained(tiny_dir)  # default chunk 8 x 14, causal, no state, no FiLM: the head's config wins
    assert not hasattr(fresh, "peft_config")
    load_trained(fresh, str(tmp_path))
    assert (fresh.chunk, fresh.action_dim, fresh.attention, fresh.proprio_dim, fresh.image_aug, fresh.film) == (
        4,
        7,
        "queries",
        3,
        True,
        True,
    )
    assert torch.equal(fresh.eval()(x, INSTR[:2], state), out)
    again = add_lora(VLA.from_pretrained(tiny_dir, chunk=4, action_dim=7, proprio_dim=3, film=True))  # resume
    assert torch.equal(load_trained(again, str(tmp_path)).eval()(x, INSTR[:2], state), out)
    # a head saved before --attention replaced --bidirectional (and before proprio / augmentation / FiLM) still loads
    head, old = str(tmp_path / "old_head.safetensors"), lora_vla(tiny_dir, chunk=4, action_dim=7)
    save_file(
        {k: v.contiguous() for k, v in old.state_dict().items() if k.startswith(model.HEAD)},
        head,
        metadata={"chunk": "4", "action_dim": "7", "hidden": "128", "bidirectional": "true"},
    )
    model.load_head(fresh, head)
    assert (fresh.attention, fresh.proprio_dim, fresh.image_aug, fresh.film) == ("queries", 0, False, False)


def test_merge_matches_lora_and_export_reloads(tiny_dir, tmp_path):
    vla = lora_vla(tiny_dir, proprio_dim=4, attention="full", film=True)
    x, state = images(2), torch.rand(2, 4) * 2 - 1
    out = vla(x, INSTR[:2], state)
    with pytest.raises(ValueError, match="merge_lora"):
        save_pretrained(vla, str(tmp_path / "export"))
    merge_lora(vla)
    assert not any(isinstance(m, LoraLayer) for m in vla.modules())
    plain = VLA.from_pretrained(tiny_dir, proprio_dim=4, attention="full", film=True)
    plain.load_state_dict({k: v for k, v in vla.state_dict().items() if k.startswith(model.HEAD)}, strict=False)
    assert set(vla.state_dict()) == set(plain.state_dict())
    merged = vla(x, INSTR[:2], state)
    torch.testing.assert_close(merged, out, atol=1e-5, rtol=1e-4)
    assert (merged - plain(x, INSTR[:2], state)).abs().max() > 1e-3  # LoRA changed something
    save_pretrained(vla, str(tmp_path / "export"), max_shard_bytes=1 << 20)  # several shards + index
    assert os.path.exists(tmp_path / "export" / "model.safetensors.index.json")
    export = VLA.from_pretrained(str(tmp_path / "export"))  # the head brings proprio_dim, attention, FiLM along
    assert (export.proprio_dim, export.attention, export.film) == (4, "full", True)
    film = {k for k in vla.state_dict() if k.startswith("film_layers.")}
    assert len(film) == 16 and film <= set(load_file(tmp_path / "export" / "action_head.safetensors"))
    torch.testing.assert_close(export(x, INSTR[:2], state), merged, atol=0, rtol=0)


def test_merge_cli(tiny_dir, tmp_path):
    import subprocess
    import sys

    vla = lora_vla(tiny_dir)
    save_trained(vla, str(tmp_path / "ckpt"))
    for f in ("dataset_statistics.json", "args.json"):
        json.dump({"x": 1}, open(tmp_path / "ckpt" / f, "w"))
    merge_lora(vla)
    cmd = [
        sys.executable,
        "merge.py",
        str(tmp_path / "ckpt"),
        "--base",
        tiny_dir,
        "--out",
        str(tmp_path / "out"),
        "--device",
        "cpu",
        "--dtype",
        "float32",
    ]
    subprocess.run(
        cmd,
        check=True,
        cwd=os.path.dirname(os.path.abspath(__file__)),
        capture_output=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert {"dataset_statistics.json", "args.json", "config.json"} <= set(os.listdir(tmp_path / "out"))
    assert "adapter_config.json" not in os.listdir(tmp_path / "out")
    x = images(2)
    torch.testing.assert_close(VLA.from_pretrained(str(tmp_path / "out"))(x, INSTR[:2]), vla(x, INSTR[:2]))
    old = subprocess.run(
        [sys.executable, "model.py", "--merge", str(tmp_path / "ckpt"), "--out", str(tmp_path / "o")],
        cwd=os.path.dirname(os.path.abspath(__file__)),
        capture_output=True,
        text=True,
    )
    assert old.returncode == 1 and old.stderr.startswith("error: merging moved to merge.py: python merge.py CKPT_DIR")
    assert old.stderr.count("\n") == 1 and not os.path.exists(tmp_path / "o")


def test_broken_checkpoints_give_clear_errors(tiny_dir, tmp_path, monkeypatch):
    def copy(name):
        return shutil.copytree(tiny_dir, tmp_path / name)

    d = copy("corrupt")
    with open(d / "model.safetensors", "r+b") as f:
        f.truncate(os.path.getsize(d / "model.safetensors") // 2)
    with pytest.raises(ValueError, match="corrupt safetensors file .*model.safetensors"):
        VLA.from_pretrained(str(d))

    d = tmp_path / "sharded"
    save_pretrained(VLA.from_pretrained(tiny_dir), str(d), max_shard_bytes=1 << 20)
    shard = sorted(set(json.load(open(d / "model.safetensors.index.json"))["weight_map"].values()))[1]
    os.remove(d / shard)
    with pytest.raises(FileNotFoundError, match=f"missing .*{shard}"):
        VLA.from_pretrained(str(d))

    for name, edit, match in [
        ("missing-key", lambda sd: sd.pop("projector.fc2.bias"), r"missing keys \[projector.fc2.bias\]"),
        ("extra-key", lambda sd: sd.update(extra=torch.zeros(1)), r"unexpected keys \[extra\]"),
    ]:
        d = copy(name)
        sd = load_file(d / "model.safetensors")
        edit(sd)
        save_file(sd, d / "model.safetensors")
        with pytest.raises(ValueError, match=match):
            VLA.from_pretrained(str(d))

    d = copy("no-config")
    os.remove(d / "config.json")
    with pytest.raises(FileNotFoundError, match="missing .*config.json"):
        VLA.from_pretrained(str(d))
    (d / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt .*config.json"):
        VLA.from_pretrained(str(d))
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        VLA.from_pretrained(str(tmp_path / "nowhere"))

    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    with pytest.raises(RuntimeError, match="offline.*--vla_path"):
        VLA.from_pretrained("openvla/openvla-7b")

    vla = lora_vla(tiny_dir)
    save_trained(vla, str(tmp_path / "ckpt"))
    with open(tmp_path / "ckpt" / "action_head.safetensors", "r+b") as f:
        f.write(b"\xff" * 16)
    with pytest.raises(ValueError, match="corrupt safetensors file .*action_head.safetensors"):
        load_trained(VLA.from_pretrained(tiny_dir), str(tmp_path / "ckpt"))
    os.remove(tmp_path / "ckpt" / "adapter_model.safetensors")
    with pytest.raises(FileNotFoundError, match="missing .*adapter_model.safetensors"):
        load_trained(VLA.from_pretrained(tiny_dir), str(tmp_path / "ckpt"))
    os.remove(tmp_path / "ckpt" / "adapter_config.json")
    with pytest.raises(FileNotFoundError, match="missing .*adapter_config.json"):
        load_trained(VLA.from_pretrained(tiny_dir), str(tmp_path / "ckpt"))


# ----------------------------------------------------------------------------------------------------
# train.py


def train_flags(tiny_dir, demo_dir, out, *extra):
    return [
        "--vla_path",
        tiny_dir,
        "--data_dir",
        demo_dir,
        "--out_dir",
        str(out),
        "--val_episodes",
        "1",
        "--batch_size",
        "2",
        "--num_workers",
        "0",
        "--lora_rank",
        "4",
        "--log_interval",
        "1",
        "--eval_batches",
        "2",
        *map(str, extra),
    ]


def train_cmd(flags, nproc=1):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    return (launcher if nproc > 1 else [sys.executable]) + ["train.py", *map(str, flags)]


def run_train(flags, nproc=1):
    return subprocess.run(train_cmd(flags, nproc), cwd=HERE, env=ENV, capture_output=True, text=True, timeout=600)


def trained_weights(ckpt):
    return load_file(os.path.join(ckpt, "adapter_model.safetensors")) | load_file(
        os.path.join(ckpt, "action_head.safetensors")
    )


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="session")
def run_a(tiny_dir, demo_dir, tmp_path_factory):
    """6 steps, checkpoints at 3 and 6, lr decay after step 4: the reference for resume, lr and metrics tests."""
    out = tmp_path_factory.mktemp("run_a")
    r = run_train(
        train_flags(
            tiny_dir, demo_dir, out, "--max_steps", 6, "--save_interval", 3, "--eval_interval", 3, "--lr_decay_step", 4
        )
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_checkpoint_is_complete(run_a):
    ckpts = sorted(glob.glob(str(run_a / "step_*")))
    assert [os.path.basename(c) for c in ckpts] == ["step_000003", "step_000006"]
    for f in [
        "adapter_model.safetensors",
        "adapter_config.json",
        "action_head.safetensors",
        "dataset_statistics.json",
        "args.json",
        "trainer_state.pt",
    ]:
        assert os.path.isfile(os.path.join(ckpts[-1], f)), f
    state = torch.load(os.path.join(ckpts[-1], "trainer_state.pt"), weights_only=True)
    assert state["step"] == 6 and state["optimizer"]["state"]
    args = json.load(open(os.path.join(ckpts[-1], "args.json")))
    assert args["vla_path"] and len(args["val_episode_files"]) == 1


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


P_FLAGS = [
    "--proprio",
    "--action_offset",
    1,
    "--attention",
    "full",
    "--film",
    "--save_interval",
    2,
    "--eval_interval",
    2,
    "--grad_ckpt",
    "auto",
]


@pytest.fixture(scope="session")
def run_p(tiny_dir, demo_dir, tmp_path_factory):
    """4 steps with OFT's other levers: proprioception (the demo has no `state`: action[t]), offset 1, full attention,
    and OFT+'s FiLM."""
    out = tmp_path_factory.mktemp("run_p")
    r = run_train(train_flags(tiny_dir, demo_dir, out, *P_FLAGS, "--max_steps", 4))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


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
    assert args["grad_ckpt"] == "off"  # auto on a CPU
    (stats,) = json.load(open(run_p / "step_000004" / "dataset_statistics.json")).values()
    train_files = [p for p in data.list_episodes(demo_dir) if p not in args["val_episode_files"]]
    assert stats["proprio"] == json.loads(json.dumps(data.compute_stats([actions_of(p) for p in train_files])))


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


def test_torchrun_two_ranks(tiny_dir, demo_dir, tmp_path):
    r = run_train(
        train_flags(tiny_dir, demo_dir, tmp_path, "--max_steps", 2, "--save_interval", 2, "--eval_interval", 2), nproc=2
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "trainable weights identical on all 2 ranks" in r.stdout
    assert "global batch 4 = 2 x 1 accum x 2 ranks" in r.stdout
    assert os.path.isfile(tmp_path / "step_000002" / "trainer_state.pt")
    assert not glob.glob(str(tmp_path / "*.tmp"))


def test_an_error_exit_under_torchrun_still_prints_its_message(tiny_dir, demo_dir, tmp_path):
    """A rank skips gloo's teardown at exit (os._exit), so it prints sys.exit's message itself (found after init)."""
    r = run_train(train_flags(tiny_dir, demo_dir, tmp_path, "--batch_size", 1000, "--val_episodes", 0), nproc=2)
    assert r.returncode != 0
    message = "error: 1091 training samples cannot fill one batch of --batch_size 1000 on each of 2 ranks"
    assert r.stderr.count(message) == 2, r.stderr[-3000:]  # one per rank, perhaps interleaved


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
        (["--resume", "/nonexistent/step_000100"], "missing /nonexistent/step_000100/adapter_model.safetensors"),
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
    with pytest.raises(ModelLoads):
        train.main(train_flags(tiny_dir, str(tmp_path), tmp_path / "out"))
    out = capsys.readouterr()
    args = json.loads(out.out[out.out.index("{") : out.out.index("\n}") + 2])
    assert args["val_episode_files"] == [paths[1]] and paths[0] in out.err
    assert "train: 1 episodes" in out.out and "val: 1 episodes" in out.out


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


def test_refuses_to_overwrite_checkpoints(run_a, tiny_dir, demo_dir, monkeypatch):
    monkeypatch.setattr(model.VLA, "from_pretrained", lambda *a, **k: pytest.fail("model loaded before the check"))
    with pytest.raises(SystemExit, match="already holds checkpoints"):
        train.main(train_flags(tiny_dir, demo_dir, run_a))


def find_resume(tiny_dir, demo_dir, out, *extra):
    return train.find_resume(train.get_args(train_flags(tiny_dir, demo_dir, out, "--max_steps", 9, *extra)))


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
    resumed, state = find_resume(tiny_dir, demo_dir, out, "--resume", "auto")
    assert (resumed, state["step"]) == (str(out / "step_000003"), 3)
    note = capsys.readouterr().out
    assert f"note: --resume auto skips {ckpt}: " in note and name in note


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


def test_resume_rules(run_a, tiny_dir, demo_dir, tmp_path, monkeypatch, capsys):
    ckpt = str(run_a / "step_000003")
    # an args.json from before --attention: bidirectional meant the queries see each other
    legacy = shutil.copytree(ckpt, tmp_path / "legacy" / "step_000003")
    args = json.load(open(legacy / "args.json"))
    del args["attention"]
    (legacy / "args.json").write_text(json.dumps(args | {"bidirectional": True}))
    with pytest.raises(SystemExit, match="trained with --attention queries, not causal"):
        find_resume(tiny_dir, demo_dir, tmp_path / "a", "--resume", legacy)
    assert find_resume(tiny_dir, demo_dir, tmp_path / "a", "--resume", legacy, "--attention", "queries")[0] == str(
        legacy
    )
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
    assert train.read_checkpoint(str(tmp_path / "step_000001"))[1]["step"] == 1


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
        cwd=HERE,
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
    assert train.read_checkpoint(str(out / "step_000005"))[1]["step"] == 5
    assert train.read_checkpoint(str(out / "step_000003_v2"))[1]["step"] == 3
    assert find_resume(tiny_dir, demo_dir, out, "--resume", "auto")[0] == str(out / "step_000005")


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
    monkeypatch.setattr(model.VLA, "from_pretrained", stop_at_model_load)
    with pytest.raises(ModelLoads):
        train.main(
            train_flags(
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
        )
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
    args = json.loads(out[out.index("{") : out.index("\n}") + 2])
    assert [os.path.basename(p) for p in args["val_episode_files"]] == val and "train: 5 episodes" in out


def test_grad_ckpt_auto_tries_a_step_and_leaves_no_trace(tiny_dir, demo, monkeypatch):
    vla = lora_vla(tiny_dir).train()
    batch = torch.utils.data.default_collate([data.EpisodeDataset(demo[:1], image_aug=True)[i] for i in range(2)])
    real = VLA.forward

    def forward(self, *args):  # a model that draws from the global RNG (dropout would)
        torch.rand(1)
        return real(self, *args)

    monkeypatch.setattr(VLA, "forward", forward)
    rng = torch.get_rng_state()
    assert train.out_of_memory(vla, batch, nullcontext(), torch.device("cpu")) is False
    assert torch.equal(torch.get_rng_state(), rng) and all(p.grad is None for p in vla.parameters())

    def oom(self, *args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(VLA, "forward", oom)
    assert train.out_of_memory(vla, batch, nullcontext(), torch.device("cpu")) is True


def test_the_core_imports_no_leaf():
    """bench.py imports train.py for its memory model: train.py (--grad_ckpt auto) must not import it back."""
    for name in ["train.py", "model.py", "data.py", "infer.py"]:
        tree = ast.parse(open(os.path.join(HERE, name)).read())
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not imported & {"bench", "demo", "serve", "robotwin", "test_smoke"}, name


def run_patched(patch, flags):
    """train.py run as a script after `patch` (Python run first, inherited by the forked data workers): its exit
    code, its output, and whether some process of the run outlived it (a hang is killed after 120 s)."""
    code = (
        f"import runpy, sys, torch, data, model\n{patch}\nsys.argv = ['train.py', *{list(map(str, flags))!r}]\n"
        "runpy.run_path('train.py', run_name='__main__')"
    )
    p = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=HERE,
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


def test_an_error_in_a_step_ends_every_process(tiny_dir, demo_dir, tmp_path):
    """Data workers ignore SIGTERM (for preemption); an error with them alive used to hang at exit for ever."""
    code, out, left = run_patched(
        OOM_AT_STEP_3,
        train_flags(tiny_dir, demo_dir, tmp_path, "--max_steps", 9, "--num_workers", 1, "--eval_interval", 9),
    )
    assert code == 1 and not left and "torch.OutOfMemoryError: CUDA out of memory" in out, out[-3000:]


def test_a_data_file_failing_mid_run_saves_the_last_step_and_exits_65(tiny_dir, demo_dir, tmp_path, monkeypatch):
    """Also: a relative --vla_path is recorded absolute, so the checkpoint loads from another working directory."""
    flags = train_flags(
        os.path.relpath(tiny_dir, HERE),
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
    args, state = train.read_checkpoint(str(ckpt))
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
    assert train.read_checkpoint(str(tmp_path / "step_000002"))[1]["step"] == 2


def test_a_killed_data_worker_ends_every_process(tiny_dir, demo_dir, tmp_path):
    p, output = start_train(
        train_flags(tiny_dir, demo_dir, tmp_path, "--max_steps", 1000, "--num_workers", 2), until="step 1/"
    )
    workers = open(f"/proc/{p.pid}/task/{p.pid}/children").read().split()
    os.kill(int(workers[0]), signal.SIGKILL)  # as the OOM killer does
    out = output()
    assert p.returncode == 1 and f"DataLoader worker (pid {workers[0]}) is killed by signal: Killed" in out, out[-3000:]
    with pytest.raises(ProcessLookupError):
        os.killpg(p.pid, 0)


# ----------------------------------------------------------------------------------------------------
# infer.py


@pytest.fixture(scope="session")
def policy(run_a):
    return infer.Policy.from_checkpoint(str(run_a / "step_000006"), device="cpu")


@pytest.fixture(scope="session")
def val_episode(run_a):
    return json.load(open(run_a / "step_000006" / "args.json"))["val_episode_files"][0]


def frame_dict(episode, t, cameras):
    return {c: f.permute(1, 2, 0).numpy() for c, f in zip(cameras, episode["frames"](t))}


def test_policy_predicts_raw_actions(policy, val_episode):
    episode = data.read_episode(val_episode, policy.cameras)
    chunk = policy.predict(frame_dict(episode, 0, policy.cameras), "place the shoe on the mat")
    assert chunk.shape == (8, 14) and chunk.dtype == np.float32
    with torch.no_grad():
        normalized = policy.vla(episode["frames"](0)[None], ["place the shoe on the mat"])[0].numpy()
    lo, hi = np.array(policy.stats["min"]), np.array(policy.stats["max"])
    np.testing.assert_allclose(chunk, (normalized + 1) / 2 * (hi - lo) + lo, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="left_wrist_image, got cameras head_camera_image$"):
        policy.predict({"head_camera_image": frame_dict(episode, 0, policy.cameras)["head_camera_image"]}, "x")


def test_policy_brings_live_frames_to_the_training_frames(policy, val_episode):
    """run_a trained with the default augmentation on 256x256 frames: Policy centre-crops, squashes other sizes to
    256x256 with PIL's bicubic as the data conversion did, and can put frames through JPEG first."""
    assert policy.vla.image_aug and policy.frame_sizes == {c: [256, 256] for c in policy.cameras}
    episode = data.read_episode(val_episode, policy.cameras)
    frames = frame_dict(episode, 3, policy.cameras)
    levels = tower_input(policy.vla, None, run=lambda: policy.predict(frames, "place it"))
    lo, hi = (1 - 0.9**0.5) / 2 * 256, (1 + 0.9**0.5) / 2 * 256
    centre = [pil_resized(torch.from_numpy(frames[c]).permute(2, 0, 1), (lo, lo, hi, hi)) for c in policy.cameras]
    assert torch.equal(levels.round(), torch.stack(centre))

    def pil(f, size):
        return np.asarray(Image.fromarray(f).resize(size, Image.BICUBIC))

    live = {c: pil(f, (320, 240)) for c, f in frames.items()}  # what RoboTwin's simulator hands over: 240x320
    np.testing.assert_array_equal(
        policy.predict(live, "place it"), policy.predict({c: pil(f, (256, 256)) for c, f in live.items()}, "place it")
    )

    def jpeg(f):
        buf = io.BytesIO()
        Image.fromarray(f).save(buf, "JPEG", quality=95)
        return np.asarray(Image.open(buf))

    through = infer.Policy(policy.vla, policy.stats, policy.args, policy.device, jpeg_quality=95)
    np.testing.assert_array_equal(
        through.predict(live, "place it"),
        policy.predict({c: pil(jpeg(f), (256, 256)) for c, f in live.items()}, "place it"),
    )
    assert np.abs(through.predict(live, "place it") - policy.predict(live, "place it")).max() > 0


def test_policy_takes_arrays_pil_images_tensors_any_sizes_and_bytes(policy, val_episode):
    episode = data.read_episode(val_episode, policy.cameras)
    frames = frame_dict(episode, 5, policy.cameras)
    expected = policy.predict(frames, "place the shoe")
    pil = {c: Image.fromarray(f) for c, f in frames.items()}
    np.testing.assert_array_equal(policy.predict(pil, "place the shoe"), expected)
    tensors = {c: torch.from_numpy(f) for c, f in frames.items()}
    np.testing.assert_array_equal(policy.predict(tensors, b"place the shoe"), expected)  # bytes: what h5py returns
    sizes = dict(zip(policy.cameras, [(320, 240), (160, 96)]))  # (W, H) per camera: each squashed to 256x256
    mixed = {c: np.asarray(pil[c].resize(sizes[c], Image.BICUBIC)) for c in policy.cameras}
    squashed = {c: np.asarray(Image.fromarray(f).resize((256, 256), Image.BICUBIC)) for c, f in mixed.items()}
    np.testing.assert_array_equal(policy.predict(mixed, "place the shoe"), policy.predict(squashed, "place the shoe"))
    unrecorded = infer.Policy(
        policy.vla, policy.stats, {k: v for k, v in policy.args.items() if k != "frame_sizes"}, policy.device
    )  # an older checkpoint: the model's input size, 224x224
    at_224 = {c: np.asarray(Image.fromarray(f).resize((224, 224), Image.BICUBIC)) for c, f in mixed.items()}
    np.testing.assert_array_equal(unrecorded.predict(mixed, "place it"), unrecorded.predict(at_224, "place it"))


def bad_predict_input(case, frames):
    """Each case: (images, instruction) as a caller might get them wrong."""
    head, wrist = frames["head_camera_image"], frames["left_wrist_image"]
    images = {
        "channels first": {**frames, "head_camera_image": head.transpose(2, 0, 1)},
        "batch dimension": {**frames, "left_wrist_image": wrist[None]},
        "grayscale array": {**frames, "head_camera_image": head[..., 0]},
        "grayscale PIL": {**frames, "head_camera_image": Image.fromarray(head).convert("L")},
        "float frame": {**frames, "head_camera_image": head / 255.0},
        "float tensor": {**frames, "head_camera_image": torch.from_numpy(head).float()},
        "None frame": {**frames, "left_wrist_image": None},
        "one camera": {"head_camera_image": head},
        "a list": [head, wrist],
    }.get(case, frames)
    instruction = {
        "None instruction": None,
        "int instruction": 3,
        "blank instruction": "  ",
        "5,000 words": "place the shoe " * 1700,
    }.get(case, "place the shoe")
    return images, instruction


@pytest.mark.parametrize(
    "case, message",
    [
        (
            "channels first",
            "head_camera_image: expected an HxWx3 uint8 RGB frame .* got ndarray of uint8 \\(3, 256, 256",
        ),
        ("batch dimension", "left_wrist_image: .* got ndarray of uint8 \\(1, 256, 256, 3\\)"),
        ("grayscale array", "got ndarray of uint8 \\(256, 256\\)"),
        ("grayscale PIL", "got Image of uint8 \\(256, 256\\)"),
        ("float frame", "got ndarray of float64 \\(256, 256, 3\\)"),
        ("float tensor", "got Tensor of float32 \\(256, 256, 3\\)"),
        ("None frame", "left_wrist_image: expected .* got NoneType"),
        ("one camera", "for head_camera_image, left_wrist_image, got cameras head_camera_image"),
        ("a list", "expected a dict camera name -> frame .* got list"),
        ("None instruction", "instruction as a non-blank str or bytes, got None"),
        ("int instruction", "got 3"),
        ("blank instruction", "got '  '"),
        ("5,000 words", "too long: .* more than the LLM's 2048"),
    ],
)
def test_policy_refuses_bad_input_in_one_line(case, message, policy, val_episode):
    episode = data.read_episode(val_episode, policy.cameras)
    with pytest.raises(ValueError, match=message) as e:
        policy.predict(*bad_predict_input(case, frame_dict(episode, 0, policy.cameras)))
    assert "\n" not in str(e.value)


def test_policy_with_proprio_takes_the_raw_state(run_p, tmp_path):
    ckpt = run_p / "step_000004"
    policy = infer.Policy.from_checkpoint(str(ckpt), device="cpu")
    assert (policy.vla.proprio_dim, policy.vla.attention, policy.vla.image_aug, policy.vla.film) == (
        14,
        "full",
        True,
        True,
    )
    val = json.load(open(ckpt / "args.json"))["val_episode_files"][0]
    episode = data.read_episode(val, policy.cameras)
    frames, raw = frame_dict(episode, 7, policy.cameras), episode["states"][7]
    np.testing.assert_array_equal(raw, actions_of(val)[7])  # the demo has no `state`: the recorded joint vector
    chunk = policy.predict(frames, "place it", raw)
    lo, hi = np.array(policy.proprio_stats["min"]), np.array(policy.proprio_stats["max"])
    state = torch.tensor(np.clip(2 * (raw - lo) / (hi - lo) - 1, -1, 1)[None], dtype=torch.float32)
    with torch.no_grad():
        direct = policy.vla(episode["frames"](7)[None], ["place it"], state)[0].numpy()
    np.testing.assert_allclose(chunk, data.unnormalize(direct, policy.stats), rtol=1e-5, atol=1e-5)
    assert np.abs(policy.predict(frames, "place it", raw + 0.3) - chunk).max() > 1e-4
    for wrong in (None, raw[:-1], raw[None]):
        with pytest.raises(ValueError, match="trained with proprioception: pass state.*got"):
            policy.predict(frames, "place it", wrong)
    for bad in (np.nan, np.inf, -np.inf):  # one NaN joint would make every joint of the chunk NaN
        with pytest.raises(ValueError, match=r"^predict: the state is NaN or inf at dims \[3\]$"):
            policy.predict(frames, "place it", np.where(np.arange(14) == 3, bad, raw))
    infer.main(["--checkpoint", str(ckpt), "--episode", val, "--out", str(tmp_path)])  # replay feeds the states
    executed = np.array(json.load(open(tmp_path / "report.json"))["executed"])
    assert len(executed) == episode["length"] - 1  # action offset 1
    for t in (0, 30, len(executed) - 1):
        expected = policy.predict(frame_dict(episode, t, policy.cameras), episode["seen"][0], episode["states"][t])
        np.testing.assert_allclose(executed[t], expected[0], rtol=1e-4, atol=1e-5)


def test_ensemble_of_consistent_chunks_is_the_trajectory():
    trajectory = np.random.default_rng(0).normal(size=(30, 14))
    chunks = [trajectory[t : t + 8] for t in range(30 - 8)]
    recent = []
    for t, chunk in enumerate(chunks):
        recent = (recent + [chunk])[-8:]
        np.testing.assert_allclose(infer.ensemble(recent), trajectory[t], atol=1e-12)
    w = np.exp(-0.01 * np.arange(3))
    older_first = [np.full((8, 14), v) for v in (1.0, 2.0, 3.0)]
    np.testing.assert_allclose(infer.ensemble(older_first), (w / w.sum()) @ np.array([1.0, 2.0, 3.0]))


def test_act_replans_every_execute_steps(run_a, val_episode):
    policy = infer.Policy.from_checkpoint(str(run_a / "step_000006"), device="cpu", execute=4)
    episode = data.read_episode(val_episode, policy.cameras)
    calls = []
    predict = policy.predict
    policy.predict = lambda images, text, state=None: calls.append(1) or predict(images, text, state)
    actions = [policy.act(frame_dict(episode, t, policy.cameras), "place the shoe") for t in range(9)]
    assert len(calls) == 3 and all(a.shape == (14,) for a in actions)
    first = predict(frame_dict(episode, 0, policy.cameras), "place the shoe")
    np.testing.assert_allclose(np.stack(actions[:4]), first[:4], rtol=1e-5, atol=1e-6)


def test_infer_episode_end_to_end(run_a, val_episode, policy, tmp_path):
    ckpt = str(run_a / "step_000006")
    r = subprocess.run(
        [sys.executable, "infer.py", "--checkpoint", ckpt, "--episode", val_episode, "--out", str(tmp_path)],
        cwd=HERE,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.load(open(tmp_path / "report.json"))
    r = subprocess.run(
        [sys.executable, "plot.py", str(tmp_path / "report.json")],
        cwd=HERE,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and r.stdout.strip() == f"wrote {tmp_path / 'plot.png'}", r.stderr[-2000:]
    img = Image.open(tmp_path / "plot.png")
    assert img.format == "PNG" and img.size[0] >= 800 and len(img.getcolors(1 << 16) or range(99)) > 3
    episode = data.read_episode(val_episode, policy.cameras)
    instruction = episode["seen"][0]
    assert result["instruction"] == instruction
    # the same numbers, computed directly from the policy and the file
    executed = np.stack(
        [policy.predict(frame_dict(episode, t, policy.cameras), instruction)[0] for t in range(episode["length"])]
    )
    recorded = episode["actions"]
    np.testing.assert_allclose(result["executed"], executed, rtol=1e-4, atol=1e-5)
    assert result["l1_raw"] == pytest.approx(np.abs(executed - recorded).mean(), rel=1e-4)
    assert result["l1"] == pytest.approx(
        np.abs(data.normalize(executed, policy.stats) - data.normalize(recorded, policy.stats)).mean(), rel=1e-4
    )
    assert list(result["l1_per_dim_raw"]) == data.ACTION_NAMES
    assert list(result["l1_per_position"]) == [f"t+{j}" for j in range(8)]
    assert 0 <= result["gripper_agreement"] <= 1 and result["latency_ms"]["p95"] >= result["latency_ms"]["p50"] > 0


def copy_episode(src, dst, drop=None, action_width=None):
    with h5py.File(src) as f, h5py.File(dst, "w") as g:
        for key in f:
            if key == drop:
                continue
            if key == "action" and action_width:
                g["action"] = f["action"][:, :action_width]
            else:
                f.copy(key, g)


@pytest.mark.parametrize(
    "case, message",
    [
        ("no head", "is missing action_head.safetensors"),
        ("no camera", "left_wrist_image"),
        ("action width", ", 12), expected (T, 14)"),
        ("no seen", ": no instructions (no seen dataset or LIBERO problem_info): pass --instruction"),
        ("no unseen", " has no unseen instructions; pass --instruction"),
    ],
)
def test_bad_input_fails_before_the_model_loads(case, message, run_a, val_episode, tmp_path, monkeypatch):
    ckpt, episode = tmp_path / "ckpt", tmp_path / "episode_0.hdf5"
    shutil.copytree(run_a / "step_000006", ckpt)
    drop = {"no camera": "left_wrist_image", "no seen": "seen", "no unseen": "unseen"}.get(case)
    copy_episode(val_episode, episode, drop=drop, action_width=12 if case == "action width" else None)
    if case == "no head":
        os.remove(ckpt / "action_head.safetensors")
    monkeypatch.setattr(model.VLA, "from_pretrained", lambda *a, **k: pytest.fail("model loaded before the check"))
    with pytest.raises(SystemExit) as e:
        infer.main(
            [
                "--checkpoint",
                str(ckpt),
                "--episode",
                str(episode),
                "--out",
                str(tmp_path / "o"),
                "--instruction",
                "unseen" if case == "no unseen" else "seen",
            ]
        )
    assert message in str(e.value.code) and str(episode if case != "no head" else ckpt) in str(e.value.code)
    assert "\n" not in str(e.value.code)


def test_policy_from_merged_export(run_a, policy, val_episode, tmp_path):
    """--base defaults to the base the checkpoint trained on."""
    cmd = [sys.executable, "merge.py", str(run_a / "step_000006"), "--out", str(tmp_path), "--dtype", "float32"]
    r = subprocess.run(cmd, cwd=HERE, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    merged = infer.Policy.from_checkpoint(str(tmp_path), device="cpu")
    episode = data.read_episode(val_episode, policy.cameras)
    images = frame_dict(episode, 5, policy.cameras)
    np.testing.assert_allclose(
        merged.predict(images, "place it"), policy.predict(images, "place it"), rtol=1e-3, atol=1e-4
    )


def edit_json(path, edit):
    obj = json.load(open(path))
    edit(obj)
    json.dump(obj, open(path, "w"))


def edit_stats(key, edit):
    return lambda ckpt: edit_json(ckpt / "dataset_statistics.json", lambda s: edit(next(iter(s.values()))[key]))


def edit_args(edit):
    return lambda ckpt: edit_json(ckpt / "args.json", edit)


def truncate(ckpt):
    with open(ckpt / "adapter_model.safetensors", "r+b") as f:
        f.truncate(os.path.getsize(ckpt / "adapter_model.safetensors") - 100)


@pytest.mark.parametrize(
    "case, edit, message",
    [
        ("min > max", edit_stats("action", lambda a: a.update(min=a["max"], max=a["min"])), "action min > max: "),
        (
            "NaN",
            edit_stats("action", lambda a: a["min"].__setitem__(2, float("nan"))),
            "action min: expected 14 finite",
        ),
        (
            "inf",
            edit_stats("action", lambda a: a["q99"].__setitem__(0, float("inf"))),
            "action q99: expected 14 finite",
        ),
        ("length", edit_stats("action", lambda a: a["max"].pop()), "action max: expected 14 finite values each"),
        ("proprio length", edit_stats("proprio", lambda a: a["q01"].pop()), "proprio q01: expected 14 finite values"),
        (
            "cameras removed",
            edit_args(lambda a: a.update(cameras="head_camera_image")),
            "cameras 'head_camera_image', but the checkpoint was trained with 'head_camera_image,left_wrist_image'",
        ),
        (
            "cameras reordered",
            edit_args(lambda a: a.update(cameras="left_wrist_image,head_camera_image")),
            "cameras 'left_wrist_image,head_camera_image', but the checkpoint was trained with 'head_camera_image,left",
        ),
        ("chunk 0", edit_args(lambda a: a.update(chunk=0)), "chunk 0, but the checkpoint was trained with 8"),
        ('chunk "8"', edit_args(lambda a: a.update(chunk="8")), "chunk '8', but the checkpoint was trained with 8"),
        ("keys missing", edit_args(lambda a: [a.pop("norm"), a.pop("vla_path")]), "args.json: no vla_path, norm"),
        ("args.json corrupt", lambda ckpt: (ckpt / "args.json").write_text("{"), "corrupt .*args.json"),
        ("adapter truncated", truncate, "corrupt safetensors file .*adapter_model.safetensors"),
        (
            "adapter rank",
            lambda ckpt: edit_json(ckpt / "adapter_config.json", lambda c: c.update(r=8)),
            r"adapter_config.json \(r 8\) does not match the tensors in adapter_model.safetensors \(rank \[4\]",
        ),
        (
            "adapter targets",
            lambda ckpt: edit_json(ckpt / "adapter_config.json", lambda c: c["target_modules"].remove("q_proj")),
            r"does not match .* \(rank \[4\]; modules \[language_model.model.layers.0.self_attn.q_proj",
        ),
    ],
)
def test_checkpoint_files_are_checked_against_each_other_before_the_model_loads(
    case, edit, message, run_a, run_p, val_episode, tmp_path, monkeypatch
):
    """A hand-edited or damaged checkpoint: one line naming the file (and the key) from infer.py and from
    Policy.from_checkpoint, before any model loads, instead of a traceback or actions from other inputs."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree((run_p / "step_000004") if case.startswith("proprio") else (run_a / "step_000006"), ckpt)
    edit(ckpt)
    monkeypatch.setattr(model.VLA, "from_pretrained", lambda *a, **k: pytest.fail("model loaded before the check"))
    for load in (
        lambda: infer.main(["--checkpoint", str(ckpt), "--episode", val_episode, "--out", str(tmp_path)]),
        lambda: infer.Policy.from_checkpoint(str(ckpt), device="cpu"),
    ):
        with pytest.raises(SystemExit) as e:
            load()
        assert re.search(message, str(e.value.code)) and str(ckpt) in str(e.value.code), e.value.code
        assert "\n" not in str(e.value.code)


def test_merged_export_with_a_missing_shard_is_one_line(run_a, tiny_dir, tmp_path):
    export = tmp_path / "export"
    vla = merge_lora(load_trained(VLA.from_pretrained(tiny_dir), str(run_a / "step_000006")))
    save_pretrained(vla, str(export), max_shard_bytes=1 << 20)
    for f in ("args.json", "dataset_statistics.json"):
        shutil.copy(run_a / "step_000006" / f, export)
    shard = sorted(set(json.load(open(export / "model.safetensors.index.json"))["weight_map"].values()))[1]
    os.remove(export / shard)
    with pytest.raises(SystemExit, match=f"^error: missing .*{shard}$"):
        infer.Policy.from_checkpoint(str(export), device="cpu")


def run_merge(monkeypatch, *args):
    """merge.py in this process: runpy runs its __main__ block as the command line does."""
    monkeypatch.setattr(sys, "argv", ["merge.py", *map(str, args), "--dtype", "float32"])
    runpy.run_path(os.path.join(HERE, "merge.py"), run_name="__main__")


def test_merge_never_writes_into_the_base_or_the_checkpoint_and_refuses_another_base(
    run_a, tiny_dir, tmp_path, monkeypatch, capsys
):
    ckpt = str(run_a / "step_000006")
    before = {f: open(os.path.join(tiny_dir, f), "rb").read() for f in os.listdir(tiny_dir)}
    for out, where in [
        (tiny_dir, tiny_dir),
        (os.path.join(tiny_dir, "merged"), tiny_dir),
        (ckpt, ckpt),
        (os.path.join(ckpt, "merged"), ckpt),
    ]:
        with pytest.raises(SystemExit, match=f"--out {re.escape(out)} is \\(or is inside\\) .*{re.escape(where)}"):
            run_merge(monkeypatch, ckpt, "--base", tiny_dir, "--out", out)
    assert {f: open(os.path.join(tiny_dir, f), "rb").read() for f in os.listdir(tiny_dir)} == before
    assert not os.path.exists(os.path.join(ckpt, "merged")) and "config.json" not in os.listdir(ckpt)

    other = shutil.copytree(tiny_dir, tmp_path / "other-base")  # the same shapes, another config (norm_stats)
    edit_json(other / "config.json", lambda c: c.update(norm_stats={"libero": {}}))
    with pytest.raises(
        SystemExit,
        match=f"{ckpt} was trained on another base than {other} \\(config.json "
        f"[0-9a-f]{{16}}; {other}'s: [0-9a-f]{{16}}\\): pass the base",
    ):
        run_merge(monkeypatch, ckpt, "--base", other, "--out", tmp_path / "out")
    assert not os.path.exists(tmp_path / "out")

    old = tmp_path / "old"  # a checkpoint saved before heads recorded their base: only the LLM width is compared
    shutil.copytree(ckpt, old)
    with model.open_safetensors(str(old / "action_head.safetensors")) as f:
        meta, sd = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(sd, str(old / "action_head.safetensors"), metadata={k: v for k, v in meta.items() if k != "base"})
    assert model.check_base(str(old), str(other)) == str(other)
    assert (
        capsys.readouterr().out == f"note: {old} records no base fingerprint (saved before nanoOFT did): "
        f"checked {other}'s LLM width\n"
    )
    monkeypatch.setenv("RANK", "1")  # under torchrun only rank 0 says it
    assert model.check_base(str(old), str(other)) == str(other) and capsys.readouterr().out == ""
    monkeypatch.delenv("RANK")
    save_file(sd, str(old / "action_head.safetensors"), metadata={**meta, "hidden": "256", "base": "null"})
    with pytest.raises(ValueError, match=r"another base .* \(LLM width 256; .*'s: 128\)"):
        model.check_base(str(old), tiny_dir)


def test_relative_vla_path_of_older_runs_is_found_from_where_the_run_started(run_a, tiny_dir, tmp_path, monkeypatch):
    """launch.sh --demo trained with --vla_path out/tiny-openvla --out_dir out/demo, as args.json kept them: used
    from elsewhere (RoboTwin's root) the base is looked for where the run started, not on the Hub."""
    start = tmp_path / "nanoOFT"
    ckpt = start / "out" / "demo" / "step_000006"
    shutil.copytree(run_a / "step_000006", ckpt)
    os.symlink(tiny_dir, start / "out" / "tiny-openvla")
    args = json.load(open(ckpt / "args.json")) | {"vla_path": "out/tiny-openvla", "out_dir": "out/demo"}
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert model.trained_base(str(ckpt), args) == str(start / "out" / "tiny-openvla")
    assert model.trained_base(os.path.join("..", "nanoOFT", "out", "demo", "step_000006"), args) == str(
        start / "out" / "tiny-openvla"
    )
    assert model.trained_base(str(ckpt), args | {"vla_path": "openvla/openvla-7b"}) == "openvla/openvla-7b"
    with pytest.raises(FileNotFoundError, match="vla_path tiny-openvla is not found from here: pass the base"):
        model.trained_base(str(ckpt), args | {"vla_path": "tiny-openvla"})
    with pytest.raises(FileNotFoundError, match="vla_path ./out/tiny-openvla is not found"):  # an absolute out_dir
        model.trained_base(str(ckpt), args | {"vla_path": "./out/tiny-openvla", "out_dir": "/elsewhere"})
    monkeypatch.chdir(start)  # the working directory comes first
    assert model.trained_base(str(ckpt), args) == "out/tiny-openvla"
    (start / "out" / "demo" / "step_000006").rename(start / "step_000006")  # moved: no start directory to find
    with pytest.raises(FileNotFoundError, match="not found from here"):
        model.trained_base(str(start / "step_000006"), args | {"vla_path": "./tiny-openvla"})


@pytest.mark.parametrize("execute", [0, -1, 9, 2.0, None])
def test_policy_refuses_execute_outside_the_chunk(execute, policy):
    with pytest.raises(ValueError, match=f"^Policy: execute must be 1..8 \\(the chunk\\), got {execute!r}$"):
        infer.Policy(policy.vla, policy.stats, policy.args, policy.device, execute=execute)


def test_infer_refuses_a_blank_instruction_before_the_model_loads(run_a, val_episode, monkeypatch, capsys):
    monkeypatch.setattr(model.VLA, "from_pretrained", lambda *a, **k: pytest.fail("model loaded before the check"))
    with pytest.raises(SystemExit) as e:
        infer.main(["--checkpoint", str(run_a / "step_000006"), "--episode", val_episode, "--instruction", " "])
    assert e.value.code == 2 and capsys.readouterr().err.splitlines()[-1].endswith(
        "error: --instruction is blank: pass seen, unseen or the text"
    )


# ----------------------------------------------------------------------------------------------------
# bench.py


def test_bench_flops_match_a_hand_count_and_a_train_row(tiny_dir, capsys):
    """bench.py's FLOPs equal a count written out from the tiny twin's published shapes; one real training step
    (grad ckpt) gives a row whose throughput, MFU and HFU are consistent with that count."""
    r, n, K = 4, 2, 8  # LoRA rank, cameras, action queries

    def vit(w, blocks, mlp, prefix):  # per image: T tokens, frozen 4x, LoRA 6x, attention, patch embed forward only
        T, frozen, lora = 256 + prefix, blocks * (4 * w * w + 2 * w * mlp), blocks * r * (8 * w + 2 * mlp)
        return (
            n * (T * (4 * frozen + 6 * lora) + 12 * blocks * w * T * T + 2 * 3 * 14 * 14 * w * 256),
            n * (T * 2 * (frozen + lora) + 4 * blocks * w * T * T),
        )

    def hand(prompt, d=128, ff=512, L=2):  # -> (model FLOPs, grad ckpt recompute) of one sample
        T = n * 256 + prompt + K
        frozen, lora = L * (4 * d * d + 3 * d * ff), L * r * (8 * d + 3 * (d + ff))
        llm = (
            T * (4 * frozen + 6 * lora) + 12 * L * d * T * (T + 1) // 2,
            T * 2 * (frozen + lora) + 4 * L * d * T * (T + 1) // 2,
        )
        proj = n * 256 * (4 * (160 * 640 + 640 * 128 + 128 * 128) + 6 * r * (160 + 2 * 640 + 3 * 128))
        dino, siglip = vit(64, 2, 256, 5), vit(96, 2, 384, 0)  # depth 3, the last block is never built
        return dino[0] + siglip[0] + proj + llm[0] + 6 * K * (3 * d * d + d * 14), dino[1] + siglip[1] + llm[1]

    vla = add_lora(VLA.from_pretrained(tiny_dir), rank=r)
    parts = bench.flops_per_sample(vla, n, 20)
    assert (sum(f for f, _ in parts.values()), sum(c for _, c in parts.values())) == hand(20)

    args = bench.get_args(
        [
            "--vla_path",
            tiny_dir,
            "--batch_size",
            "2",
            "--lora_rank",
            str(r),
            "--warmup",
            "1",
            "--iters",
            "1",
            "--peak_tflops",
            "1",
        ]
    )
    row = bench.train_row(args, torch.device("cpu"), ckpt=True)
    name, ms, samples_per_s, memory, tflops, mfu, hfu, gflop_per_sample = row
    model_flops, recomputed = (sum(hand(len(ids))[i] for ids in vla.tokenize(SEEN[:2])) for i in (0, 1))
    assert name == "grad ckpt" and gflop_per_sample == pytest.approx(model_flops / 2e9)
    assert samples_per_s == pytest.approx(2000 / ms) and mfu == pytest.approx(100 * tflops)  # peak 1 TFLOP/s
    assert hfu / mfu == pytest.approx((model_flops + recomputed) / model_flops)
    bench.table("t", ["config"] + ["x"] * 7, [row, ["no grad ckpt", "out of memory"]])
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].startswith("config") and lines[3].startswith("grad ckpt") and "out of memory" in lines[4]


def test_memory_model_matches_a_real_step_and_its_own_extrapolation(monkeypatch):
    """On a tiny twin with 4 blocks per stage (grad ckpt, a state token, augmentation, full attention, FiLM): the
    estimate, extrapolated from fake runs at 1 and 2 blocks, equals a fake run at full depth, and is within 15% of the
    CPU allocator's real peak for the same step."""
    tiny = tiny_config(make_tokenizer())
    for tid in tiny["timm_model_ids"]:
        monkeypatch.setitem(model.VIT, tid, dict(model.VIT[tid], depth=5))  # 4 blocks built
    deep = dict(tiny, text_config=dict(tiny["text_config"], num_hidden_layers=4))
    common = (deep, 2, True, 2, 20, 4, torch.float32)  # batch, grad ckpt, cameras, prompt tokens, LoRA rank, dtype
    options = dict(chunk=8, action_dim=14, proprio_dim=5, image_aug=True, attention="full", film=True)  # as train.py
    assert set(options) == set(model.HEAD_OPTIONS)
    est = bench.estimate_memory(*common, **options)
    direct = bench.estimate_memory(*common, depths=(4, 4, 4), **options)
    assert est["phase"] == direct["phase"] and est["total"] == pytest.approx(direct["total"], rel=0.01)
    assert sum(v for k, v in est.items() if k not in ("total", "phase")) == est["total"]
    real = bench.measured_peak(*common, **options)
    assert abs(est["total"] / real - 1) < 0.15, (est, real)


def test_bench_memory_film(monkeypatch, capsys):
    """--what memory --film: the 7B's FiLM layers are 2 x (4096 + 1) x tower width per block used (23 DINOv2 blocks
    of 1024, 26 SigLIP blocks of 1152); the memory model counts them as trained fp32 weights with AdamW state, and
    every estimate behind the table and the fit table has them (stubbed there: the 7B's take minutes)."""
    n, towers = bench.film_parameters(openvla_7b_config())
    assert towers == [(23, 1024), (26, 1152)] and n == 2 * (4096 + 1) * (23 * 1024 + 26 * 1152) == 438_411_776
    tiny, one = tiny_config(make_tokenizer()), 2 * (128 + 1) * (64 + 96)  # FiLM at one block per tower
    plain, film = (
        bench.estimate_memory(tiny, 1, False, 2, 20, 4, depths=(1, 1, 1), image_aug=True, film=f) for f in (False, True)
    )
    assert film["trainable weights"] - plain["trainable weights"] == 4 * one
    assert 8 * one <= film["AdamW state"] - plain["AdamW state"] < 8 * one + 1024  # 2 moments (+ AdamW's step)
    calls = []

    def estimate(config, batch_size, grad_ckpt, *args, **options):
        calls.append(options)
        return dict(total=(batch_size + 10 * grad_ckpt) * bench.GB, phase="forward")

    monkeypatch.setattr(bench, "estimate_memory", estimate)
    bench.main(["--what", "memory", "--film"])
    out = capsys.readouterr().out
    assert len(calls) == 11 and all(c == dict(image_aug=True, film=True) for c in calls)
    assert "FiLM layers: 438,411,776 parameters = 2 x (4096 + 1) x (23 x 1024 + 26 x 1152)" in out
    assert "1.63 GB in float32, 6.53 GB with their gradients and AdamW state" in out
    assert "batch 8: 8.0 GB without grad ckpt, 18.0 GB with" in out and "LoRA rank 32, FiLM, bf16" in out


def test_fit_table_lines():
    G = bench.GB
    lines = bench.fit_lines([(1, 20.2 * G, 16.9 * G), (8, 49.84 * G, 18.9 * G), (16, 85.6 * G, 73 * G)])
    assert lines[:3] == [
        "batch 1: 20.2 GB without grad ckpt, 16.9 GB with",
        "batch 8: 49.8 GB without grad ckpt, 18.9 GB with",
        "batch 16: 85.6 GB without grad ckpt, 73.0 GB with",
    ]
    assert lines[-4].split() == ["batch", "24", "GB", "40", "GB", "80", "GB"]
    assert lines[-3].split() == ["1", "yes", "yes", "yes"]  # 20.2 x 1.1 = 22.2
    assert lines[-2].split() == ["8", "grad", "ckpt", "grad", "ckpt", "yes"]
    assert lines[-1].split() == ["16", "no", "no", "no"]  # 73 x 1.1 > 80: the margin counts


@pytest.mark.parametrize(
    "flags, value",
    [
        ([], "off"),
        (["--grad_ckpt"], "on"),
        (["--grad_ckpt", "auto"], "auto"),
        (["--grad_ckpt", "on"], "on"),
        (["--no-grad_ckpt"], "off"),
    ],
)
def test_grad_ckpt_flag_forms(flags, value):
    assert train.get_args(["--data_dir", "d", *flags]).grad_ckpt == value


def test_policy_merges_lora_by_default(run_a, policy, val_episode, tiny_dir):
    """A training checkpoint's LoRA is folded into the base weights in place; unmerged gives the same actions."""
    unmerged = infer.Policy.from_checkpoint(str(run_a / "step_000006"), device="cpu", merge=False)
    assert not any(isinstance(m, LoraLayer) for m in policy.vla.modules())
    assert any(isinstance(m, LoraLayer) for m in unmerged.vla.modules())
    q = "language_model.model.layers.0.self_attn.q_proj.weight"
    base = VLA.from_pretrained(tiny_dir).state_dict()[q]
    assert (policy.vla.state_dict()[q] - base).abs().max() > 1e-6  # the trained LoRA is in the weights now
    images = frame_dict(data.read_episode(val_episode, policy.cameras), 5, policy.cameras)
    np.testing.assert_allclose(
        policy.predict(images, "place it"), unmerged.predict(images, "place it"), rtol=1e-4, atol=1e-5
    )
