"""
Tests of from_lerobot.py on LeRobot datasets that LeRobot itself wrote (tests/fixtures/lerobot_v3 by lerobot 0.4.4,
lerobot_v21 by lerobot 0.3.3, AV1 videos; tests/fixtures/make_lerobot_fixture.py made them and holds the frames,
states, actions and tasks they were made from). Run from the repository root:

    pip install -r requirements.txt -r requirements-lerobot.txt
    python -m pytest -q tests/test_from_lerobot.py
"""

import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import check_data
import data
import from_lerobot
import train
from demo import make_tiny

torch.set_num_threads(1)
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FIXTURES = {"v3.0": os.path.join(HERE, "fixtures", "lerobot_v3"), "v2.1": os.path.join(HERE, "fixtures", "lerobot_v21")}
_spec = importlib.util.spec_from_file_location(
    "make_lerobot_fixture", os.path.join(HERE, "fixtures", "make_lerobot_fixture.py")
)
fixture = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fixture)
CAMERAS = {"observation.images.top": "observations/images/top", "observation.images.wrist": "observations/images/wrist"}
FLAGS = ["--cameras", "observations/images/top,observations/images/wrist", "--action_dim", "7"]


def copy_fixture(tmp_path, version="v3.0"):
    """A copy of a fixture to break."""
    return shutil.copytree(FIXTURES[version], tmp_path / "src")


def edit_episode_meta(src, episode, column, value):
    """Rewrite one value of a v3.0 dataset's meta/episodes parquet."""
    path = src / "meta" / "episodes" / "chunk-000" / "file-000.parquet"
    table = pq.read_table(path)
    values = table.column(column).to_pylist()
    values[episode] = value
    pq.write_table(table.set_column(table.column_names.index(column), column, [values]), path)


def expected_tasks(episode):
    """The episode's task strings in the order its frames first show them, and each frame's index into them."""
    per_frame = [fixture.task_of(episode, t) for t in range(fixture.LENGTHS[episode])]
    seen = list(dict.fromkeys(per_frame))
    return seen, [seen.index(task) for task in per_frame]


def check_frames(video, episode, camera, exact_size=True):
    """Decoded frames against those LeRobot was given: every frame's bits in order (the frame index), the
    episode's grey, true red and the camera's colour at the block centres, and (at the recorded size) the whole
    frame within AV1's error."""
    length, h, w = video.shape[:3]
    want = np.stack([fixture.frame(episode, t, camera) for t in range(length)]).astype(int)
    got = video[()].astype(int)
    y, x = h * 5 // 6, [w * (2 * i + 1) // 8 for i in range(4)]  # the centres of the four bit squares
    bits = got[:, y][:, x].mean(-1) > 128
    assert bits.tolist() == [[bool(b) for b in fixture.frame_bits(t)] for t in range(length)]
    red, colour, grey = got[:, h // 6, w // 4], got[:, h // 6, w * 3 // 4], got[:, h // 2, w // 2]
    assert np.abs(red - fixture.RED).max() <= 12
    assert np.abs(colour - fixture.CAMERA_COLOURS[camera]).max() <= 12
    assert np.abs(grey - (40 + 70 * episode)).max() <= 6
    if exact_size:  # AV1 at crf 30 with 4:2:0 chroma: about 1.7 on average, up to 41 along the colour edges
        error = np.abs(got - want)
        assert error.mean() < 4 and np.quantile(error, 0.95) <= 12, (error.mean(), np.quantile(error, 0.95))


@pytest.mark.parametrize("version", ["v3.0", "v2.1"])
def test_converts_what_lerobot_wrote_in_order_in_true_colours(version, tmp_path, capsys):
    out = tmp_path / "out"
    from_lerobot.main([FIXTURES[version], str(out)])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" -> ")[0] for line in lines[:3]] == [f"[{k + 1}/3] episode {k}" for k in range(3)]
    assert all("eta 0h00m" in line for line in lines[:3]) and lines[3].startswith(f"{out}: 3 converted")
    paths = data.list_episodes(str(out))
    assert [os.path.basename(p) for p in paths] == ["episode_0.hdf5", "episode_1.hdf5", "episode_2.hdf5"]
    for episode, path in enumerate(paths):
        state, action = fixture.values(episode)
        seen, per_frame = expected_tasks(episode)
        with h5py.File(path, "r") as f:
            assert f.attrs["lerobot_codebase_version"] == version and f.attrs["lerobot_episode_index"] == episode
            assert f.attrs["fps"] == fixture.FPS and f.attrs["robot_type"] == "so100_follower"
            assert f["action"].dtype == np.float32 and np.array_equal(f["action"][()], action)
            assert np.array_equal(f["observations/qpos"][()], state)
            assert json.loads(f["action"].attrs["names"]) == fixture.ACTION_NAMES
            assert json.loads(f["observations/qpos"].attrs["names"]) == fixture.STATE_NAMES
            assert f["observations/qpos"].attrs["lerobot_key"] == "observation.state"
            assert list(f["seen"].asstr()[()]) == seen and f["task"][()].tolist() == per_frame
            assert sorted(f["observations/images"]) == ["top", "wrist"]
            for key, name in CAMERAS.items():
                video = f[name]
                assert video.shape == (fixture.LENGTHS[episode], 48, 64, 3) and video.dtype == np.uint8
                assert video.attrs["lerobot_key"] == key
                check_frames(video, episode, key)
    assert expected_tasks(2)[0] == fixture.TASKS  # episode 2 holds both tasks, in their order


def test_episodes_and_size_pick_and_resize(tmp_path, capsys):
    out = tmp_path / "out"
    from_lerobot.main([FIXTURES["v3.0"], str(out), "--episodes", "0,2-2", "--size", "24x32"])
    assert sorted(os.listdir(out)) == ["episode_0.hdf5", "episode_2.hdf5"]
    assert "[2/2] episode 2 -> " in capsys.readouterr().out
    with h5py.File(out / "episode_2.hdf5", "r") as f:
        for key, name in CAMERAS.items():
            assert f[name].shape == (15, 24, 32, 3)
            check_frames(f[name], 2, key, exact_size=False)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--episodes", "0,4-7"], "--episodes: [4, 5, 6, 7] not in"),
        (["--episodes", "3-1"], "--episodes 3-1: expected numbers and ranges"),
        (["--size", "24"], "--size 24: expected HEIGHTxWIDTH"),
    ],
)
def test_bad_flags_fail_in_one_line_before_any_work(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        from_lerobot.main([FIXTURES["v3.0"], str(tmp_path / "out"), *flags])
    said = str(e.value.code) if e.value.code != 2 else capsys.readouterr().err.splitlines()[-1]
    assert message in said and not (tmp_path / "out").exists()


def test_a_rerun_skips_finished_episodes_and_redoes_an_interrupted_one(tmp_path, capsys):
    out = tmp_path / "out"
    from_lerobot.main([FIXTURES["v3.0"], str(out), "--episodes", "0"])
    before = os.stat(out / "episode_0.hdf5")
    (out / "episode_1.hdf5.tmp").write_bytes(b"cut short by an interrupted run")
    capsys.readouterr()
    from_lerobot.main([FIXTURES["v3.0"], str(out)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "[1/3] episode 0: already converted, skipped"
    assert lines[1].startswith("[2/3] episode 1 -> ") and lines[3].startswith(f"{out}: 2 converted, 1 already there")
    assert os.stat(out / "episode_0.hdf5").st_mtime_ns == before.st_mtime_ns
    assert sorted(os.listdir(out)) == ["episode_0.hdf5", "episode_1.hdf5", "episode_2.hdf5"]
    with h5py.File(out / "episode_1.hdf5", "r") as f:
        check_frames(f["observations/images/wrist"], 1, "observation.images.wrist")


def break_missing_video(src):
    os.remove(src / "videos" / "observation.images.wrist" / "chunk-000" / "file-001.mp4")
    return 2, "episode 2: observation.images.wrist: videos/observation.images.wrist/chunk-000/file-001.mp4: missing"


def break_short_clip(src):
    edit_episode_meta(src, 1, "videos/observation.images.top/to_timestamp", 1.9)  # 7 of episode 1's 9 frames
    return 1, "episode 1: observation.images.top: 7 frames in videos/observation.images.top/chunk-000/file-000.mp4"


def break_no_frames(src):
    edit_episode_meta(src, 0, "videos/observation.images.top/from_timestamp", 5.0)  # past the video's end
    edit_episode_meta(src, 0, "videos/observation.images.top/to_timestamp", 6.2)
    return 0, "episode 0: observation.images.top: no frames in videos/observation.images.top/chunk-000/file-000.mp4"


def break_length(src):
    edit_episode_meta(src, 2, "length", 14)
    return 2, "episode 2: data/chunk-000/file-001.parquet: 15 rows with frame_index 0-14, expected frames 0-13"


def break_corrupt_video(src):
    (src / "videos" / "observation.images.top" / "chunk-000" / "file-001.mp4").write_bytes(b"not a video" * 100)
    return 2, "episode 2: observation.images.top: videos/observation.images.top/chunk-000/file-001.mp4: does not decode"


def break_v21_video(src):
    """A recording cut short: episode 2's video holds episode 1's 9 frames for 15 parquet rows."""
    folder = src / "videos" / "chunk-000" / "observation.images.top"
    shutil.copy(folder / "episode_000001.mp4", folder / "episode_000002.mp4")
    return 2, "episode 2: observation.images.top: 9 frames in videos/chunk-000/observation.images.top/episode_000002"


@pytest.mark.parametrize(
    "version, breaks",
    [
        ("v3.0", break_missing_video),
        ("v3.0", break_corrupt_video),
        ("v3.0", break_short_clip),
        ("v3.0", break_no_frames),
        ("v3.0", break_length),
        ("v2.1", break_v21_video),
    ],
)
def test_a_broken_episode_is_named_in_one_line_and_the_others_convert(version, breaks, tmp_path, capsys):
    src, out = copy_fixture(tmp_path, version), tmp_path / "out"
    broken, message = breaks(src)
    with pytest.raises(SystemExit) as e:
        from_lerobot.main([str(src), str(out)])
    assert str(e.value.code) == f"{out}: 2 converted, 0 already there, 1 failed (episodes {broken})"
    problems = capsys.readouterr().err.splitlines()
    assert len(problems) == 1 and problems[0].startswith(message), problems
    others = sorted(f"episode_{n}.hdf5" for n in range(3) if n != broken)
    assert sorted(os.listdir(out)) == others  # and no .tmp left behind


@pytest.mark.parametrize("version", ["v1.6", None])
def test_an_unknown_version_is_refused_before_any_work(version, tmp_path):
    src = copy_fixture(tmp_path)
    info = json.loads((src / "meta" / "info.json").read_text())
    info["codebase_version"] = version
    (src / "meta" / "info.json").write_text(json.dumps(info))
    with pytest.raises(SystemExit) as e:
        from_lerobot.main([str(src), str(tmp_path / "out")])
    assert (
        str(e.value.code) == f"{src}/meta/info.json: codebase_version {version}; from_lerobot.py reads v3.0, v2.1, v2.0"
    )
    assert not (tmp_path / "out").exists()


def test_cameras_of_different_sizes_need_size(tmp_path):
    src = copy_fixture(tmp_path)
    info = json.loads((src / "meta" / "info.json").read_text())
    info["features"]["observation.images.wrist"]["info"]["video.width"] = 80
    (src / "meta" / "info.json").write_text(json.dumps(info))
    with pytest.raises(SystemExit) as e:
        from_lerobot.main([str(src), str(tmp_path / "out")])
    assert "observation.images.wrist 48x80): pass --size HxW" in str(e.value.code)


@pytest.mark.slow
def test_the_command_exits_1_naming_the_broken_episode(tmp_path):
    src = copy_fixture(tmp_path)
    broken, message = break_missing_video(src)
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "from_lerobot.py"), str(src), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        timeout=120,
    )
    assert r.returncode == 1 and r.stderr.splitlines()[0] == message
    assert r.stderr.splitlines()[1].endswith(f"1 failed (episodes {broken})")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny(str(tmp_path_factory.mktemp("tiny-openvla")))


@pytest.mark.slow
def test_check_data_detects_the_converted_files_and_its_flags_train(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    from_lerobot.main([FIXTURES["v3.0"], str(out)])
    capsys.readouterr()
    check_data.summarize(str(out))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "layout: ACT/ALOHA" and lines[1].startswith("3 episodes, 36 frames (length 9-15")
    assert f"seen: 1-2 variants per episode, e.g. {fixture.TASKS[0]} | {fixture.TASKS[1]}" in lines
    flags = shlex.split(next(line for line in lines if line.startswith("flags: ")).removeprefix("flags: "))
    assert flags == FLAGS
    run = tmp_path / "run"
    train.main(
        [
            *("--vla_path", tiny_dir, "--data_dir", str(out), "--out_dir", str(run)),
            *("--max_steps", "2", "--batch_size", "2", "--num_workers", "0", "--lora_rank", "4"),
            *("--val_episodes", "1", "--eval_batches", "1", "--proprio", *flags),
        ]
    )
    saved = json.load(open(run / "step_000002" / "args.json"))
    assert saved["cameras"] == FLAGS[1] and saved["state_key"] == "observations/qpos"
    assert saved["frame_sizes"] == {name: [48, 64] for name in CAMERAS.values()}
