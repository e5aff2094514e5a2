"""
data.py: episodes read, checked, normalized and split. Its command line, the data check, is a leaf with tests of its
own (tests/test_check_data.py); the RoboTwin arm check is robotwin/check.py's (robotwin/test_check.py).
"""

import json
import os
import pickle

import h5py
import numpy as np
import pytest
import torch

import data
from helpers import BROKEN, actions_of, write_blank_instructions, write_broken, write_episode


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
    np.testing.assert_allclose(data.unnormalize(s["actions"].numpy(), ds.stats, "q99"), expect, atol=1e-5)


def test_action_names():
    """RoboTwin's and ALOHA's 14 joints by name (left arm, then right), any other width as dim_0, dim_1, ..."""
    assert data.action_names(14) == data.ACTION_NAMES and data.ACTION_NAMES[6::7] == ["left_gripper", "right_gripper"]
    assert data.action_names(7) == ["dim_0", "dim_1", "dim_2", "dim_3", "dim_4", "dim_5", "dim_6"]
    assert data.action_names(1) == ["dim_0"]


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
    # float32 in, float32 out (computed in float64): what a model's output or a batch of actions is
    a32 = a.astype(np.float32)
    n32 = data.normalize(a32, stats)
    assert isinstance(n32, np.ndarray) and n32.dtype == np.float32
    np.testing.assert_allclose(n32, n, atol=1e-5)
    back = data.unnormalize(n32, stats)
    assert back.dtype == np.float32 and np.allclose(back, a32, atol=1e-5) and (back[:, 2] == 0.25).all()
    # any leading shape: a (B, chunk, D) batch of chunks
    np.testing.assert_array_equal(data.normalize(a.reshape(50, 10, 4), stats), n.reshape(50, 10, 4))
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
    path.write_text('{"place_shoe": {"action": ')  # cut off
    with pytest.raises(data.DataError, match=f"^{path}: not JSON \\(Expecting value: line 1 column 27"):
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
    return write_broken(tmp_path)


def test_check_names_every_broken_file(broken, capsys):
    paths = data.list_episodes(str(broken))
    with pytest.raises(data.DataError) as err:
        data.check_episodes(paths, data.DEFAULT_CAMERAS, 8, 14)
    lines = str(err.value).splitlines()
    assert len(lines) == len(BROKEN)
    for line, (i, problem) in zip(lines, BROKEN.items()):
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


def test_check_refuses_missing_empty_and_blank_instructions(tmp_path):
    paths = write_blank_instructions(tmp_path)
    with pytest.raises(data.DataError) as err:
        data.check_episodes(paths, data.DEFAULT_CAMERAS, 8, 14)
    lines = str(err.value).splitlines()
    assert [line.split(":")[0] for line in lines] == paths[1:]
    assert lines[0].endswith(
        ': no instructions (no seen dataset or LIBERO problem_info): pass --instruction "what the robot should do"'
    )
    assert all(line.endswith(": seen instructions missing, empty or all blank") for line in lines[1:3])
    assert lines[3].endswith(": unseen instructions missing, empty or all blank")
    assert data.check_episodes(paths[:1], data.DEFAULT_CAMERAS, 8, 14) == paths[:1]
