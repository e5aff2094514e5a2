"""
Tests of evaluate.py's parallel simulators (envs.py's SimPool), its resumable reports, --checkpoints and its
one-line refusals, on a checkpoint trained two steps on three tiny record.py demos.

    python -m pytest -q aloha/test_evaluate.py
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import envs
import evaluate
import infer
import locate
import record
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
SIZE = (48, 64)
CAMERAS = {"observations/images/top": ("top", SIZE)}


def run(*args):
    return subprocess.run(
        [sys.executable, "aloha/evaluate.py", *map(str, args)],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    out = tmp_path_factory.mktemp("demos")
    record.main([str(out), "--episodes", "3", "--seed", "0", "--size", "48x64"])
    return out


def train_recipe(tiny_dir, demos, out, steps, *flags):
    """train.py in this process with the recipe's flags, small: batch 2, LoRA rank 4, a checkpoint every step."""
    recipe = ["--vla_path", tiny_dir, "--data_dir", demos, "--out_dir", out, "--cameras", "observations/images/top"]
    recipe += ["--instruction", "transfer the cube", "--attention", "full", "--no-image_aug", "--num_workers", "0"]
    recipe += ["--val_episodes", "0", "--batch_size", "2", "--lora_rank", "4", "--max_steps", steps]
    train.main(list(map(str, recipe + ["--save_interval", "1", "--log_interval", "1", *flags])))


@pytest.fixture(scope="module")
def run_dir(demos, tiny_dir, tmp_path_factory):
    """Two checkpoints (steps 1 and 2) of the recipe's flags, one process."""
    out = tmp_path_factory.mktemp("run")
    train_recipe(tiny_dir, demos, out, 2)
    return out


@pytest.fixture(scope="module")
def checkpoint(run_dir):
    return run_dir / "step_000002"


@pytest.fixture(scope="module")
def located_checkpoint(demos, tiny_dir, tmp_path_factory):
    """One step of the recipe's flags on where the cube starts (a located policy) and a random locator for it."""
    out = tmp_path_factory.mktemp("located")
    train_recipe(tiny_dir, demos, out, 1, "--proprio", "--state_key", "observations/object_xy")
    torch.manual_seed(0)
    scene = {
        "camera": "top",
        "size": list(SIZE),
        "zoom": 1.0,
        "fast_render": True,
        "val_error_cm": {"cube": {"mean": 9.9}},
    }
    locate.save(str(out / "locator.pt"), locate.Locator("transfer_cube"), "transfer_cube", scene)
    return out / "step_000001"


def reference_actions(checkpoint, seed, steps, ensemble):
    """The actions of one episode stepped as evaluate.py stepped it before SimPool: one simulator in this process,
    every camera rendered each step, Policy.act on one environment."""
    policy = infer.Policy.from_checkpoint(str(checkpoint), device="cpu", execute=4, ensemble=ensemble)
    physics, task_obj = record.make_sim("transfer_cube")
    record.reset(physics, task_obj, record.object_pose("transfer_cube", seed))
    actions, rewards = [], []
    for _ in range(steps):
        images = {"observations/images/top": record.render(physics, SIZE, "top")}
        actions.append(policy.act(images, "transfer the cube"))
        rewards.append(record.step(physics, task_obj, actions[-1]))
    return np.array(actions), rewards


def pool_actions(checkpoint, seeds, steps, n, ensemble):
    """The same episodes through run_episodes on n parallel simulators: {seed: (actions, rewards)}."""
    policy = infer.Policy.from_checkpoint(str(checkpoint), device="cpu", execute=4, ensemble=ensemble)
    act = evaluate.policy_actor(policy, "transfer the cube", False, n)
    taken = {}

    def recording(observations, running):
        actions = act(observations, running)
        for i, episode in running.items():
            taken.setdefault(episode.seed, []).append(actions[i])
        return actions

    rewards = {}

    def on_done(result, episode):
        rewards[episode.seed] = result["max_reward"]

    args = evaluate.argparse.Namespace(steps=steps)
    with envs.SimPool(n, "transfer_cube", CAMERAS) as pool:
        evaluate.run_episodes(seeds, pool, recording, policy.needs_frames, args, on_done=on_done)
    return {seed: np.array(taken[seed]) for seed in seeds}, rewards


@pytest.mark.slow
@pytest.mark.parametrize("ensemble", [False, True])
def test_parallel_simulators_step_the_episodes_evaluate_stepped_alone(checkpoint, ensemble):
    """--envs 1 takes exactly the actions of the single-process loop; --envs 2 (three seeds, so one simulator
    starts a second episode while the other runs) the same within the batched forward's 1e-5."""
    seeds, steps = [1000, 1001, 1002], 14
    reference = {s: reference_actions(checkpoint, s, steps, ensemble)[0] for s in seeds}
    one, _ = pool_actions(checkpoint, seeds, steps, 1, ensemble)
    two, _ = pool_actions(checkpoint, seeds, steps, 2, ensemble)
    for s in seeds:
        np.testing.assert_array_equal(one[s], reference[s])
        np.testing.assert_allclose(two[s], reference[s], atol=1e-5)


@pytest.mark.slow
def test_envs_2_writes_the_report_envs_1_writes(checkpoint, demos, tmp_path):
    reports, printed = {}, {}
    for n in (1, 2):
        r = run("--checkpoint", checkpoint, "--episodes", 2, "--steps", 10, "--envs", n, "--out", tmp_path / str(n))
        assert r.returncode == 0, r.stderr[-3000:]
        reports[n], printed[n] = json.loads((tmp_path / str(n) / "report.json").read_text()), r.stdout
    one, two = reports[1], reports[2]
    assert one.keys() == two.keys() and one["policy"].keys() == two["policy"].keys()
    assert set(one["settings"]) == set(two["settings"]) and two["settings"]["envs"] == 2
    strip = ("seconds", "ms_per_chunk")
    for a, b in zip(one["policy"]["per_episode"], two["policy"]["per_episode"]):
        assert {k: v for k, v in a.items() if k not in strip} == {k: v for k, v in b.items() if k not in strip}
    for n in (1, 2):
        gif = tmp_path / str(n) / "rollout_0_seed1000.gif"
        assert gif.exists() and f"wrote {gif}" in printed[n].splitlines()


@pytest.mark.slow
def test_an_interrupted_evaluation_resumes_its_missing_seeds(checkpoint, demos, tmp_path):
    """The report is written after every episode; the same command continues it. A baseline added to the same
    --out keeps the policy's results; another checkpoint there is refused."""
    r = run("--checkpoint", checkpoint, "--episodes", 1, "--steps", 8, "--envs", 1, "--out", tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert [e["seed"] for e in report["policy"]["per_episode"]] == [1000]
    # as if it had been stopped after the first of two episodes: the same report with two seeds asked
    report["settings"]["seeds"] = [1000, 1001]
    (tmp_path / "report.json").write_text(json.dumps(report))
    r = run("--checkpoint", checkpoint, "--episodes", 2, "--steps", 8, "--envs", 1, "--out", tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "policy: 1 of 2 episodes already in" in r.stdout
    assert [ln.split(" | ")[1] for ln in r.stdout.splitlines() if ln.startswith("policy |")] == ["seed 1001"]
    report = json.loads((tmp_path / "report.json").read_text())
    assert [e["seed"] for e in report["policy"]["per_episode"]] == [1000, 1001]
    r = run("--baseline", demos, "--episodes", 2, "--steps", 8, "--envs", 2, "--out", tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    both = json.loads((tmp_path / "report.json").read_text())
    assert both["policy"] == report["policy"] and [e["seed"] for e in both["baseline"]["per_episode"]] == [1000, 1001]
    # the report's settings stay the policy evaluation's (the baseline's subject is in its own entry)
    assert both["settings"]["checkpoint"] == str(checkpoint) and "demos in" in both["baseline"]["what"]
    other = tmp_path / "other"
    shutil.copytree(checkpoint, other)
    r = run("--checkpoint", other, "--episodes", 2, "--steps", 8, "--out", tmp_path)
    assert r.returncode == 1 and r.stderr.strip().startswith(f"error: --out {tmp_path} holds another evaluation")
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_checkpoints_of_a_run_give_a_success_curve(run_dir, tmp_path):
    r = run("--checkpoints", run_dir, "--episodes", 1, "--steps", 6, "--envs", 1, "--out", tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    curve = json.loads((run_dir / "success_curve.json").read_text())
    assert curve["steps"] == [1, 2] and curve["seeds"] == [1000] and len(curve["success_rate"]) == 2
    assert all(0 <= lo <= hi <= 1 for lo, hi in curve["ci95"])
    assert (tmp_path / "step_000001" / "report.json").exists() and (tmp_path / "step_000002" / "report.json").exists()


@pytest.mark.slow
def test_a_located_checkpoint_is_given_what_its_locator_reads(located_checkpoint, tmp_path, monkeypatch):
    """Every state an episode's chunks are predicted from is the locator's reading of that episode's first frame
    (rendered as in the single-process loop); with --oracle, the simulator's own start positions."""
    states = []
    act = infer.Policy.act

    def recording(self, images, instruction=None, state=None):
        states.append([None if s is None else np.array(s) for s in state])
        return act(self, images, instruction, state)

    monkeypatch.setattr(infer.Policy, "act", recording)
    net, _ = locate.load(str(located_checkpoint.parent / "locator.pt"))
    expected = {}
    for seed in (1000, 1001):
        physics, task_obj = record.make_sim("transfer_cube")
        record.reset(physics, task_obj, record.object_pose("transfer_cube", seed))
        with torch.no_grad():
            expected[seed] = net(torch.from_numpy(record.render(physics, SIZE, "top")[None].copy()))[0].numpy()
    flags = ["--checkpoint", located_checkpoint, "--episodes", 2, "--steps", 12, "--envs", 1, "--gif", 0]
    flags += ["--execute", 4, "--locator", located_checkpoint.parent / "locator.pt"]
    evaluate.main(list(map(str, flags + ["--out", tmp_path / "located"])))
    # one environment: the first episode's 3 chunks, then the second's
    assert len(states) == 24 and all(len(s) == 1 for s in states)
    for step, (s,) in enumerate(states):
        np.testing.assert_allclose(s, expected[1000 + step // 12], atol=1e-6)
    assert not np.allclose(expected[1000], expected[1001])
    report = json.loads((tmp_path / "located" / "report.json").read_text())
    assert "state locator " in report["policy"]["what"] and report["settings"]["locator"]
    states.clear()
    evaluate.main(list(map(str, flags[:-2] + ["--oracle", "--out", tmp_path / "oracle"])))
    for step, (s,) in enumerate(states):
        seed = 1000 + step // 12
        np.testing.assert_array_equal(s, record.object_xy("transfer_cube", record.object_pose("transfer_cube", seed)))


@pytest.mark.slow
@pytest.mark.parametrize(
    "case, message",
    [
        ("envs0", "error: --envs 0: must be at least 1"),
        ("run_dir", "is a training run holding step_000001..step_000002: pass one of them, or --checkpoints"),
        ("empty_run", "no step_NNNNNN checkpoints there"),
        ("robotwin_baseline", "not a simulator demo of record.py"),
        ("watch_alone", "error: --watch goes with --checkpoints RUN_DIR"),
    ],
)
def test_bad_input_is_one_line(case, message, run_dir, checkpoint, demo_dir, tmp_path):
    argv = {
        "envs0": ["--checkpoint", checkpoint, "--envs", 0],
        "run_dir": ["--checkpoint", run_dir],
        "empty_run": ["--checkpoints", tmp_path],
        "robotwin_baseline": ["--baseline", demo_dir],
        "watch_alone": ["--checkpoint", checkpoint, "--watch"],
    }[case]
    r = run(*argv, "--out", tmp_path / "out")
    assert r.returncode == 1 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.slow
def test_a_checkpoint_on_qpos_and_where_objects_start_is_given_both(demos, tiny_dir, tmp_path, monkeypatch):
    """Trained on observations/qpos_object_xy: every chunk's state is the simulator's joint state at that step (the
    reset pose at the first chunk, then moving), followed by where the objects start (here --oracle), held."""
    train_recipe(tiny_dir, demos, tmp_path, 1, "--proprio", "--state_key", evaluate.QPOS_LOCATED_KEY)
    states = []
    act = infer.Policy.act

    def recording(self, images, instruction=None, state=None):
        states.append(np.array(state[0]))
        return act(self, images, instruction, state)

    monkeypatch.setattr(infer.Policy, "act", recording)
    physics, task_obj = record.make_sim("transfer_cube")
    record.reset(physics, task_obj, record.object_pose("transfer_cube", 1000))
    start = task_obj.get_qpos(physics)
    flags = ["--checkpoint", tmp_path / "step_000001", "--episodes", 2, "--steps", 12, "--envs", 1, "--gif", 0]
    evaluate.main(list(map(str, flags + ["--execute", 4, "--oracle", "--out", tmp_path / "oracle"])))
    assert len(states) == 24 and all(s.shape == (16,) and s.dtype == np.float32 for s in states)
    for step, s in enumerate(states):
        seed = 1000 + step // 12
        np.testing.assert_array_equal(
            s[14:], record.object_xy("transfer_cube", record.object_pose("transfer_cube", seed))
        )
    np.testing.assert_allclose(states[0][:14], start, atol=1e-6)
    np.testing.assert_allclose(states[12][:14], start, atol=1e-6)
    assert np.abs(states[11][:14] - start).max() > 1e-3
    report = json.loads((tmp_path / "oracle" / "report.json").read_text())
    assert "state qpos + oracle" in report["policy"]["what"]
    # without --oracle or a locator it is refused in one line, as a checkpoint on where the objects start alone
    with pytest.raises(SystemExit, match=r"^error: .*is told where the objects start \(observations/qpos_object_xy\)"):
        evaluate.main(list(map(str, flags + ["--out", tmp_path / "none"])))


@pytest.mark.slow
@pytest.mark.parametrize(
    "case, message",
    [
        ("no_locator", "is told where the objects start (observations/object_xy): give --locator"),
        ("locator_task", "reads insertion scenes, not transfer_cube"),
        ("locator_size", "reads observations/images/top 240x320; checkpoint "),
        ("locator_zoom", "read scenes of zoom 2.0, fast render True; this evaluation renders zoom 1.0"),
        ("oracle_qpos", "error: --locator and --oracle are for a checkpoint trained on observations/object_xy"),
    ],
)
def test_a_locator_that_does_not_fit_is_refused_in_one_line(case, message, located_checkpoint, checkpoint, tmp_path):
    """Before any simulator starts or the model loads."""
    scene = {"camera": "top", "size": list(SIZE), "zoom": 1.0, "fast_render": True}
    locate.save(str(tmp_path / "insertion.pt"), locate.Locator("insertion"), "insertion", scene)
    locate.save(
        str(tmp_path / "big.pt"), locate.Locator("transfer_cube"), "transfer_cube", scene | {"size": [240, 320]}
    )
    locate.save(str(tmp_path / "zoom.pt"), locate.Locator("transfer_cube"), "transfer_cube", scene | {"zoom": 2.0})
    argv = {
        "no_locator": ["--checkpoint", located_checkpoint],
        "locator_task": ["--checkpoint", located_checkpoint, "--locator", tmp_path / "insertion.pt"],
        "locator_size": ["--checkpoint", located_checkpoint, "--locator", tmp_path / "big.pt"],
        "locator_zoom": ["--checkpoint", located_checkpoint, "--locator", tmp_path / "zoom.pt"],
        "oracle_qpos": ["--checkpoint", checkpoint, "--oracle"],
    }[case]
    with pytest.raises(SystemExit) as e:
        evaluate.main(list(map(str, argv + ["--out", tmp_path / "out"])))
    assert str(e.value).startswith("error: ") and message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out" / "report.json").exists()


def test_train_sh_refuses_fewer_demos_than_its_validation_split_needs(demos, tmp_path):
    """3 demos with the recipe's 2 held out would train on 1 without a word."""
    r = subprocess.run(["bash", "aloha/train.sh", demos, tmp_path / "run"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.strip() == (
        f"error: {demos} holds 3 demos: the recipe holds 2 out for validation and would train on 1 (it was measured "
        "on 200): record more, or pass --val_episodes 0"
    )
    assert not (tmp_path / "run").exists()
