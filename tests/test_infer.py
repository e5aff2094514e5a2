"""
infer.py: Policy.predict/act on a trained checkpoint against the model run directly, bad input refused in one line,
and the infer.py replay of a held-out episode.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
from peft.tuners.lora import LoraLayer
from PIL import Image

import data
import infer
import model
from helpers import ENV, ROOT, actions_of, edit_json, frame_dict, pil_resized, tower_input
from model import VLA


@pytest.mark.slow
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


@pytest.mark.slow
def test_policy_brings_live_frames_to_the_training_frames(policy, val_episode):
    """run_a trained with the default augmentation on 256x256 frames: Policy centre-crops, and squashes other sizes to
    256x256 with PIL's bicubic as the data conversion did."""
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
    assert np.abs(policy.predict(live, "place it") - policy.predict(frames, "place it")).max() > 0


@pytest.mark.slow
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


@pytest.mark.slow
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
        # a list is several environments: each must be a dict of frames
        ("a list", "expected a dict camera name -> frame for head_camera_image, left_wrist_image, got ndarray$"),
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_act_replans_every_execute_steps(policy, val_episode):
    every4 = infer.Policy(policy.vla, policy.stats, policy.args, policy.device, execute=4)
    episode = data.read_episode(val_episode, every4.cameras)
    calls = []

    def counting(images, instruction=None, state=None):
        calls.append(len(images))
        return policy.predict(images, instruction, state)

    every4.predict = counting
    actions = [every4.act(frame_dict(episode, t, every4.cameras), "place the shoe") for t in range(9)]
    # one environment: act hands predict a batch of one, at steps 0, 4 and 8
    assert calls == [1, 1, 1] and all(a.shape == (14,) for a in actions)
    first = policy.predict(frame_dict(episode, 0, policy.cameras), "place the shoe")
    np.testing.assert_allclose(np.stack(actions[:4]), first[:4], rtol=1e-5, atol=1e-6)


TEXTS = ["place the shoe on the mat", "pick it", "Grab the left shoe and put it onto the pad next to the blue mat"]


@pytest.mark.slow
@pytest.mark.parametrize("run", ["run_a", "run_p"])
def test_batched_predict_equals_one_environment_at_a_time(run, request):
    """Several environments in one call: each row is what its environment alone gets (float32, CPU), with its own
    frames, instruction and state: for a plain checkpoint (run_a) and one with proprioception, full attention and
    FiLM (run_p: each row's instruction scales its own vision features)."""
    ckpt = request.getfixturevalue(run) / ("step_000006" if run == "run_a" else "step_000004")
    policy = infer.Policy.from_checkpoint(str(ckpt), device="cpu")
    assert (policy.vla.proprio_dim, policy.vla.film) == ((0, False) if run == "run_a" else (14, True))
    episode = data.read_episode(json.load(open(ckpt / "args.json"))["val_episode_files"][0], policy.cameras)
    ts = [0, 17, 40]
    frames = [frame_dict(episode, t, policy.cameras) for t in ts]
    states = np.stack([episode["states"][t] for t in ts]) if policy.vla.proprio_dim else None

    def alone(i, text):
        return policy.predict(frames[i], text, None if states is None else states[i])

    batched = policy.predict(frames, TEXTS, states)
    assert batched.shape == (3, 8, 14) and batched.dtype == np.float32
    for i in range(3):
        np.testing.assert_allclose(batched[i], alone(i, TEXTS[i]), rtol=0, atol=1e-5)
    assert np.abs(batched[0] - batched[1]).max() > 1e-3  # the rows are not one environment's chunk repeated
    # one instruction for every environment, the states as a list
    shared = policy.predict(frames, TEXTS[1], None if states is None else list(states))
    for i in range(3):
        np.testing.assert_allclose(shared[i], alone(i, TEXTS[1]), rtol=0, atol=1e-5)


def acts_alone(policy, frames, n_envs, steps):
    """Each environment's episode acted alone, one after the other: [env][t] -> the action, the reference that acting
    on all of them together must reproduce."""
    alone = []
    for env in range(n_envs):
        policy.reset()
        alone.append([policy.act(frames(env, t), TEXTS[env]) for t in range(steps)])
    return alone


@pytest.mark.slow
def test_act_replans_each_environment_and_predicts_only_for_those_that_need_it(policy, val_episode):
    """Three environments, execute 3: each one's actions are those it gets alone; act predicts only for the
    environments whose plan is used up (needs_frames), so a simulator renders only those, and passes None for the
    others. One environment starting a new episode (forget) is re-planned alone; one given no frames where it needed
    a chunk (no episode running) is skipped, its row NaN."""
    every3 = infer.Policy(policy.vla, policy.stats, policy.args, policy.device, execute=3)
    episode = data.read_episode(val_episode, every3.cameras)
    starts = [0, 30, 60]

    def frames(env, t):
        return frame_dict(episode, starts[env] + t, every3.cameras)

    alone = acts_alone(every3, frames, 3, 10)
    calls = []

    def counting(images, instruction=None, state=None):
        calls.append(len(images))
        return policy.predict(images, instruction, state)

    every3.predict = counting
    every3.reset(envs=3)
    together = []
    for t in range(7):
        need = every3.needs_frames()
        assert need == [t % 3 == 0] * 3
        together.append(every3.act([frames(env, t) if need[env] else None for env in range(3)], TEXTS))
        assert [chunk is not None for chunk in every3.last_chunks] == need
    assert calls == [3, 3, 3] and together[0].shape == (3, 14)
    np.testing.assert_allclose(np.stack(together, 1), np.array(alone)[:, :7], rtol=0, atol=1e-5)
    # environment 1 starts a new episode: only it is predicted for, the others go on with their plans
    every3.forget(1)
    assert every3.needs_frames() == [False, True, False]
    step7 = every3.act([None, frames(1, 0), None], TEXTS)
    assert calls[-1] == 1 and [chunk is not None for chunk in every3.last_chunks] == [False, True, False]
    np.testing.assert_allclose(step7[[0, 2]], np.array(alone)[[0, 2], 7], rtol=0, atol=1e-5)
    np.testing.assert_allclose(step7[1], alone[1][0], rtol=0, atol=1e-5)
    assert every3.needs_frames() == [False, False, False]
    every3.act([None, None, None], TEXTS)
    # step 9: environments 0 and 2 need a chunk, but 2 has no episode running: skipped, NaN, and still in need
    assert every3.needs_frames() == [True, False, True]
    step9 = every3.act([frames(0, 9), None, None], TEXTS)
    assert calls[-1] == 1 and [chunk is not None for chunk in every3.last_chunks] == [True, False, False]
    np.testing.assert_allclose(step9[0], alone[0][9], rtol=0, atol=1e-5)
    np.testing.assert_allclose(step9[1], alone[1][2], rtol=0, atol=1e-5)
    assert np.isnan(step9[2]).all() and every3.needs_frames()[2]


@pytest.mark.slow
def test_act_ensembles_each_environment_as_alone(policy, val_episode):
    ensembled = infer.Policy(policy.vla, policy.stats, policy.args, policy.device, ensemble=True)
    episode = data.read_episode(val_episode, ensembled.cameras)
    starts = [5, 50]

    def frames(env, t):
        return frame_dict(episode, starts[env] + t, ensembled.cameras)

    alone = acts_alone(ensembled, frames, 2, 5)
    ensembled.reset(envs=2)
    together = []
    for t in range(5):
        assert ensembled.needs_frames() == [True, True]  # ensembling predicts every step
        together.append(ensembled.act([frames(0, t), frames(1, t)], TEXTS[:2]))
    np.testing.assert_allclose(np.stack(together, 1), np.array(alone), rtol=0, atol=1e-5)
    assert np.abs(np.array(alone)[0, 4] - policy.predict(frames(0, 4), TEXTS[0])[0]).max() > 1e-6  # an average
    # environment 1 starts a new episode: its ensemble starts over, environment 0's goes on
    ensembled.forget(1)
    step5 = ensembled.act([frames(0, 5), frames(1, 0)], TEXTS[:2])
    np.testing.assert_allclose(step5[1], alone[1][0], rtol=0, atol=1e-5)
    assert np.abs(step5[0] - policy.predict(frames(0, 5), TEXTS[0])[0]).max() > 1e-6


@pytest.mark.slow
def test_several_environments_refuse_bad_input_in_one_line(policy, val_episode):
    episode = data.read_episode(val_episode, policy.cameras)
    frames = frame_dict(episode, 0, policy.cameras)
    several = infer.Policy(policy.vla, policy.stats, policy.args, policy.device, envs=3)
    cases = [
        (lambda: several.act([frames, frames], "x"), "act: 2 environments, but reset(envs=3) was for fewer or more"),
        (lambda: several.act(frames, "x"), "act: 1 environments, but reset(envs=3) was for fewer or more"),
        (lambda: several.predict([frames] * 3, ["a", "b"]), "predict: 2 instructions for 3 environments"),
        (lambda: several.predict([frames] * 2, "x", [None] * 3), "predict: 3 states for 2 environments"),
        (
            lambda: several.predict([frames, None, frames], "x"),
            "predict: expected a dict camera name -> frame for head_camera_image, left_wrist_image, got NoneType",
        ),
    ]
    for call, message in cases:
        with pytest.raises(ValueError) as e:
            call()
        assert str(e.value) == message


@pytest.mark.slow
def test_replay_steps_through_act_and_reports_the_chunks_it_predicted(policy, val_episode):
    """infer.replay with execute 4 on the first 13 frames: a chunk at steps 0, 4, 8 and 12, each what predict gives,
    the executed actions their first 4 rows; the per-position L1 is over those chunks, each position scored where
    the episode records the action it predicts."""
    every4 = infer.Policy(policy.vla, policy.stats, policy.args, policy.device, execute=4)
    episode = data.read_episode(val_episode, every4.cameras)
    first13 = dict(episode, length=13)
    chunks, executed, recorded, latency = infer.replay(every4, first13, "place it", progress=False)
    assert [t for t, _ in chunks] == [0, 4, 8, 12] and len(latency) == 3  # the first chunk warms up
    for t, chunk in chunks:
        np.testing.assert_allclose(chunk, policy.predict(frame_dict(episode, t, every4.cameras), "place it"), atol=1e-5)
    np.testing.assert_array_equal(executed, np.concatenate([chunk[:4] for _, chunk in chunks])[:13])
    np.testing.assert_array_equal(recorded, episode["actions"][:13])
    result = infer.report(chunks, executed, recorded, latency, policy.stats, policy.args)

    def l1(t, chunk, j):
        return np.abs(data.normalize(chunk[j], policy.stats) - data.normalize(recorded[t + j], policy.stats)).mean()

    expected = {f"t+{j}": np.mean([l1(t, c, j) for t, c in chunks if t + j < 13]) for j in range(8)}
    assert result["l1_per_position"] == pytest.approx(expected, rel=1e-6)
    assert result["l1_raw"] == pytest.approx(np.abs(executed - recorded).mean())


def test_report_scores_each_chunk_position_over_the_chunks_predicted():
    """By hand: 3-D actions (generic names, no gripper) in [-2, 2], chunks of 4 at steps 0, 4 and 8 of 10, each off
    the recording by its own constant; rows past the episode's end are never scored."""
    recorded = np.random.default_rng(0).uniform(-1, 1, (10, 3))
    stats = data.compute_stats([np.array([[-2.0] * 3, [2.0] * 3])])
    chunks = []
    for t, off in ((0, 0.1), (4, 0.2), (8, 0.3)):
        chunk = np.full((4, 3), 99.0)
        chunk[: min(4, 10 - t)] = recorded[t : t + 4] + off
        chunks.append((t, chunk))
    executed = np.concatenate([chunk[:4] for _, chunk in chunks])[:10]
    result = infer.report(chunks, executed, recorded, np.array([0.01, 0.02, 0.03]), stats, {"norm": "bounds"})
    # normalized: half the raw error (the range 4 maps to 2)
    assert result["l1_per_position"] == pytest.approx({"t+0": 0.1, "t+1": 0.1, "t+2": 0.075, "t+3": 0.075})
    assert result["l1_raw"] == pytest.approx((4 * 0.1 + 4 * 0.2 + 2 * 0.3) / 10)
    assert result["l1"] == pytest.approx(result["l1_raw"] / 2)
    assert result["names"] == ["dim_0", "dim_1", "dim_2"] and list(result["l1_per_dim_raw"]) == result["names"]
    assert result["gripper_agreement"] is None
    assert result["latency_ms"] == pytest.approx({"mean": 20.0, "p50": 20.0, "p95": 29.0})
    assert result["chunks_per_s"] == pytest.approx(50.0)


def test_cpu_threads_leave_the_busy_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    for load, others, threads in [(0.0, 0, 8), (2.6, 0, 5), (2.6, 2, 3), (2.6, 9, 1), (30.0, 0, 1)]:
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, 0.0, 0.0))
        assert infer.cpu_threads(others) == threads, (load, others)


@pytest.mark.slow
def test_infer_episode_end_to_end(run_a, val_episode, policy, tmp_path):
    ckpt = str(run_a / "step_000006")
    r = subprocess.run(
        [sys.executable, "infer.py", "--checkpoint", ckpt, "--episode", val_episode, "--out", str(tmp_path)],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.load(open(tmp_path / "report.json"))
    r = subprocess.run(
        [sys.executable, "plot.py", str(tmp_path / "report.json")],
        cwd=ROOT,
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
    T = episode["length"]
    chunks = np.stack([policy.predict(frame_dict(episode, t, policy.cameras), instruction) for t in range(T)])
    executed, recorded = chunks[:, 0], episode["actions"]
    np.testing.assert_allclose(result["executed"], executed, rtol=1e-4, atol=1e-5)
    assert result["l1_raw"] == pytest.approx(np.abs(executed - recorded).mean(), rel=1e-4)
    normalized, target = data.normalize(chunks, policy.stats), data.normalize(recorded, policy.stats)
    assert result["l1"] == pytest.approx(np.abs(normalized[:, 0] - target).mean(), rel=1e-4)
    assert list(result["l1_per_dim_raw"]) == data.ACTION_NAMES
    # execute 1: a chunk every step, position j scored against the action recorded j steps after its frame
    per_position = {f"t+{j}": np.abs(normalized[: T - j, j] - target[j:]).mean() for j in range(8)}
    assert result["l1_per_position"] == pytest.approx(per_position, rel=1e-3)
    assert result["trained_on"] is False and "trained on" not in r.stdout
    assert 0 <= result["gripper_agreement"] <= 1 and result["latency_ms"]["p95"] >= result["latency_ms"]["p50"] > 0


@pytest.mark.slow
def test_infer_says_when_the_episode_is_one_the_checkpoint_trained_on(run_a, demo, tmp_path, capsys):
    """The run records its files' names and sizes: a training episode (wherever it lies now) is flagged in the
    report and by a note; a held-out one, or a file of that name with other contents, is not."""
    ckpt = run_a / "step_000006"
    run = json.load(open(ckpt / "args.json"))
    trained = [p for p in demo if p not in run["val_episode_files"]]
    assert len(trained) == 5 and all(infer.trained_on(run, p) for p in trained)
    assert not infer.trained_on(run, run["val_episode_files"][0])
    moved = shutil.copy(trained[0], str(tmp_path / os.path.basename(trained[0])))
    assert infer.trained_on(run, moved)
    edited = tmp_path / "edited" / os.path.basename(trained[0])
    edited.parent.mkdir()
    copy_episode(trained[0], edited, drop="unseen")
    assert not infer.trained_on(run, str(edited))
    # execute 8: few chunks to predict
    infer.main(["--checkpoint", str(ckpt), "--episode", moved, "--out", str(tmp_path / "o"), "--execute", "8"])
    out = capsys.readouterr().out
    assert f"note: {moved} is one of the episodes the checkpoint trained on: its L1 says little about new ones" in out
    assert json.load(open(tmp_path / "o" / "report.json"))["trained_on"] is True


@pytest.mark.slow
def test_a_policy_shipped_beside_its_base_loads_from_anywhere(
    run_a, policy, val_episode, tiny_dir, tmp_path, monkeypatch
):
    """A relative vla_path in args.json (a policy shipped inside a repository with its base) is relative to the
    checkpoint's directory, not to the working directory."""
    repo = tmp_path / "repo"
    ckpt = repo / "policies" / "demo"
    shutil.copytree(run_a / "step_000006", ckpt)
    os.symlink(tiny_dir, repo / "tiny-openvla")
    edit_json(ckpt / "args.json", lambda a: a.update(vla_path="../../tiny-openvla"))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    shipped = infer.Policy.from_checkpoint(str(ckpt), device="cpu")
    frames = frame_dict(data.read_episode(val_episode, policy.cameras), 5, policy.cameras)
    np.testing.assert_array_equal(shipped.predict(frames, "place it"), policy.predict(frames, "place it"))
    edit_json(ckpt / "args.json", lambda a: a.update(vla_path="../tiny-openvla"))  # one level short: no base there
    with pytest.raises(FileNotFoundError, match=f"{re.escape(str(repo / 'policies' / 'tiny-openvla'))}: no such"):
        infer.Policy.from_checkpoint(str(ckpt), device="cpu")


@pytest.mark.slow
def test_infer_cli_bad_checkpoint_is_one_line_and_exit_status_1(val_episode, tmp_path):
    r = subprocess.run(
        [sys.executable, "infer.py", "--checkpoint", str(tmp_path / "nowhere"), "--episode", val_episode],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 1 and r.stderr == f"error: {tmp_path / 'nowhere'}: not a directory\n"


def copy_episode(src, dst, drop=None, action_width=None):
    with h5py.File(src) as f, h5py.File(dst, "w") as g:
        for key in f:
            if key == drop:
                continue
            if key == "action" and action_width:
                g["action"] = f["action"][:, :action_width]
            else:
                f.copy(key, g)


@pytest.mark.slow
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


def edit_stats(key, edit):
    return lambda ckpt: edit_json(ckpt / "dataset_statistics.json", lambda s: edit(next(iter(s.values()))[key]))


def edit_args(edit):
    return lambda ckpt: edit_json(ckpt / "args.json", edit)


def truncate(ckpt):
    with open(ckpt / "adapter_model.safetensors", "r+b") as f:
        f.truncate(os.path.getsize(ckpt / "adapter_model.safetensors") - 100)


@pytest.mark.slow
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
        (
            "statistics corrupt",
            lambda ckpt: (ckpt / "dataset_statistics.json").write_text("{"),
            "dataset_statistics.json: not JSON",
        ),
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
    """A hand-edited or damaged checkpoint: one line naming the file (and the key) from model.check_checkpoint, from
    Policy.from_checkpoint (an OSError or ValueError, for a caller to handle) and from infer.py (`error: ...`, exit
    status 1), before any model loads, instead of a traceback or actions from other inputs."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree((run_p / "step_000004") if case.startswith("proprio") else (run_a / "step_000006"), ckpt)
    edit(ckpt)
    monkeypatch.setattr(model.VLA, "from_pretrained", lambda *a, **k: pytest.fail("model loaded before the check"))
    for load in (
        lambda: model.check_checkpoint(str(ckpt)),
        lambda: infer.Policy.from_checkpoint(str(ckpt), device="cpu"),
    ):
        with pytest.raises((OSError, ValueError)) as e:
            load()
        assert re.search(message, str(e.value)) and str(ckpt) in str(e.value), e.value
        assert "\n" not in str(e.value)
    with pytest.raises(SystemExit) as e:
        infer.main(["--checkpoint", str(ckpt), "--episode", val_episode, "--out", str(tmp_path)])
    assert str(e.value.code).startswith("error: ") and re.search(message, str(e.value.code))
    assert str(ckpt) in str(e.value.code) and "\n" not in str(e.value.code)


@pytest.mark.slow
@pytest.mark.parametrize("execute", [0, -1, 9, 2.0, None])
def test_policy_refuses_execute_outside_the_chunk(execute, policy):
    with pytest.raises(ValueError, match=f"^Policy: execute must be 1..8 \\(the chunk\\), got {execute!r}$"):
        infer.Policy(policy.vla, policy.stats, policy.args, policy.device, execute=execute)


@pytest.mark.slow
def test_infer_refuses_a_blank_instruction_before_the_model_loads(run_a, val_episode, monkeypatch, capsys):
    monkeypatch.setattr(model.VLA, "from_pretrained", lambda *a, **k: pytest.fail("model loaded before the check"))
    with pytest.raises(SystemExit) as e:
        infer.main(["--checkpoint", str(run_a / "step_000006"), "--episode", val_episode, "--instruction", " "])
    assert e.value.code == 2 and capsys.readouterr().err.splitlines()[-1].endswith(
        "error: --instruction is blank: pass seen, unseen or the text"
    )


@pytest.mark.slow
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
