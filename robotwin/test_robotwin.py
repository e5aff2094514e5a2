"""
Tests of robotwin/: raw RoboTwin episodes of both layouts are written here the way RoboTwin writes them (JPEGs made
the cv2 way), converted with robotwin/convert.py and checked against the raw files. Run from the repository root:

    python -m pytest -q test_smoke.py robotwin/test_robotwin.py
"""

import io
import json
import os
import re
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
from PIL import Image

import data
import demo
from robotwin import convert

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1")
RAW_CAMERAS = ["head_camera", "left_camera", "right_camera", "front_camera"]  # in data.ALL_CAMERAS' order
B_CAMERAS = ["cam_head", "cam_left_wrist", "cam_right_wrist", "cam_third_view"]
RED, BLUE = (230, 20, 20), (20, 20, 230)


def scene(t, camera):
    """A true-RGB 24x32 frame: red top left, blue bottom right, a white bar that moves with t, a shade per camera."""
    img = np.empty((24, 32, 3), np.uint8)
    img[:] = (40 * camera, 160, 60)
    img[:12, :16], img[12:, 16:] = RED, BLUE
    img[12:, t : t + 2] = 255
    return img


def jpeg_cv2_way(rgb):
    """What cv2.imencode(".jpg", rgb) stores: it takes the array for BGR, i.e. the JPEG of the channel-reversed
    image (quality 95, 4:2:0 chroma, both OpenCV's defaults)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb[..., ::-1])).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def texts(n):
    return {
        "seen": [f"episode {n}: put the shoe on the mat with the left arm", f"episode {n}: place the shoe"],
        "unseen": [f"episode {n}: set down the footwear"],
    }


def write_raw_a(src, n, T, cameras=RAW_CAMERAS, frames=None, broken_frame=None, instructions=True):
    """Layout A as RoboTwin's collector writes it: one JPEG per frame in a fixed-length, NUL-padded S dataset."""
    os.makedirs(os.path.join(src, "data"), exist_ok=True)
    os.makedirs(os.path.join(src, "instructions"), exist_ok=True)
    vector = np.random.default_rng(n).normal(size=(T, 14))
    with h5py.File(os.path.join(src, "data", f"episode{n}.hdf5"), "w") as f:
        for c, cam in enumerate(RAW_CAMERAS):
            jpegs = [jpeg_cv2_way(scene(t, c)) for t in range(frames or T)]
            if cam == broken_frame:
                jpegs[2] = b"this is not a JPEG"
            if cam in cameras:
                f.create_dataset(f"observation/{cam}/rgb", data=jpegs, dtype=f"S{max(map(len, jpegs))}")
        f["joint_action/vector"] = vector
        f["joint_action/left_arm"], f["joint_action/left_gripper"] = vector[:, :6], vector[:, 6]
        f["joint_action/right_arm"], f["joint_action/right_gripper"] = vector[:, 7:13], vector[:, 13]
    if instructions:
        with open(os.path.join(src, "instructions", f"episode{n}.json"), "w") as f:
            json.dump(texts(n), f)
    return vector


def write_raw_b(src, n, T, instructions=True):
    """Layout B (XPolicyLab v1.0): state/* = frames 0..T-2, action/* = frames 1..T-1, T-1 JPEGs per camera."""
    os.makedirs(os.path.join(src, "data"), exist_ok=True)
    vector = np.random.default_rng(n).normal(size=(T, 14)).astype(np.float32)
    parts = {
        "left_arm_joint_states": vector[:, :6],
        "left_ee_joint_states": vector[:, 6:7],
        "right_arm_joint_states": vector[:, 7:13],
        "right_ee_joint_states": vector[:, 13:],
    }
    with h5py.File(os.path.join(src, "data", f"episode_{n:07d}.hdf5"), "w") as f:
        string = h5py.string_dtype("utf-8")
        f.create_dataset("data_format_version", data="v1.0", dtype=string)
        if instructions:
            f.create_dataset("instructions", data=json.dumps(texts(n)["seen"]), dtype=string)
        f["additional_info/frequency"] = np.int32(15)
        for key, values in parts.items():
            f[f"state/{key}"], f[f"action/{key}"] = values[:-1], values[1:]
        for c, cam in enumerate(B_CAMERAS):
            jpegs = [jpeg_cv2_way(scene(t, c)) for t in range(T - 1)]
            f.create_dataset(f"vision/{cam}/colors", data=jpegs, dtype=f"S{max(map(len, jpegs))}")
            f[f"vision/{cam}/shape"] = np.array([24, 32, 3], np.int32)
    return vector[:-1]


def robotwin_frames(jpegs, size):
    """RoboTwin's OpenVLA-OFT converter's frames (PIL decode, bicubic squash): red and blue swapped."""
    return np.stack(
        [
            np.array(Image.open(io.BytesIO(j.tobytes())).convert("RGB").resize((size, size), Image.BICUBIC))
            for j in jpegs
        ]
    )


@pytest.mark.parametrize("layout", ["A", "B"])
def test_converts_both_layouts(layout, tmp_path, capsys):
    src, out = str(tmp_path / "place_shoe" / "demo_clean"), str(tmp_path / "out")
    raw = {n: (write_raw_a if layout == "A" else write_raw_b)(src, n, T) for n, T in ((0, 10), (2, 11), (10, 9))}
    convert.main([src, out, "--size", "16", "--workers", "2"])
    assert sum(" -> " in line for line in capsys.readouterr().out.splitlines()) == 3
    paths = data.list_episodes(out)  # the raw episode numbers, whose sorted and shuffled orders differ
    assert [os.path.basename(p) for p in paths] == ["episode_0.hdf5", "episode_2.hdf5", "episode_10.hdf5"]
    for p, (n, vector) in zip(paths, raw.items()):
        name = f"episode{n}.hdf5" if layout == "A" else f"episode_{n:07d}.hdf5"
        with h5py.File(p, "r") as f, h5py.File(os.path.join(src, "data", name), "r") as r:
            assert f["action"].dtype == np.float64 and np.array_equal(f["action"][()], vector)
            v = vector.astype(np.float64)  # layout B stores float32
            relative = np.zeros_like(v)  # RoboTwin's relative_action
            relative[:-1] = v[1:] - v[:-1]
            relative[-1] = relative[-2]
            assert np.array_equal(f["relative_action"][()], relative)
            assert list(f["seen"].asstr()[()]) == texts(n)["seen"]
            if layout == "A":
                assert list(f["unseen"].asstr()[()]) == texts(n)["unseen"]
            else:
                assert "unseen" not in f
            for c, (ours, name) in enumerate(zip(data.ALL_CAMERAS, RAW_CAMERAS if layout == "A" else B_CAMERAS)):
                video = f[ours]
                assert video.dtype == np.uint8 and video.shape == (len(vector), 16, 16, 3)
                assert video.chunks == (1, 16, 16, 3)
                jpegs = r[f"observation/{name}/rgb" if layout == "A" else f"vision/{name}/colors"][()]
                assert np.array_equal(video[()], robotwin_frames(jpegs, 16)[..., ::-1])
                red, blue = video[:, 1:7, 1:7].reshape(-1, 3), video[:, 9:15, 9:15].reshape(-1, 3)
                assert np.abs(red.astype(int) - RED).max() < 25 and np.abs(blue.astype(int) - BLUE).max() < 25
    data.check_episodes(paths, data.ALL_CAMERAS, 8, 14)
    ds = data.EpisodeDataset(out, cameras=data.ALL_CAMERAS)
    assert ds[0]["images"].shape == (4, 3, 16, 16) and ds[0]["instruction"].startswith("episode 0:")


def test_broken_raw_inputs_are_named_one_line_each(tmp_path):
    """Run as RoboTwin users would, from elsewhere, with a package named data (like RoboTwin's) on the path."""
    src, out = tmp_path / "src", tmp_path / "out"
    write_raw_a(src, 0, 9)
    write_raw_a(src, 3, 9, cameras=RAW_CAMERAS[:3])
    write_raw_a(src, 4, 9, broken_frame="left_camera")
    write_raw_a(src, 5, 9, frames=8)
    write_raw_a(src, 6, 9, instructions=False)
    write_raw_b(src, 7, 9, instructions=False)
    write_raw_a(src, 1, 9)
    (src / "data" / "episode1.hdf5").write_text("this is not HDF5")
    shadow = tmp_path / "robotwin_root"
    (shadow / "data").mkdir(parents=True)
    (shadow / "data" / "__init__.py").write_text("raise ImportError('RoboTwin data/ imported instead of nanoOFT')\n")
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "robotwin", "convert.py"),
            str(src),
            str(out),
            "--size",
            "16",
            "--workers",
            "2",
        ],
        capture_output=True,
        text=True,
        cwd=shadow,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(shadow), "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    expected = {
        f"{src}/data/episode1.hdf5": "not a readable HDF5 file",
        f"{src}/data/episode3.hdf5": "missing observation/front_camera/rgb",
        f"{src}/data/episode4.hdf5": "observation/left_camera/rgb: frame 2 does not decode",
        f"{src}/data/episode5.hdf5": "cameras and joints differ in length: joint_action/vector 9, "
        "observation/head_camera/rgb 8",
        f"{src}/instructions/episode6.json": f"missing (the instructions of {src}/data/episode6.hdf5)",
        f"{src}/data/episode_0000007.hdf5": "missing instructions",
    }
    lines = r.stderr.splitlines()
    assert len(lines) == len(expected) + 1 and lines[-1] == f"{out}: 1 converted, 0 already there, 6 failed"
    for file, problem in expected.items():
        assert sum(line.startswith(file + ": ") and problem in line for line in lines) == 1, (file, r.stderr)
    assert os.listdir(out) == ["episode_0.hdf5"]  # no half files left behind
    data.check_episodes([str(out / "episode_0.hdf5")], data.ALL_CAMERAS, 8, 14)

    write_raw_b(src, 3, 9)  # episode3.hdf5 and episode_0000003.hdf5
    with pytest.raises(data.DataError, match="episode 3 is there twice"):
        convert.find_episodes(str(src))
    with pytest.raises(SystemExit, match="no raw RoboTwin episodes"):
        convert.main([str(src / "data"), str(out)])


def test_interrupted_conversion_resumes(tmp_path, capsys, monkeypatch):
    src, out = str(tmp_path / "src"), tmp_path / "out"
    for n in (0, 2, 10):
        write_raw_a(src, n, 9)
    convert.main([src, str(out), "--size", "16", "--workers", "2"])
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    done = os.stat(out / "episode_0.hdf5")

    def killed(*args):
        raise KeyboardInterrupt

    os.remove(out / "episode_2.hdf5")  # convert episode 2 again, killed before its file is whole
    monkeypatch.setattr(convert.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        convert.convert_episode(
            (2, "A", f"{src}/data/episode2.hdf5", f"{src}/instructions/episode2.json", str(out), 16)
        )
    monkeypatch.undo()
    (half,) = set(os.listdir(out)) - set(first)
    os.truncate(out / half, 5000)
    assert [os.path.basename(p) for p in data.list_episodes(str(out))] == ["episode_0.hdf5", "episode_10.hdf5"]
    capsys.readouterr()
    convert.main([src, str(out), "--size", "16", "--workers", "2"])
    log = capsys.readouterr().out
    assert log.count("already converted, skipped") == 2 and log.count(" -> ") == 1 and "episode_2.hdf5" in log
    (converted,) = [line for line in log.splitlines() if " -> " in line]  # not a terminal: the ETA ends the line
    assert converted.startswith("[3/3] ") and re.search(r"s\) \| \d+s elapsed, eta 0s$", converted), converted
    assert sorted(os.listdir(out)) == sorted(first)  # the temporary file is gone
    assert (os.stat(out / "episode_0.hdf5").st_mtime_ns, os.stat(out / "episode_0.hdf5").st_ino) == (
        done.st_mtime_ns,
        done.st_ino,
    )
    with h5py.File(out / "episode_2.hdf5", "r") as f, h5py.File(io.BytesIO(first["episode_2.hdf5"]), "r") as g:
        for key in [*data.ALL_CAMERAS, "action", "relative_action"]:
            assert np.array_equal(f[key][()], g[key][()])

    os.remove(out / "episode_10.hdf5")  # a re-run at another size would mix frame sizes: refused by name
    with pytest.raises(SystemExit, match="frame sizes differ"):
        convert.main([src, str(out), "--size", "8"])


FAKE_EVAL = r'''
"""RoboTwin's evaluator in miniature: its root (with a `data` package of its own, already imported) first on
sys.path, ./policy next, the policy imported as a package, and a TASK_ENV with RoboTwin's interface."""
import importlib, json, sys
import numpy as np
root, ckpt, obs_file, step_lim = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
sys.path[:0] = [root, root + "/policy"]
import data  # RoboTwin's, imported before the policy as RoboTwin's own code may
assert data.ROBOTWIN
policy = importlib.import_module("nanooft")
obs = np.load(obs_file)


class FakeTaskEnv:
    def __init__(self):
        self.actions, self.observed, self.step_lim = [], [], step_lim

    def get_obs(self):
        t = min(len(self.actions), len(obs["states"]) - 1)
        self.observed.append(t)
        cams = ["head_camera", "left_camera", "right_camera", "front_camera"]
        return {"observation": {c: {"rgb": obs["frames"][t, i]} for i, c in enumerate(cams)},
                "joint_action": {"vector": obs["states"][t]}, "endpose": {}}

    def get_instruction(self):
        return "set down the footwear"

    def take_action(self, action, action_type="qpos"):
        assert action_type == "qpos" and np.shape(action) == (14,)
        if len(self.actions) < self.step_lim:  # RoboTwin ignores actions past the step limit
            self.actions.append(np.asarray(action, dtype=float).tolist())


env = FakeTaskEnv()
args = dict(policy_name="nanooft", task_name="place_shoe", task_config="demo_clean", ckpt_setting=ckpt, seed=0,
            instruction_type="unseen", checkpoint=None, execute=4, ensemble=False, device="cpu", jpeg_quality=None)
model = policy.get_model(args)
policy.reset_model(model)
while len(env.actions) < env.step_lim:
    policy.eval(env, model, env.get_obs())
print(json.dumps({"actions": env.actions, "observed": env.observed, "data": sys.modules["data"].__file__}))
'''


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Raw episodes converted, and a tiny policy with proprioception and the front camera trained on them the way
    launch.sh --demo trains: from its own directory, with a relative --vla_path and --out_dir. -> that directory"""
    here = tmp_path_factory.mktemp("nanooft-run")
    for n in range(3):
        write_raw_a(str(here / "raw"), n, 30)
    convert.main([str(here / "raw"), str(here / "episodes"), "--size", "32", "--workers", "1"])
    demo.make_tiny(str(here / "tiny"))
    flags = [
        "--vla_path",
        "tiny",
        "--data_dir",
        "episodes",
        "--out_dir",
        "run",
        "--val_episodes",
        "1",
        "--batch_size",
        "2",
        "--num_workers",
        "0",
        "--lora_rank",
        "4",
        "--max_steps",
        "2",
        "--save_interval",
        "2",
        "--eval_interval",
        "2",
        "--proprio",
        "--action_offset",
        "1",
        "--cameras",
        "head_camera_image,low_cam_image",
    ]
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), *flags], cwd=here, env=ENV, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return here


def test_robotwin_loads_and_runs_the_policy_package(trained, tmp_path, monkeypatch):
    """A fake RoboTwin evaluator imports robotwin/ as policy/nanooft and runs it on 240x320 frames with a step limit,
    from RoboTwin's root as eval.sh does, on a checkpoint whose args.json names its base relative to the checkpoint
    itself (as a policy shipped in a repository does); infer.py uses it from another directory too."""
    import infer

    ckpt = str(tmp_path / "run" / "step_000002")  # copied beside the base, as out/demo sits beside out/tiny-openvla
    shutil.copytree(trained / "run" / "step_000002", ckpt)
    os.symlink(trained / "tiny", tmp_path / "tiny")
    args = json.load(open(os.path.join(ckpt, "args.json")))
    assert os.path.basename(args["vla_path"]) == "tiny" and os.path.basename(args["out_dir"]) == "run"
    json.dump(args | {"vla_path": "../../tiny", "out_dir": "run"}, open(os.path.join(ckpt, "args.json"), "w"))

    root = tmp_path / "RoboTwin"
    (root / "data").mkdir(parents=True)
    (root / "data" / "__init__.py").write_text("ROBOTWIN = True\n")
    (root / "policy").mkdir()
    os.symlink(os.path.join(ROOT, "robotwin"), root / "policy" / "nanooft")

    def upscale(f):
        return np.asarray(Image.fromarray(f).resize((320, 240), Image.BICUBIC))

    frames = np.stack([[upscale(scene(t, c)) for c in range(4)] for t in range(12)])  # the simulator's 240x320
    states = np.random.default_rng(0).normal(size=(12, 14))
    np.savez(tmp_path / "obs.npz", frames=frames, states=states)
    (tmp_path / "fake_eval.py").write_text(FAKE_EVAL)
    r = subprocess.run(
        [sys.executable, str(tmp_path / "fake_eval.py"), str(root), ckpt, str(tmp_path / "obs.npz"), "10"],
        cwd=str(root),
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.splitlines()[-1])
    assert os.path.realpath(result["data"]) == os.path.join(ROOT, "data.py")  # ours, not RoboTwin's data/

    policy = infer.Policy.from_checkpoint(ckpt, device="cpu")
    assert policy.cameras == ["head_camera_image", "low_cam_image"] and policy.vla.proprio_dim == 14
    actions, expected = np.array(result["actions"]), []
    for t in (0, 4, 8):  # a re-plan every 4 actions, each from the observation fetched after the last action
        images = {"head_camera_image": frames[t, 0], "low_cam_image": frames[t, 3]}  # front camera -> low_cam_image
        expected.append(policy.predict(images, "set down the footwear", states[t])[:4])
    assert actions.shape == (10, 14)
    np.testing.assert_allclose(actions, np.concatenate(expected)[:10], rtol=1e-5, atol=1e-5)
    assert sorted(set(result["observed"])) == list(range(11))  # a fresh observation after every action

    monkeypatch.chdir(root)
    episode = os.path.join(trained, "episodes", "episode_0.hdf5")
    infer.main(["--checkpoint", ckpt, "--episode", episode, "--out", str(tmp_path / "infer")])
    assert len(json.load(open(tmp_path / "infer" / "report.json"))["executed"]) == 30 - 1  # action offset 1


class TaskEnv:
    def __init__(self, obs):
        self.obs, self.actions = obs, []

    def get_instruction(self):
        return "set down the footwear"

    def take_action(self, action, action_type="qpos"):
        self.actions.append(action)

    def get_obs(self):
        return self.obs


def test_policy_package_refuses_bad_execute_nan_states_and_missing_cameras_in_one_line(trained, monkeypatch):
    import model
    from robotwin import deploy_policy

    ckpt = str(trained / "run" / "step_000002")
    args = dict(ckpt_setting=ckpt, checkpoint=None, ensemble=False, device="cpu", jpeg_quality=None)
    with monkeypatch.context() as m:
        m.setattr(model.VLA, "from_pretrained", lambda *a, **k: pytest.fail("model loaded before the check"))
        for execute in (-1, 0, 9, None):  # -1 made eval act never, so RoboTwin's loop never reached its step limit
            with pytest.raises(
                ValueError, match=f"^deploy_policy.yml: execute must be 1..8 \\(the chunk of {ckpt}\\), got {execute}$"
            ):
                deploy_policy.get_model(args | {"execute": execute})
    policy = deploy_policy.get_model(args | {"execute": 2})
    frame, state = np.zeros((240, 320, 3), np.uint8), np.zeros(14)
    cameras = {c: {"rgb": frame} for c in RAW_CAMERAS}
    env = TaskEnv({"observation": cameras, "joint_action": {"vector": state}})
    deploy_policy.eval(env, policy, env.obs)
    assert len(env.actions) == 2 and np.isfinite(env.actions).all()
    env.obs["joint_action"]["vector"] = np.where(np.arange(14) == 5, np.nan, state)
    with pytest.raises(ValueError, match=r"^predict: the state is NaN or inf at dims \[5\]$"):
        deploy_policy.eval(env, policy, env.obs)
    del cameras["front_camera"]
    with pytest.raises(
        ValueError,
        match="^nanoOFT: the observation has no front_camera \\(the checkpoint reads "
        "head_camera, front_camera\\); it has head_camera, left_camera, right_camera$",
    ):
        deploy_policy.eval(env, policy, env.obs)
    assert len(env.actions) == 2
