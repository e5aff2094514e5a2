"""
data.py: episodes read, checked, normalized and split, and its command line (python data.py DIR), which checks and
summarizes a data directory.
"""

import json
import os
import pickle
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

import data
import model
from helpers import ROOT, actions_of, write_episode


def run_cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "data.py"), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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
