"""
Tests of aloha/: the simulator glue against gym-aloha's own env, ACT's scripted demos with and without the weld fix,
record.py's files read back by data.py, and evaluate.py closed loop on a checkpoint train.py made from them.
Run from the repository root (needs aloha/requirements.txt; rendering uses EGL, or MUJOCO_GL=osmesa):

    python -m pytest -q aloha/test_aloha.py
"""

import fcntl
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from PIL import Image

import data
import evaluate
import record

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
SIZE = (48, 64)  # small frames keep recording and rendering fast; the physics is the same at any size


def run(script, *args):
    return subprocess.run(
        [sys.executable, *script.split(), *map(str, args)],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("task", record.TASKS)
def test_sim_steps_exactly_as_gym_alohas_env(task):
    """make_sim/reset/step/render reproduce gym.make(...).reset(seed)/step bit for bit: pose, agent_pos, reward,
    the top camera's pixels (both with the fast settings; gym's env would otherwise render the stock scene)."""
    import gym_aloha  # noqa: F401  (registers the envs)
    import gymnasium as gym

    name = {"transfer_cube": "AlohaTransferCube-v0", "insertion": "AlohaInsertion-v0"}[task]
    env = gym.make(f"gym_aloha/{name}", obs_type="pixels_agent_pos", max_episode_steps=400)
    gym_physics = env.unwrapped._env.physics
    gym_physics.model.vis.quality.offsamples = 0
    gym_physics.model.light_castshadow[:] = 0
    physics, task_obj = record.make_sim(task)
    pose = record.object_pose(task, 1234)
    obs, _ = env.reset(seed=1234)
    record.reset(physics, task_obj, pose)
    np.testing.assert_array_equal(gym_physics.data.qpos, physics.data.qpos)
    actions = np.random.default_rng(0).normal(0, 0.3, (6, 14)) + task_obj.get_qpos(physics)
    for a in actions:
        obs, reward, *_ = env.step(a)
        assert record.step(physics, task_obj, a) == reward
    np.testing.assert_array_equal(obs["agent_pos"], task_obj.get_qpos(physics))
    np.testing.assert_array_equal(obs["pixels"]["top"], record.render(physics, (480, 640)))


@pytest.mark.parametrize("task", ["transfer_cube", "insertion"])
def test_object_xy_is_where_gym_aloha_puts_the_objects(task):
    """record.object_xy, the state a located policy is given, is the x, y of the cube (or the peg and the socket)
    bodies gym-aloha's reset(seed) places, for seeds of every use (demos, evaluation, rollouts)."""
    import gym_aloha  # noqa: F401  (registers the envs)
    import gymnasium as gym

    name = {"transfer_cube": "AlohaTransferCube-v0", "insertion": "AlohaInsertion-v0"}[task]
    bodies = {"transfer_cube": ["box"], "insertion": ["peg", "socket"]}[task]
    env = gym.make(f"gym_aloha/{name}", obs_type="pixels_agent_pos")
    for seed in [0, 1042, 20007]:
        env.reset(seed=seed)
        xpos = env.unwrapped._env.physics.named.data.xpos
        placed = np.concatenate([xpos[b][:2] for b in bodies])
        np.testing.assert_allclose(record.object_xy(task, record.object_pose(task, seed)), placed, atol=1e-6)


def test_weld_fix_makes_the_scripted_demo_succeed():
    """Without the torquescale fix the wrist ignores the mocap orientation (MuJoCo 3): the cube is never handed
    over; with it the right arm picks it and the left takes it (reward 4) near step 291, as on mujoco 2.3.7."""
    _, without, _ = record.scripted_rollout("transfer_cube", 0, weld_fix=False, steps=300)
    _, with_fix, _ = record.scripted_rollout("transfer_cube", 0, weld_fix=True, steps=300)
    assert without.max() < 4
    assert with_fix.max() == 4 and 280 <= np.argmax(with_fix == 4) <= 300


def test_quaternions():
    q = record.qmul(record.about([0, 1, 0], -60), record.about([0, 1, 0], 60))
    np.testing.assert_allclose(q, [1, 0, 0, 0], atol=1e-12)
    np.testing.assert_allclose(record.about([1, 0, 0], 90), [np.sqrt(0.5), np.sqrt(0.5), 0, 0])
    i, j = [0, 1, 0, 0], [0, 0, 1, 0]
    np.testing.assert_allclose(record.qmul(i, j), [0, 0, 0, 1])  # i j = k (Hamilton)


def test_zoom_magnifies_as_a_pinhole_camera():
    """--zoom 2 halves the field of view's tangent: the cube's distance from the frame's centre doubles and its image
    covers 4x the pixels, at the same frame size."""

    def cube(zoom):
        physics, task_obj = record.make_sim("transfer_cube", zoom=zoom)
        record.reset(physics, task_obj, record.object_pose("transfer_cube", 0))
        frame = record.render(physics, (240, 320)).astype(int)
        ys, xs = np.nonzero((frame[..., 0] > 150) & (frame[..., 1] < 80) & (frame[..., 2] < 80))
        return len(ys), np.hypot(ys.mean() - 119.5, xs.mean() - 159.5)

    (area1, off1), (area2, off2) = cube(1.0), cube(2.0)
    assert area1 > 30 and area2 / area1 == pytest.approx(4, rel=0.1)
    assert off1 > 10 and off2 / off1 == pytest.approx(2, rel=0.05)


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    """One transfer-cube demo (seed 5), then a re-run after an interruption: it cleans up and records nothing new."""
    out, size = tmp_path_factory.mktemp("demos"), "x".join(map(str, SIZE))
    r = run("aloha/record.py", out, "--episodes", 1, "--seed", 5, "--size", size)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "episode 1/1 | seed 5" in r.stdout and "reward 4 at step" in r.stdout
    assert "1 episodes, 1 seeds tried (5..5)" in r.stdout
    open(out / "episode_1.hdf5.tmp", "wb").close()  # what an interrupted longer run leaves behind
    r = run("aloha/record.py", out, "--episodes", 1, "--seed", 5, "--size", size)
    assert r.returncode == 0 and "1 episodes already recorded, resuming at seed 6" in r.stdout, r.stderr[-2000:]
    return out


def test_recorded_files_have_acts_layout(demos):
    assert sorted(os.listdir(demos)) == [".lock", "episode_0.hdf5"]  # the lock stays, as train.py's does
    for n, seed in enumerate([5]):
        with h5py.File(demos / f"episode_{n}.hdf5", "r") as f:
            assert f.attrs["sim"] and f.attrs["task"] == "transfer_cube" and f.attrs["seed"] == seed
            assert f.attrs["zoom"] == 1.0 and f.attrs["render"] == "fast"
            np.testing.assert_array_equal(f.attrs["object_pose"], record.object_pose("transfer_cube", seed))
            top = f["observations/images/top"]
            assert top.dtype == np.uint8 and top.shape == (400, *SIZE, 3) and top.chunks == (1, *SIZE, 3)
            for k in ["observations/qpos", "observations/qvel", "action"]:
                assert f[k].dtype == np.float32 and f[k].shape == (400, 14)
            # where the cube starts, in every frame
            where = record.object_xy("transfer_cube", record.object_pose("transfer_cube", seed))
            np.testing.assert_array_equal(f["observations/object_xy"][()], np.tile(where, (400, 1)))
            # and after the joint state of each frame
            both = np.concatenate([f["observations/qpos"][()], np.tile(where, (400, 1))], 1)
            np.testing.assert_array_equal(f["observations/qpos_object_xy"][()], both)
            # frame t shows the state before action[t]; the replay tracks the targets closely
            assert np.abs(f["observations/qpos"][1:, :6] - f["action"][:-1, :6]).mean() < 0.05
            # the recorded trajectory still reaches reward 4 when replayed from the stored pose
            _, rewards = record.replay("transfer_cube", f["action"][()], f.attrs["object_pose"], SIZE, cameras=())
            assert rewards.max() == 4


def test_recorded_files_load_with_data_py(demos):
    cam = "observations/images/top"
    ds = data.EpisodeDataset(str(demos), cameras=[cam], chunk=8, proprio=True, instruction="transfer the cube")
    assert len(ds) == 400 - 8 + 1 and ds.state_key == "observations/qpos"
    s = ds[10]
    assert s["instruction"] == "transfer the cube"
    with h5py.File(demos / "episode_0.hdf5", "r") as f:
        np.testing.assert_array_equal(s["images"][0].permute(1, 2, 0).numpy(), f[cam][10])
        np.testing.assert_allclose(data.unnormalize(s["actions"].numpy(), ds.stats), f["action"][10:18], atol=1e-5)
        state = f["observations/qpos"][10]
    np.testing.assert_allclose(s["state"].numpy(), data.normalize_state(state, ds.proprio_stats), atol=1e-6)


@pytest.fixture(scope="module")
def checkpoint(demos, tmp_path_factory):
    """The CPU recipe itself (train.sh, one process), cut to one step: its flags must still be train.py's. It runs
    from another directory than the repository, given the demos, the run and the model as paths relative to it.
    --no-compile after OUT_DIR undoes the recipe's --compile (compiling would take most of the test's time); bf16 is
    the recipe's dtype where the CPU computes it natively."""
    from demo import make_tiny

    tiny, out = make_tiny(str(tmp_path_factory.mktemp("tiny"))), tmp_path_factory.mktemp("run")
    here = tmp_path_factory.getbasetemp()
    flags = (
        os.path.relpath(demos, here),
        os.path.relpath(out, here),
        "--val_episodes",
        0,
        "--batch_size",
        2,
        "--lora_rank",
        4,
        "--max_steps",
        1,
        "--save_interval",
        1,
        "--eval_interval",
        1,
        "--eval_batches",
        1,
        "--no-compile",
    )
    r = subprocess.run(
        ["bash", os.path.join(ROOT, "aloha", "train.sh"), *map(str, flags)],
        cwd=here,
        capture_output=True,
        text=True,
        env=dict(ENV, VLA_PATH=os.path.relpath(tiny, here), NPROC="1", PYTHON=sys.executable),
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    args = json.loads((out / "step_000001" / "args.json").read_text())
    assert (args["cameras"], args["instruction"], args["attention"], args["image_aug"], args["proprio"]) == (
        "observations/images/top",
        "transfer the cube",
        "full",
        False,
        False,
    )
    assert (args["lr"], args["lr_decay_step"], args["vla_path"], args["world_size"]) == (2e-4, 8000, tiny, 1)
    with open("/proc/cpuinfo") as f:
        native_bf16 = bool(set(f.read().split()) & {"avx512_bf16", "amx_bf16"})
    assert (args["compile"], args["dtype"]) == (False, "bfloat16" if native_bf16 else "auto")
    return out / "step_000001"


def test_train_sh_takes_paths_relative_to_the_callers_directory(checkpoint, demos):
    """The checkpoint fixture ran train.sh from the directory above its demos with relative paths: train.sh cds to
    the repository, so it must have made them absolute first (they also stay valid for evaluate.py from anywhere)."""
    args = json.loads((checkpoint / "args.json").read_text())
    assert args["data_dir"] == str(demos) and args["out_dir"] == str(checkpoint.parent)
    assert os.path.isabs(args["vla_path"]) and os.path.isdir(args["vla_path"])


def test_evaluate_closed_loop_writes_report_and_gif(checkpoint, demos, tmp_path):
    r = run(
        "aloha/evaluate.py",
        "--checkpoint",
        checkpoint,
        "--episodes",
        2,
        "--seed",
        1000,
        "--steps",
        12,
        "--execute",
        4,
        "--gif",
        1,
        "--baseline",
        demos,
        "--out",
        tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert [ln.split(" | ")[:2] for ln in lines if ln.startswith(("policy |", "baseline |"))] == [
        ["policy", "seed 1000"],
        ["policy", "seed 1001"],
        ["baseline", "seed 1000"],
        ["baseline", "seed 1001"],
    ]
    assert any(ln.startswith("policy: 0/2 = 0% success (95% CI 0-66%)") for ln in lines)
    assert any(ln.startswith("camera zoom 1.0, fast render") for ln in lines)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["settings"]["zoom"] == 1.0
    assert report["settings"]["seeds"] == [1000, 1001] and report["settings"]["cameras"] == {
        "observations/images/top": list(SIZE)
    }
    for name in ("policy", "baseline"):
        eps = report[name]["per_episode"]
        assert [e["seed"] for e in eps] == [1000, 1001] and all(e["steps"] == 12 for e in eps)
        assert report[name]["success_ci95"] == pytest.approx(evaluate.wilson(0, 2))
    assert all(e["ms_per_chunk"] > 0 for e in report["policy"]["per_episode"])
    gifs = glob.glob(str(tmp_path / "*.gif"))
    assert [os.path.basename(g) for g in gifs] == ["rollout_0_seed1000.gif"]
    with Image.open(gifs[0]) as gif:
        assert gif.n_frames == 7 and gif.size == (64, 48)  # every other of 12 steps and the end, as rendered


def test_wilson_interval():
    assert evaluate.wilson(0, 10)[0] == 0 and evaluate.wilson(10, 10)[1] == 1
    lo, hi = evaluate.wilson(10, 50)  # the textbook value for 20%: 11.2% .. 33.0%
    assert lo == pytest.approx(0.1124, abs=1e-4) and hi == pytest.approx(0.3304, abs=1e-4)


def test_bad_input_gets_one_line(checkpoint, tmp_path):
    def error(*argv):
        with pytest.raises(SystemExit) as e:
            evaluate.main(list(map(str, argv)))
        return str(e.value)

    assert (
        error("--checkpoint", checkpoint, "--task", "stack_cups")
        == "error: --task 'stack_cups': unknown task; use transfer_cube, insertion"
    )
    assert error("--checkpoint", checkpoint, "--zoom", 0) == "error: --zoom 0.0: expected 1 (the stock view) to 10"
    missing = tmp_path / "nope"
    assert error("--checkpoint", missing) == f"error: --checkpoint {missing}: not a directory"
    assert error("--baseline", missing) == f"error: --baseline {missing}: no such file or directory"
    args = json.loads((checkpoint / "args.json").read_text())  # what main() checks next, before loading the model
    with pytest.raises(SystemExit) as e:
        evaluate.check_policy_inputs(
            args | {"cameras": "observations/images/top,observations/images/low"}, "CKPT", "transfer_cube"
        )
    assert str(e.value).startswith(
        "error: checkpoint CKPT needs camera 'observations/images/low', which the "
        "simulator does not render (it has observations/images/left_pillar, "
    )
    with pytest.raises(SystemExit) as e:
        evaluate.check_policy_inputs(
            args | {"frame_sizes": {"observations/images/top": [720, 1280]}}, "CKPT", "transfer_cube"
        )
    assert str(e.value) == (
        "error: checkpoint CKPT was trained on observations/images/top frames of 720x1280, larger "
        "than the simulator renders (480x640)"
    )
    assert evaluate.check_policy_inputs(args, "CKPT", "insertion") == {"observations/images/top": ("top", SIZE)}
    # demos recorded at two zooms: no single right way to render them; the training seeds are known without the files
    mixed = args | {"episode_attrs": {"sim": True, "task": "transfer_cube", "zoom": [1.0, 1.6], "seed": [0, 1]}}
    edited = tmp_path / "ckpt"
    shutil.copytree(checkpoint, edited)
    (edited / "args.json").write_text(json.dumps(mixed))
    assert error("--checkpoint", edited) == f"error: checkpoint {edited}'s demos mix zooms [1.0, 1.6]: give --zoom"
    settings = evaluate.scene_settings(mixed, evaluate.get_args(["--zoom", "1.6"]), "CKPT")
    assert settings == (1.6, False, {0, 1})
    r = run("aloha/record.py", tmp_path / "x", "--task", "stack_cups")
    assert r.returncode != 0
    assert r.stderr.strip() == "error: --task 'stack_cups': unknown task; use transfer_cube, insertion"
    assert not os.path.exists(tmp_path / "x") and not os.path.exists(tmp_path / "report.json")


def test_record_refuses_to_resume_at_another_zoom(demos):
    r = run("aloha/record.py", demos, "--episodes", 2, "--seed", 5, "--size", "x".join(map(str, SIZE)), "--zoom", 2)
    assert r.returncode != 0 and sorted(os.listdir(demos)) == [".lock", "episode_0.hdf5"]
    assert r.stderr.strip() == (
        f"error: {demos / 'episode_0.hdf5'} was recorded at --zoom 1.0, not 2.0: use another OUT"
    )


@pytest.mark.parametrize(
    "flags, was",
    [
        (["--size", "96x128"], "at --size 48x64, not 96x128"),
        (["--stock_render"], "with the fast render, not --stock_render"),
        (["--compression", "gzip"], "with --compression lzf, not gzip"),
        (["--compression", "none"], "with --compression lzf, not none"),
        (["--task", "insertion"], "with --task transfer_cube, not insertion"),
        (["--cameras", "top,left_wrist"], "with --cameras top, not left_wrist,top"),
        (["--noise", "0.02"], "at --noise 0.0, not 0.02"),
    ],
)
def test_record_refuses_to_resume_with_other_settings(demos, tmp_path, flags, was):
    """Episodes of one OUT share their settings: a resumed run with others stops before recording, naming both."""
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(demos / "episode_0.hdf5", out)
    size = "x".join(map(str, SIZE))
    with pytest.raises(SystemExit) as e:
        record.main([str(out), "--episodes", "2", "--seed", "5", "--size", size, *flags])
    assert str(e.value) == f"error: {out / 'episode_0.hdf5'} was recorded {was}: use another OUT"
    assert sorted(os.listdir(out)) == [".lock", "episode_0.hdf5"]


def test_record_adds_wrist_cameras_that_evaluate_renders(demos, tmp_path):
    """--cameras records each named camera beside the top one, the top frames the same as a top-only run's; a
    checkpoint trained on them is fed the same cameras by evaluate.py; an unknown name is refused in one line."""
    size = "x".join(map(str, SIZE))
    record.main([str(tmp_path), "--episodes", "1", "--seed", "5", "--size", size, "--cameras", "right_wrist,top"])
    with h5py.File(tmp_path / "episode_0.hdf5", "r") as f, h5py.File(demos / "episode_0.hdf5", "r") as g:
        assert sorted(f["observations/images"]) == ["right_wrist", "top"]
        wrist, top = f["observations/images/right_wrist"][()], f["observations/images/top"][()]
        assert wrist.shape == top.shape == (400, *SIZE, 3) and wrist.dtype == np.uint8
        np.testing.assert_array_equal(top, g["observations/images/top"][()])
        np.testing.assert_array_equal(f["action"][()], g["action"][()])
        # the wrist camera rides on the arm: its view changes more over the episode than the fixed top one's
        assert np.abs(wrist[0].astype(int) - wrist[200]).mean() > np.abs(top[0].astype(int) - top[200]).mean()
    cams = ["observations/images/top", "observations/images/right_wrist"]
    ds = data.EpisodeDataset(str(tmp_path), cameras=cams, chunk=8, instruction="transfer the cube")
    assert ds[0]["images"].shape[0] == 2
    args = {"cameras": ",".join(cams), "frame_sizes": {c: list(SIZE) for c in cams}, "action_dim": 14}
    assert evaluate.check_policy_inputs(args, "CKPT", "transfer_cube") == {
        "observations/images/top": ("top", SIZE),
        "observations/images/right_wrist": ("right_wrist", SIZE),
    }
    for cameras, why in [("top,wrist", "the scene has no camera 'wrist' (it has left_pillar"), ("top,top", "twice")]:
        with pytest.raises(SystemExit) as e:
            record.main([str(tmp_path / "bad"), "--cameras", cameras])
        assert str(e.value).startswith(f"error: --cameras {cameras!r}: ") and why in str(e.value)
    assert not os.path.exists(tmp_path / "bad")


def test_joint_noise_is_a_slow_walk_of_the_asked_std():
    """--noise's perturbation: 0 at the start and on the grippers, the asked std once settled, correlated over
    NOISE_STEPS steps as an Ornstein-Uhlenbeck walk is (so the servoed arm follows it rather than filtering it out),
    the same for a seed and another for the next."""
    std, lag = 0.03, record.NOISE_STEPS
    noise = record.joint_noise(std, 100_000, seed=5)
    assert noise.shape == (100_000, 14) and not noise[:, record.GRIPPERS].any() and not noise[0].any()
    arms = np.delete(noise, record.GRIPPERS, axis=1)[1000:]  # past the walk's start from 0
    assert abs(arms.std() / std - 1) < 0.03
    correlation = np.mean(arms[:-lag] * arms[lag:]) / arms.var()
    assert abs(correlation - (1 - 1 / lag) ** lag) < 0.04  # 0.364 at 50 steps; i.i.d. noise would give 0
    np.testing.assert_array_equal(noise[:400], record.joint_noise(std, 400, seed=5))
    other = record.joint_noise(std, 400, seed=6)
    assert np.abs(np.delete(noise[1:400] - other[1:], record.GRIPPERS, axis=1)).min() > 0
    assert not record.joint_noise(0.0, 400, seed=5).any()


def test_record_noise_moves_the_arms_and_keeps_the_scripted_actions(demos, tmp_path):
    """--noise (DART): the file stores the seed's scripted actions unchanged while the arms, executing them plus the
    walk, were elsewhere (qpos and frames); the replay with the same walk reaches reward 4; the file names its noise.
    A bad value is refused in one line before anything is recorded."""
    size = "x".join(map(str, SIZE))
    record.main([str(tmp_path / "n"), "--episodes", "1", "--seed", "5", "--size", size, "--noise", "0.01"])
    with h5py.File(tmp_path / "n" / "episode_0.hdf5", "r") as f, h5py.File(demos / "episode_0.hdf5", "r") as g:
        assert f.attrs["seed"] == g.attrs["seed"] == 5 and f.attrs["noise"] == 0.01 and g.attrs["noise"] == 0.0
        actions, pose = f["action"][()], f.attrs["object_pose"]
        np.testing.assert_array_equal(actions, g["action"][()])
        moved = np.delete(np.abs(f["observations/qpos"][()] - g["observations/qpos"][()]), record.GRIPPERS, axis=1)
        assert 0.002 < moved.mean() < 0.03  # the arms followed a walk of std 0.01 rad (not the grippers' columns)
        assert np.abs(f["observations/images/top"][200].astype(int) - g["observations/images/top"][200]).max() > 0
    walk = record.joint_noise(0.01, len(actions), 5)
    _, rewards = record.replay("transfer_cube", actions, pose, SIZE, cameras=(), noise=walk)
    assert rewards.max() == 4
    for bad in ("-0.01", "0.5"):
        with pytest.raises(SystemExit) as e:
            record.main([str(tmp_path / "bad"), "--noise", bad])
        assert str(e.value).startswith(f"error: --noise {float(bad)}: expected 0 (none) to 0.2 rad")
    assert not os.path.exists(tmp_path / "bad")


@pytest.mark.slow
def test_record_refuses_a_second_run_into_the_same_out(tmp_path):
    """Two runs into one OUT would both number their episodes from the same files, the later one replacing the
    other's, and each start would delete the other's .tmp file: the second is refused while the first runs."""
    out, size = tmp_path / "out", "x".join(map(str, SIZE))
    out.mkdir()

    def refusal(out):
        lock = out / ".lock"
        return (
            f"error: {out} is in use by another record.py run (it holds {lock}): wait for it to end, or use another OUT"
        )

    # another run, as the kernel sees it: this process holds the lock, and writes its next episode
    with open(out / ".lock", "a") as lock:
        fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        (out / "episode_0.hdf5.tmp").write_bytes(b"being written")
        r = run("aloha/record.py", out, "--episodes", 1, "--seed", 5, "--size", size)
    assert r.returncode == 1 and r.stderr.strip() == refusal(out) and r.stdout == ""
    assert (out / "episode_0.hdf5.tmp").read_bytes() == b"being written"
    # two real runs into a new OUT: the first holds the lock from its start to its end, seconds of recording later
    out = tmp_path / "two"
    first = subprocess.Popen(
        [sys.executable, "aloha/record.py", str(out), "--episodes", "2", "--seed", "5", "--size", size],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for _ in range(600):  # made just before it locks it
            if first.poll() is not None or os.path.exists(out / ".lock"):
                break
            time.sleep(0.1)
        time.sleep(0.5)
        r = run("aloha/record.py", out, "--episodes", 4, "--seed", 100, "--size", size)
        assert first.poll() is None, "the first run ended before the second started: the test proves nothing"
        assert r.returncode == 1 and r.stderr.strip() == refusal(out)
        stdout, stderr = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 0 and "2 episodes, 2 seeds tried (5..6)" in stdout, stderr[-2000:]
    episodes = [line for line in stdout.splitlines() if line.startswith("episode ")]  # into a pipe: no bar, an ETA
    assert [line.split(" | ")[0] for line in episodes] == ["episode 1/2", "episode 2/2"]
    assert re.search(r" \| \d+s elapsed, eta \d+s$", episodes[0]) and episodes[1].endswith(", eta 0s")
    assert sorted(os.listdir(out)) == [".lock", "episode_0.hdf5", "episode_1.hdf5"]


def test_mcnemar_is_the_exact_binomial_test():
    from scipy.stats import binomtest  # dm_control's dependency: an independent implementation

    import compare

    for only_a, only_b in [(13, 10), (16, 2), (0, 5), (7, 7), (45, 18), (1, 0)]:
        expected = binomtest(only_a, only_a + only_b, 0.5).pvalue
        assert compare.mcnemar(only_a, only_b) == pytest.approx(expected, rel=1e-9)
    assert compare.mcnemar(0, 0) == 1.0


def test_compare_pairs_reports_by_seed(tmp_path):
    def report(path, entry, stages, seed0, task="transfer_cube"):
        eps = [{"seed": seed0 + i, "max_reward": r, "success": r == 4} for i, r in enumerate(stages)]
        path.write_text(json.dumps({"settings": {"task": task}, entry: {"per_episode": eps}}))
        return str(path)

    a1, a2 = report(tmp_path / "a1.json", "policy", [4, 4, 1, 0], 0), report(tmp_path / "a2.json", "policy", [2], 4)
    b = report(tmp_path / "b.json", "baseline", [0, 4, 1, 1, 4], 0)
    r = run("aloha/compare.py", f"{a1},{a2}", f"{b}:baseline")
    assert r.returncode == 0, r.stderr
    rows = [ln.split() for ln in r.stdout.splitlines()[4:]]
    head = r.stdout.splitlines()[:3]
    assert head[0] == "5 paired seeds (0..4), transfer_cube"
    assert head[1].startswith("A: ") and head[1].endswith(":policy") and head[2].endswith(":baseline")
    # stage 1: A reaches it on seeds 0,1,2,4; B on 1,2,3,4 -> only A {0}, only B {3}
    assert rows[0] == ["1", "4/5", "4/5", "1", "1", "1"]
    assert rows[3] == ["4", "2/5", "2/5", "1", "1", "1"] and rows[1] == ["2", "3/5", "2/5", "1", "0", "1"]
    r = run("aloha/compare.py", a1, f"{b}:baseline")
    assert r.returncode != 0 and r.stderr.strip() == (
        "error: the two sides hold different seeds (1 not on both, e.g. 4): a paired comparison needs the same ones"
    )
    r = run("aloha/compare.py", a1, b)
    assert r.stderr.strip() == f"error: B {b}: holds no policy episodes (it has settings, baseline)"
    r = run("aloha/compare.py", a1, str(tmp_path / "nope.json"))
    assert r.stderr.strip().startswith(f"error: B {tmp_path / 'nope.json'}: not a readable report.json")
    # stage k means another thing in another task; an empty report is one line too
    insertion = report(tmp_path / "i.json", "policy", [4, 4, 1, 0], 0, task="insertion")
    r = run("aloha/compare.py", a1, insertion)
    assert r.stderr.strip() == "error: A is transfer_cube and B is insertion: compare evaluations of the same task"
    empty = report(tmp_path / "e.json", "policy", [], 0)
    r = run("aloha/compare.py", a1, empty)
    assert r.stderr.strip() == f"error: B {empty}: holds no policy episodes (it has settings, policy)"
