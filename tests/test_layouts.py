"""
The HDF5 layouts data.py reads besides RoboTwin's, with files written the way each recorder writes them:
ACT's record_sim_episodes.py, Mobile ALOHA's record_episodes.py (padded JPEGs that cv2 encoded from RGB arrays) and a
LIBERO/robomimic file holding several demos. Run: python -m pytest -q tests/test_layouts.py
"""

import io
import json
import os
import shlex
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

import check_data
import data
import infer
import train
from demo import cv2_jpeg
from helpers import LIBERO_TASK, write_act_sim, write_aloha_jpeg, write_libero

torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.filterwarnings("ignore:Creating a dataset without passing data or dtype")  # as ACT does


def make_layout(name, directory, rng):
    os.makedirs(directory, exist_ok=True)
    if name == "act":
        for i, T in enumerate((20, 22, 24)):
            write_act_sim(os.path.join(directory, f"episode_{i}.hdf5"), T, rng)
    elif name == "aloha":
        for i, T in enumerate((20, 22, 24)):
            write_aloha_jpeg(os.path.join(directory, f"episode_{i}.hdf5"), T, rng)
    else:
        write_libero(
            os.path.join(directory, "KITCHEN_SCENE1_put_the_black_bowl_on_the_plate_demo.hdf5"), (20, 24, 18), rng
        )
        write_libero(os.path.join(directory, "KITCHEN_SCENE2_open_the_drawer_demo.hdf5"), (19, 21), rng)
    return directory


def run_data_cli(*args):
    """The data check, as a user runs it: python check_data.py DIR ..."""
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "check_data.py"), *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=120,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout, found, extra",
    [
        ("act", "layout: ACT/ALOHA", ["--instruction", "transfer the cube"]),
        ("aloha", "layout: real ALOHA, JPEG frames", ["--instruction", "fold the towel"]),
        ("libero", "layout: robomimic/LIBERO, 5 demos in 2 files", []),
    ],
)
def test_each_layout_is_detected_and_its_flags_line_trains_and_replays(layout, found, extra, tiny_dir, tmp_path):
    directory = make_layout(layout, str(tmp_path / layout), np.random.default_rng(0))
    r = run_data_cli(directory, *extra)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == found
    flags = shlex.split(next(line for line in lines if line.startswith("flags: ")).removeprefix("flags: "))
    expected = {
        "act": ["--cameras", "observations/images/top", "--instruction", "transfer the cube"],
        "aloha": [
            "--cameras",
            "observations/images/cam_high,observations/images/cam_left_wrist,observations/images/cam_low",
            "--instruction",
            "fold the towel",
        ],
        "libero": [
            "--cameras",
            "obs/agentview_rgb,obs/eye_in_hand_rgb",
            "--action_key",
            "actions",
            "--action_dim",
            "7",
        ],
    }[layout]
    assert flags == expected
    out = tmp_path / "run"
    train.main(
        [
            "--vla_path",
            tiny_dir,
            "--data_dir",
            directory,
            "--out_dir",
            str(out),
            "--max_steps",
            "2",
            "--batch_size",
            "2",
            "--num_workers",
            "0",
            "--lora_rank",
            "4",
            "--val_episodes",
            "1",
            "--eval_batches",
            "1",
            "--proprio",
            *flags,
        ]
    )
    saved = json.load(open(out / "step_000002" / "args.json"))
    assert saved["cameras"] == flags[1] and saved["frame_sizes"] == {
        c: [32, 32] if layout == "libero" else [48, 64] for c in flags[1].split(",")
    }
    assert saved["state_key"] == {"libero": "obs/joint_states,obs/gripper_states"}.get(layout, "observations/qpos")
    episode = saved["val_episode_files"][0]
    if layout == "libero":
        assert data.split_ref(episode)[1].startswith("demo_")
    infer.main(["--checkpoint", str(out / "step_000002"), "--episode", episode, "--out", str(tmp_path / "infer")])
    report = json.load(open(tmp_path / "infer" / "report.json"))
    assert (
        report["episode"] == episode
        and report["instruction"]
        == {"act": "transfer the cube", "aloha": "fold the towel", "libero": LIBERO_TASK}[layout]
    )
    assert np.isfinite(report["l1"])
    # the actions' names: ALOHA's 14 joints, else generic dim_i (LIBERO's 7-D end-effector actions)
    names = [f"dim_{i}" for i in range(7)] if layout == "libero" else data.ACTION_NAMES
    assert report["names"] == names and list(report["l1_per_dim_raw"]) == names


def test_aloha_jpegs_decode_in_true_colours_each_camera_with_its_own_lengths(tmp_path):
    path, rgb = write_aloha_jpeg(tmp_path / "episode_0.hdf5", 12, np.random.default_rng(1))
    cameras = [f"observations/images/{c}" for c in ("cam_low", "cam_high", "cam_left_wrist")]
    ds = data.EpisodeDataset([path], cameras=cameras, chunk=4, instruction="fold the towel")
    with h5py.File(path) as f:
        lengths = f["compress_len"][()].astype(int)
        for k, cam in enumerate(("cam_high", "cam_low", "cam_left_wrist")):  # an independent decode, row by row
            stored = f[f"observations/images/{cam}"][5][: lengths[k, 5]].tobytes()
            want = np.asarray(Image.open(io.BytesIO(stored)).convert("RGB"))[..., ::-1]
            got = ds[5]["images"][cameras.index(f"observations/images/{cam}")].permute(1, 2, 0).numpy()
            np.testing.assert_array_equal(got, want)
            assert np.abs(got.astype(int) - rgb[cam][5]).mean() < 8  # JPEG at quality 50 of the recorded frame
            red = got[4:14, 4:19].reshape(-1, 3).mean(0)
            assert red[0] > 180 and red[2] < 60, red  # the red square is red, not blue
    assert ds.frame_sizes == {c: [48, 64] for c in cameras}


def test_libero_demos_are_episodes_named_file_colon_demo(tmp_path):
    path = write_libero(tmp_path / "task_demo.hdf5", (20, 24, 18), np.random.default_rng(2))
    refs = data.list_episodes(str(tmp_path))
    assert refs == [f"{path}:demo_0", f"{path}:demo_1", f"{path}:demo_2"]
    ds = data.EpisodeDataset(
        refs, cameras=["obs/agentview_rgb"], action_key="actions", action_dim=7, chunk=8, proprio=True
    )
    assert ds.lengths == [20, 24, 18] and ds.proprio_dim == 9 and ds.state_key == "obs/joint_states,obs/gripper_states"
    assert {ds[i]["instruction"] for i in range(0, len(ds), 7)} == {LIBERO_TASK}
    train_refs, val_refs = data.split_episodes(refs, 1, seed=7)
    assert len(val_refs) == 1 and val_refs[0] in refs and not set(train_refs) & set(val_refs)
    with h5py.File(path) as f:
        np.testing.assert_allclose(
            ds[12]["actions"].numpy(), data.normalize(f["data/demo_0/actions"][12:20], ds.stats), atol=1e-6
        )


@pytest.mark.slow
def test_broken_variants_are_one_line_naming_the_file_and_the_demo(tmp_path):
    rng = np.random.default_rng(3)
    jpeg_bad, _ = write_aloha_jpeg(tmp_path / "episode_0.hdf5", 10, rng)
    with h5py.File(jpeg_bad, "a") as f:  # the last frame's header overwritten: no longer a JPEG, its length kept
        f["observations/images/cam_high"][9, :64] = 7
    too_long, _ = write_aloha_jpeg(tmp_path / "episode_1.hdf5", 10, rng)
    with h5py.File(too_long, "a") as f:
        f["compress_len"][0, 3] = f["observations/images/cam_high"].shape[1] + 100
    no_actions = write_libero(tmp_path / "task_demo.hdf5", (12, 14), rng, drop="actions")
    with h5py.File(tmp_path / "episode_2.hdf5", "w") as f:
        f["joints"], f.create_group("camera")["rgb"] = np.zeros((10, 14)), np.zeros((10, 4, 4, 3), np.uint8)
    cams = ["observations/images/cam_high"]
    cases = {
        jpeg_bad: (cams, "action", "observations/images/cam_high: frame 9 is not a JPEG (no JPEG header)"),
        too_long: (cams, "action", "no row of compress_len (3, 10) gives the lengths of its JPEG frames"),
        f"{no_actions}:demo_1": (["obs/agentview_rgb"], "actions", "missing actions (a robomimic/LIBERO episode"),
        str(tmp_path / "episode_2.hdf5"): (
            cams,
            "action",
            "no known episode layout (RoboTwin's flat datasets, "
            "ALOHA's observations/images, robomimic's data/demo_N): it holds "
            "datasets joints and groups camera",
        ),
    }
    for ref, (cameras, key, message) in cases.items():
        with pytest.raises(data.DataError) as e:
            data.check_episodes([ref], cameras, 4, 14 if key == "action" else 7, action_key=key, instruction="go")
        assert str(e.value).startswith(f"{ref}: ") and message in str(e.value) and "\n" not in str(e.value)
    r = run_data_cli(tmp_path, "--cameras", cams[0], "--instruction", "go")  # its episode_*.hdf5, one line each
    assert r.returncode != 0 and "Traceback" not in r.stderr
    named = [line.split(": ")[0] for line in r.stderr.splitlines()]
    assert named == [jpeg_bad, too_long, str(tmp_path / "episode_2.hdf5")]
    r = run_data_cli(no_actions)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert [line.split(": ")[0] for line in r.stderr.splitlines()] == [f"{no_actions}:demo_0", f"{no_actions}:demo_1"]


def test_data_files_that_are_wrong_in_their_own_way(tmp_path):
    rng = np.random.default_rng(4)
    base = write_act_sim(tmp_path / "episode_0.hdf5", 12, rng)
    os.symlink(base, tmp_path / "episode_1.hdf5")
    cams = ["observations/images/top"]
    with pytest.raises(data.DataError, match=r"episode_1.hdf5: the same episode as .*episode_0.hdf5 \(same file or"):
        data.check_episodes(data.list_episodes(str(tmp_path)), cams, 4, 14, instruction="go")
    os.remove(tmp_path / "episode_1.hdf5")
    cases = {
        "ints": ("seen", np.arange(5), "seen holds int64 (5,), not text"),
        "2-d": ("seen", np.array([[b"a", b"b"]]), "seen holds |S1 (1, 2), not text"),
        "latin-1": (
            "seen",
            np.array(["café".encode("latin-1")]),
            "seen is not UTF-8 text (unexpected end of data at byte 3)",
        ),
        "bools": ("observations/qpos", np.ones((12, 14), bool), "observations/qpos holds bool, not numbers"),
        "strings": ("action", np.array([[b"1"] * 14] * 12), "action holds |S1, not numbers"),
    }
    for name, (key, value, message) in cases.items():
        path = str(tmp_path / f"{name}.hdf5")
        write_act_sim(path, 12, rng)
        with h5py.File(path, "a") as f:
            if key in f:
                del f[key]
            f[key] = value
        with pytest.raises(data.DataError) as e:
            data.check_episodes([path], cams, 4, 14, instruction="go")
        assert str(e.value).startswith(f"{path}: {message}") and "\n" not in str(e.value), e.value
    filtered = str(tmp_path / "filtered.hdf5")
    write_act_sim(filtered, 12, rng)
    with h5py.File(filtered, "a") as f:  # frames written through a filter this machine lacks (32001: Blosc)
        del f["observations/images/top"]
        d = f.create_dataset(
            "observations/images/top",
            (12, 48, 64, 3),
            np.uint8,
            chunks=(1, 48, 64, 3),
            compression=32001,
            allow_unknown_filter=True,
        )
        for t in range(12):
            d.id.write_direct_chunk((t, 0, 0, 0), b"\0" * 100)
    with pytest.raises(
        data.DataError,
        match=r"filtered.hdf5: observations/images/top: its frames do not read "
        r"\(stored with HDF5 filter .*\(id 32001\), not installed here\)",
    ):
        data.check_episodes([filtered], cams, 4, 14, instruction="go")


def test_open_files_stay_bounded_per_process(tmp_path, monkeypatch):
    rng = np.random.default_rng(5)
    for i in range(40):
        write_act_sim(tmp_path / f"episode_{i}.hdf5", 5, rng, h=8, w=8)
    monkeypatch.setattr(data, "MAX_OPEN", 6)
    ds = data.EpisodeDataset(str(tmp_path), cameras=["observations/images/top"], chunk=2, instruction="go")

    def fds():
        return len(os.listdir("/proc/self/fd"))

    before = fds()
    for i in np.random.default_rng(0).permutation(len(ds)):  # every episode, in random order, twice
        ds[int(i)], ds[int(i)]
        assert len(ds._files) <= 6 and fds() <= before + 6
    with h5py.File(tmp_path / "episode_0.hdf5") as f:  # frames still come from the right episode after evictions
        np.testing.assert_array_equal(ds[1]["images"][0].permute(1, 2, 0).numpy(), f["observations/images/top"][1])


def break_a_middle_frame(path, rgb, how):
    """Frame 3 of cam_low (neither the first, the middle nor the last frame) broken in a real-ALOHA file: its
    compress_len cut short, or a JPEG of another size stored in its place (a camera that changed resolution)."""
    with h5py.File(path, "a") as f:
        d, lengths = f["observations/images/cam_low"], f["compress_len"]
        # the recorder's camera order: cam_high, cam_low, cam_left_wrist
        row = 1
        if how == "cut":
            lengths[row, 3] = lengths[row, 3] - 10
            return
        jpeg = cv2_jpeg(rgb["cam_low"][3][:40])
        assert len(jpeg) <= d.shape[1]
        padded = np.zeros(d.shape[1], np.uint8)
        padded[: len(jpeg)] = jpeg
        d[3] = padded
        lengths[row, 3] = len(jpeg)


@pytest.mark.parametrize(
    "how, message",
    [
        ("cut", "frame 3 does not end at its compress_len {n} (cut off, or a wrong length)"),
        ("size", "frame 3 is 40x64, frame 0 48x64"),
    ],
)
def test_a_broken_jpeg_frame_in_the_middle_is_named_by_the_check(how, message, tmp_path):
    """The check reads every JPEG frame's header and end (not only the first and last frames, which decode): a broken
    frame in the middle is one line naming the file, the camera and the frame, before a run starts."""
    path, rgb = write_aloha_jpeg(tmp_path / "episode_0.hdf5", 10, np.random.default_rng(7))
    good, _ = write_aloha_jpeg(tmp_path / "episode_1.hdf5", 10, np.random.default_rng(8))
    break_a_middle_frame(path, rgb, how)
    cameras = [f"observations/images/{c}" for c in ("cam_high", "cam_low")]
    with h5py.File(path) as f:
        read = data.camera_reader(f, f, cameras[1], path)
        assert read(0).shape == read(9).shape == (48, 64, 3)
        n = int(f["compress_len"][1, 3])
    with pytest.raises(data.DataError) as e:
        data.check_episodes([path, good], cameras, 4, 14, instruction="fold the towel")
    assert str(e.value) == f"{path}: observations/images/cam_low: " + message.format(n=n)
    with pytest.raises(data.DataError, match="frame 3"):
        data.EpisodeDataset([path], cameras=cameras, chunk=4, instruction="fold the towel")
    assert data.check_episodes([good], cameras, 4, 14, instruction="fold the towel") == [good]


def write_empty_libero(path):
    """A robomimic/LIBERO file whose data/ group holds no demos (a recording that saved none)."""
    with h5py.File(path, "w") as f:
        f.create_group("data").attrs["problem_info"] = json.dumps({"language_instruction": LIBERO_TASK})
    return str(path)


def test_a_libero_file_without_demos_is_named_and_its_neighbours_pass(tmp_path):
    """An empty data/ group is refused by name, as what it is; the demos of the good file beside it are not broken.
    The empty file sorts first: the layout (and so the cameras and action key) still comes from the good one."""
    empty = write_empty_libero(tmp_path / "A_empty_demo.hdf5")
    good = write_libero(tmp_path / "KITCHEN_SCENE1_demo.hdf5", (12, 14), np.random.default_rng(9))
    refs = data.list_episodes(str(tmp_path))
    assert refs == [empty, f"{good}:demo_0", f"{good}:demo_1"]
    with pytest.raises(data.DataError) as e:
        data.check_episodes(refs, ["obs/agentview_rgb"], 4, 7, action_key="actions")
    assert str(e.value) == f"{empty}: a robomimic/LIBERO file whose data/ group holds no demo_N groups"
    assert data.check_episodes(refs[1:], ["obs/agentview_rgb"], 4, 7, action_key="actions") == refs[1:]
    layout, width, texts = check_data.first_layout(refs, None)
    assert layout == ("robomimic/LIBERO", ["obs/agentview_rgb", "obs/eye_in_hand_rgb"], "actions")
    assert (width, texts) == (7, True)


def test_a_group_named_as_a_camera_is_one_line(tiny_dir, tmp_path, monkeypatch):
    """--cameras observations/images (the group, not a camera inside it): one line that names the datasets inside."""
    path = write_act_sim(tmp_path / "episode_0.hdf5", 12, np.random.default_rng(10), cameras=("top", "left_wrist"))
    with pytest.raises(data.DataError) as e:
        data.check_episodes([path], ["observations/images"], 4, 14, instruction="go")
    assert str(e.value) == (
        f"{path}: observations/images is a group, not a dataset: name the datasets inside it "
        "(e.g. observations/images/left_wrist, observations/images/top)"
    )
    monkeypatch.setattr(train.model.VLA, "from_pretrained", lambda *a, **k: pytest.fail("model loaded"))
    flags = ["--vla_path", tiny_dir, "--data_dir", str(tmp_path), "--out_dir", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as e:
        train.main(flags + ["--cameras", "observations/images", "--instruction", "go", "--val_episodes", "0"])
    assert str(e.value.code) == f"error: {path}: observations/images is a group, not a dataset: " + (
        "name the datasets inside it (e.g. observations/images/left_wrist, observations/images/top)"
    )
