"""
Tests of rl.py: the Gaussian against torch.distributions, the PPO/GRPO losses and advantages by hand, and (slow) runs
in the ALOHA simulator from a small supervised checkpoint: the CLI writes checkpoints that Policy, aloha/evaluate.py
and serve.py load; 2 + 2 iterations resumed equal 4 straight; bad input gets one line.

    python -m pytest -q tests/test_rl.py                 # -m "not slow" for the quick ones
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import infer
import model
import rl
from helpers import ENV, ROOT, max_diff, trained_weights

SIZE = "48x64"
# short, cheap runs: 2 simulators, 30 control steps, 2 seeds x 2 rollouts an iteration
FAST = ["--envs", 2, "--episodes", 4, "--group", 2, "--steps", 30, "--threads", 1, "--micro_batch", 4]
FAST += ["--ppo_epochs", 2, "--minibatches", 2, "--progress", 0]


def run(script, *args, timeout=600):
    return subprocess.run(
        [sys.executable, script, *map(str, args)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout
    )


# -----------------------------------------------------------------------------
# the Gaussian and the losses


def test_gaussian_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mean, sample = torch.randn(5, 8, 14, generator=g), torch.randn(5, 8, 14, generator=g)
    log_std = torch.randn(14, generator=g) * 0.5 - 1
    normal = torch.distributions.Normal(mean, log_std.exp())
    full = torch.ones(5, 8)
    torch.testing.assert_close(rl.gaussian_log_prob(sample, mean, log_std, full), normal.log_prob(sample).sum((1, 2)))
    # only the executed actions count: 8, 3, 0, 1, 5 of each chunk
    executed = torch.tensor([8, 3, 0, 1, 5])
    mask = (torch.arange(8) < executed[:, None]).float()
    expected = torch.stack([normal.log_prob(sample)[b, :n].sum() for b, n in enumerate(executed)])
    torch.testing.assert_close(rl.gaussian_log_prob(sample, mean, log_std, mask), expected)
    torch.testing.assert_close(rl.gaussian_entropy(log_std), normal.entropy()[0, 0].sum())
    ref_mean, ref_log_std = torch.randn(5, 8, 14, generator=g), torch.full((14,), math.log(0.1))
    ref = torch.distributions.Normal(ref_mean, ref_log_std.exp())
    kl = torch.distributions.kl_divergence(normal, ref)
    expected = torch.stack([kl[b, :n].sum() for b, n in enumerate(executed)])
    torch.testing.assert_close(rl.gaussian_kl(mean, log_std, ref_mean, ref_log_std, mask), expected)


def test_clipped_surrogate_by_hand():
    # ratios 1.5, 0.5, 1.1, 0.7, 1.3 against advantages of both signs, clip 0.2 low / 0.28 high
    ratio = torch.tensor([1.5, 0.5, 1.1, 0.7, 1.3])
    adv = torch.tensor([2.0, -1.0, -0.5, 1.0, -3.0])
    old = torch.tensor([-3.0, 1.0, 0.0, 2.0, -1.0])
    loss, clipped = rl.clipped_surrogate(old + ratio.log(), old, adv, 0.2, 0.28)
    # -min(r A, clip(r) A): 1.5*2 vs 1.28*2 -> 2.56; 0.5*-1 vs 0.8*-1 -> -0.8; 1.1*-.5 -> -0.55;
    # 0.7*1 vs 0.8*1 -> 0.7; 1.3*-3 vs 1.28*-3 -> -3.9
    torch.testing.assert_close(loss, -torch.tensor([2.56, -0.8, -0.55, 0.7, -3.9]))
    assert clipped.tolist() == [True, True, False, False, False]
    # PPO's symmetric 0.2: the first ratio clips at 1.2
    loss, _ = rl.clipped_surrogate(old + ratio.log(), old, adv, 0.2, 0.2)
    assert loss[0].item() == pytest.approx(-2.4)


def test_grpo_advantages_drop_groups_without_signal():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.25, 0.75], dtype=torch.float64)
    groups = ["a", "a", "a", "a", "b", "b", "c", "c", "d", "d"]
    adv, kept = rl.group_advantages(rewards, groups)
    # group a: mean 0.75, unbiased std sqrt((3 * 0.0625 + 0.5625) / 3) = 0.5; b all failure, c all success: dropped;
    # d (stage rewards): mean 0.5, std sqrt(2 * 0.0625) = 0.3536
    assert kept.tolist() == [True] * 4 + [False] * 4 + [True] * 2
    expected = [0.5, -1.5, 0.5, 0.5, 0, 0, 0, 0, -0.25 / 0.125**0.5, 0.25 / 0.125**0.5]
    np.testing.assert_allclose(adv.numpy(), expected, rtol=1e-5)


def test_ppo_batch_advantages_by_hand():
    rewards = torch.tensor([0.0, 0.25, 1.0, 0.5], dtype=torch.float64)
    # the sums as if another rank held rewards 0 and 1
    total, total_sq, count = 1.75 + 1.0, 0.0625 + 1 + 0.25 + 1.0, 6
    mean = total / count
    std = math.sqrt(sum((r - mean) ** 2 for r in [0, 0.25, 1, 0.5, 0, 1]) / 5)
    adv = rl.batch_advantages(rewards, total, total_sq, count)
    np.testing.assert_allclose(adv.numpy(), [(r - mean) / (std + 1e-6) for r in [0, 0.25, 1, 0.5]], rtol=1e-6)
    assert rl.batch_advantages(torch.zeros(3, dtype=torch.float64), 0.0, 0.0, 3) is None


def test_std_learned_is_clamped_and_scheduled_is_linear():
    args = rl.argparse.Namespace(std_schedule=None, iterations=4, min_std=0.01, max_std=1.0, init_std=0.1)
    std = rl.ActionStd(args, 14)
    assert std.param.requires_grad and torch.allclose(std.log_std().exp(), torch.full((14,), 0.1))
    with torch.no_grad():
        std.param[:2] = torch.tensor([-10.0, 3.0])
    assert std.log_std().exp()[:2].tolist() == pytest.approx([0.01, 1.0])
    args.std_schedule = "linear:0.2:0.05"
    std = rl.ActionStd(args, 14)
    assert not std.param.requires_grad
    stds = []
    for it in range(1, 5):
        std.set_iteration(it)
        stds.append(std.log_std().exp()[0].item())
    assert stds == pytest.approx([0.2, 0.15, 0.1, 0.05])
    assert std.initial.exp()[0].item() == pytest.approx(0.2)


def fake_sampler(monkeypatch, chunks, stats, noise):
    """A Sampler of 2-action plans at std 0.1 (generator seed 0) whose forward pass returns chunks() (B, k, D) and
    whose checkpoint statistics are stats (bounds normalization; q01 / q99 copied from min / max)."""
    monkeypatch.setattr(rl, "observe", lambda helper, obs: (None, "x", None))
    monkeypatch.setattr(rl, "forward", lambda vla, seen, proc: chunks())
    stats = stats | {"q01": stats["min"], "q99": stats["max"]}
    helper = rl.argparse.Namespace(stats=stats, args={"norm": "bounds"})
    std = rl.argparse.Namespace(log_std=lambda: torch.full((len(stats["min"]),), math.log(0.1)))
    return rl.Sampler(None, helper, std, torch.Generator().manual_seed(0), None, execute=2, noise=noise)


def test_rollouts_run_the_sample_unclipped_as_policy_runs_the_mean(monkeypatch):
    # a head whose mean leaves the demonstrations' range [-1, 1] (the shipped policy does so in 7% of its actions):
    # the rollout executes exactly what infer.Policy would unnormalize, plus the noise, with nothing clipped
    mean = torch.tensor([[[-1.2, 0.5], [1.3, -0.25]]])
    stats = {"min": np.array([0.0, -2.0]), "max": np.array([1.0, 2.0]), "mask": np.array([True, True])}
    sampler = fake_sampler(monkeypatch, lambda: mean, stats, noise="action")
    episode = rl.Episode(0, 20000, 0)
    actions = [sampler.act({0: {}}, {0: episode})[0] for _ in range(2)]
    noise = torch.randn((1, 2, 2), generator=torch.Generator().manual_seed(0))[0]
    sample = (mean[0] + 0.1 * noise).numpy()
    # bounds: x in [-1, 1] -> min + (x + 1) / 2 * (max - min)
    expected = stats["min"] + (sample + 1) / 2 * (stats["max"] - stats["min"])
    np.testing.assert_allclose(np.stack(actions), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.stack(episode.normalized), sample, rtol=1e-6, atol=1e-6)
    assert np.abs(sample).max() > 1
    assert episode.decisions[0].sample.numpy() == pytest.approx(sample)


def test_episode_noise_is_one_offset_held_for_each_episode(monkeypatch):
    # --noise episode: two episodes, three chunks each; every action an episode runs is its mean plus std times one
    # draw of its own, taken from the generator at its first chunk in the order the episodes start
    means = iter(torch.arange(3 * 2 * 2 * 3, dtype=torch.float32).reshape(3, 2, 2, 3) / 10)
    stats = {"min": -np.ones(3), "max": np.ones(3), "mask": np.array([True] * 3)}
    sampler = fake_sampler(monkeypatch, lambda: next(means), stats, noise="episode")
    episodes = {0: rl.Episode(0, 20000, 0), 1: rl.Episode(1, 20000, 0)}
    for _ in range(6):
        sampler.act({0: {}, 1: {}}, episodes)
    gen = torch.Generator().manual_seed(0)
    held = [torch.randn(3, generator=gen) for _ in range(2)]
    for i, episode in episodes.items():
        assert len(episode.decisions) == 3
        for d in episode.decisions:
            np.testing.assert_allclose(d.sample - d.mean, 0.1 * held[i].expand(2, 3), atol=1e-6)
        # bounds with min -1, max 1: the raw action is the normalized one
        mean = torch.cat([d.mean for d in episode.decisions]).numpy()
        np.testing.assert_allclose(np.stack(episode.raw), mean + 0.1 * held[i].numpy(), atol=1e-6)
    assert (held[0] - held[1]).abs().min() > 1e-3


# -----------------------------------------------------------------------------
# runs in the simulator


@pytest.fixture(scope="module")
def start(tiny_dir, tmp_path_factory):
    """One scripted transfer-cube demo (seed 0, 48x64) and the tiny twin trained 2 steps on it with aloha/train.sh's
    flags: a small supervised checkpoint to start RL from. -> (checkpoint, demos)"""
    here = tmp_path_factory.mktemp("rl-start")
    r = run("aloha/record.py", here / "demos", "--episodes", 1, "--size", SIZE)
    assert r.returncode == 0, r.stderr[-2000:]
    flags = ["--vla_path", tiny_dir, "--data_dir", here / "demos", "--out_dir", here / "run"]
    flags += ["--cameras", "observations/images/top", "--instruction", "transfer the cube", "--attention", "full"]
    flags += ["--no-image_aug", "--val_episodes", 0, "--batch_size", 2, "--lora_rank", 4, "--max_steps", 2]
    flags += ["--save_interval", 2, "--num_workers", 0]
    r = run("train.py", *flags)
    assert r.returncode == 0, r.stderr[-2000:]
    return here / "run" / "step_000002", here / "demos"


def frames_of(ckpt, seed=0):
    """A frame of the simulator at the checkpoint's training size (what the policy sees at reset)."""
    import envs

    run_args = model.check_checkpoint(str(ckpt))
    with envs.SimPool(
        1, "transfer_cube", {"observations/images/top": ("top", run_args["frame_sizes"]["observations/images/top"])}
    ) as pool:
        return pool.reset({0: seed}, {0: True})[0]["images"]


@pytest.mark.slow
def test_one_iteration_writes_a_checkpoint_every_command_loads(start, tmp_path):
    ckpt, demos = start
    out = tmp_path / "grpo"
    evaluation = ["--eval_interval", 1, "--eval_episodes", 2]
    r = run("rl.py", "--checkpoint", ckpt, "--out_dir", out, "--iterations", 1, *FAST, *evaluation)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert any(ln.startswith("iter 1/1 | success 0.00 (0/4) | stage 0.00 | std 0.010 | groups 0/2 |") for ln in lines)
    # the mean on the evaluation seeds, before the first iteration and after the last, through evaluate.py's loop
    evals = [ln for ln in lines if ln.startswith("eval iter")]
    assert evals == [
        f"eval iter {i} | 0/2 = 0% success on seeds 1000.. (95% CI 0-66%) | stages 1-4: 0% 0% 0% 0%" for i in (0, 1)
    ]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], "eval_success" in r) for r in rows] == [(0, True), (1, False), (1, True)]
    assert rows[0]["eval_ci95"] == pytest.approx(rl.evaluate.wilson(0, 2))
    row = rows[1]
    assert row["step"] == 1 and row["episodes"] == 4 and row["seeds"] == [20000, 20001]
    # 30 steps, a chunk every 8: 4 decisions an episode
    assert row["decisions"] == 16 and row["env_steps"] == 120
    assert (out / "rl_curve.png").stat().st_size > 10_000
    rl_ckpt = out / "step_000001"
    assert sorted(os.listdir(rl_ckpt)) == sorted(model.ADAPTER_FILES + model.POLICY_FILES + [rl.RL_STATE, rl.STD_FILE])
    std = json.loads((rl_ckpt / rl.STD_FILE).read_text())
    assert std["std"] == pytest.approx([0.01] * 14)

    # self-imitation always updates (here on the demo alone: no success yet): its checkpoint holds new weights
    out = tmp_path / "sil"
    r = run("rl.py", "--checkpoint", ckpt, "--out_dir", out, "--iterations", 1, "--algo", "sil", *FAST)
    assert r.returncode == 0, r.stderr[-3000:]
    sil = out / "step_000001"
    assert max_diff(trained_weights(sil), trained_weights(ckpt)) > 0
    run_args = json.loads((sil / "args.json").read_text())
    assert run_args["rl"]["start"] == os.path.realpath(ckpt) and run_args["max_steps"] == 1
    assert os.path.isabs(run_args["vla_path"]) and run_args["rl"]["flags"]["algo"] == "sil"

    # Policy (infer.py, serve.py's loading path: check_checkpoint, then from_checkpoint merged) runs the new mean
    import serve

    frames = frames_of(sil)
    model.check_checkpoint(str(sil))
    policy = infer.Policy.from_checkpoint(str(sil), device="cpu", merge=True)
    before = infer.Policy.from_checkpoint(str(ckpt), device="cpu")
    assert serve.metadata(policy, str(sil))["cameras"] == ["observations/images/top"]
    new, old = policy.predict(frames), before.predict(frames)
    assert np.abs(new - old).max() > 1e-6
    # the in-memory model at the end of the run is what loaded: LoRA and head as written
    vla = model.load_trained(model.VLA.from_pretrained(run_args["vla_path"]), str(sil)).eval()
    with torch.no_grad():
        mean = vla(
            policy.frame("observations/images/top", frames["observations/images/top"])[None, None],
            ["transfer the cube"],
        )
    np.testing.assert_allclose(new, rl.data.unnormalize(mean[0].numpy(), policy.stats), rtol=1e-4, atol=1e-4)
    # aloha/evaluate.py scores it as any checkpoint
    r = run(
        "aloha/evaluate.py",
        "--checkpoint",
        sil,
        "--episodes",
        1,
        "--steps",
        8,
        "--envs",
        1,
        "--gif",
        0,
        "--out",
        tmp_path / "eval",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "eval" / "report.json").read_text())["policy"]["episodes"] == 1


def succeed_by_noise(episode, max_stage):
    """A stand-in for success that 30 steps can reach: whether the sampling noise of the last action's first joint
    was positive (1 episode in 2, so groups differ and every iteration updates)."""
    last = episode.decisions[-1]
    return not episode.skipped and bool(last.sample[last.executed - 1, 0] > last.mean[last.executed - 1, 0])


def rl_main(argv):
    rl.main(list(map(str, argv)))


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["grpo", "sil"])
def test_resumed_equals_straight(start, tmp_path, monkeypatch, algo):
    """4 iterations straight against 2, then --resume auto to 4: the same weights, std, optimizer and rollouts
    (the noise stream, the seeds, and for sil the buffer of successes, regenerated by replaying its episodes)."""
    ckpt, demos = start
    monkeypatch.setattr(rl, "succeeded", succeed_by_noise)
    # lr 1e-4, every step of each update taken (--target_kl 0): updates large enough that a bad resume would show
    flags = ["--checkpoint", ckpt, "--algo", algo, *FAST, "--save_interval", 2, "--demos", demos, "--lr", 1e-4]
    flags += ["--target_kl", 0]
    flags += ["--bc_coef", 0.5, "--kl_coef", 0.01] if algo == "grpo" else []
    rl_main([*flags, "--out_dir", tmp_path / "straight", "--iterations", 4])
    rl_main([*flags, "--out_dir", tmp_path / "resumed", "--iterations", 2])
    rl_main(["--out_dir", tmp_path / "resumed", "--resume", "auto", "--iterations", 4])
    a, b = tmp_path / "straight" / "step_000004", tmp_path / "resumed" / "step_000004"
    assert max_diff(trained_weights(a), trained_weights(b)) < 1e-6
    assert max_diff(trained_weights(a), trained_weights(ckpt)) > 1e-4
    sa, sb = (torch.load(d / rl.RL_STATE, weights_only=False) for d in (a, b))
    assert (sa["log_std"] - sb["log_std"]).abs().max() < 1e-6 and sa["next_seed"] == sb["next_seed"] == 20008
    for pa, pb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
        assert (pa["exp_avg_sq"] - pb["exp_avg_sq"]).abs().max() < 1e-6
    rows = [[json.loads(x) for x in (d.parent / "metrics.jsonl").read_text().splitlines()] for d in (a, b)]
    assert [r["step"] for r in rows[1]] == [1, 2, 3, 4]
    keys = ["episodes", "successes", "decisions", "seeds", "env_steps"]
    assert [[r[k] for k in keys] for r in rows[0]] == [[r[k] for k in keys] for r in rows[1]]
    if algo == "grpo":
        assert sum(r["groups_kept"] for r in rows[0]) > 0 and rows[0][-1]["bc_loss"] > 0
        # the learned std moved
        assert (sa["log_std"] - math.log(0.01)).abs().max() > 1e-4
    else:
        assert rows[0][-1]["buffer"] > 0 and sa["buffers"][0]


@pytest.mark.slow
def test_target_kl_ends_the_update_and_says_where(start, tmp_path, monkeypatch, capsys):
    """A --target_kl below any step's KL: each update takes its first step (measured at KL 0, before any step)
    and stops at the second minibatch, whose KL is logged, not hidden in a mean of 0."""
    ckpt, _ = start
    monkeypatch.setattr(rl, "succeeded", succeed_by_noise)
    flags = ["--checkpoint", ckpt, *FAST, "--lr", 1e-4, "--target_kl", 1e-9, "--out_dir", tmp_path / "run"]
    rl_main([*flags, "--iterations", 2])
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    updated = [r for r in rows if r["groups_kept"]]
    assert updated, "no group had a signal: the test saw no update"
    for r in updated:
        assert r["opt_steps"] == 1 and r["approx_kl"] == 0 and r["stop_kl"] > 1e-9
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "stopped by --target_kl" in ln]
    assert len(lines) == len(updated) and "(steps taken: 1)" in lines[0]


@pytest.mark.slow
def test_dtype_auto_is_the_one_the_checkpoint_trained_in(start, tmp_path):
    # a checkpoint trained under bf16 autocast is run by Policy in bfloat16: the rollouts must sample around that
    # policy, and the RL checkpoint must record the dtype it trained in
    ckpt = tmp_path / "bf16"
    shutil.copytree(start[0], ckpt)
    run_args = json.loads((ckpt / "args.json").read_text())
    assert run_args["dtype"] == "auto"
    (ckpt / "args.json").write_text(json.dumps(run_args | {"dtype": "bfloat16"}))
    for typed, expected in [([], "bfloat16"), (["--dtype", "float32"], "float32")]:
        args, _ = rl.get_args(["--checkpoint", str(ckpt), "--out_dir", str(tmp_path / "out"), *typed])
        run, _, base = rl.source_record(args, None)
        assert args.dtype == expected
        assert rl.run_record(run, base, args, 1)["dtype"] == expected
        assert rl.train.Process(args).dtype == getattr(torch, expected)
    # a checkpoint trained with --dtype auto keeps auto: float32 here, bfloat16 on a GPU, as Policy loads it
    args, _ = rl.get_args(["--checkpoint", str(start[0]), "--out_dir", str(tmp_path / "out")])
    rl.source_record(args, None)
    assert args.dtype == "auto" and rl.train.Process(args).dtype == torch.float32


@pytest.mark.slow
def test_bad_input_gets_one_line(start, tmp_path):
    ckpt, demos = start

    def error(*argv):
        with pytest.raises(SystemExit) as e:
            rl_main([*argv, "--out_dir", tmp_path / "out"])
        return str(e.value)

    missing = tmp_path / "nope"
    assert error("--checkpoint", missing) == f"error: --checkpoint {missing}: not a directory"
    assert error("--checkpoint", ckpt, "--task", "stack_cups") == (
        "error: --task 'stack_cups': unknown task; use transfer_cube, insertion"
    )
    assert error("--checkpoint", ckpt, "--envs", 0) == "error: --envs 0: must be positive"
    assert error("--checkpoint", ckpt, "--rollout_seed", 990) == (
        "error: the rollout seeds 990..1029 (--rollout_seed, --iterations, --episodes / --group) overlap the "
        "evaluation seeds 1000..1099 (--eval_seed, --eval_episodes): move --rollout_seed"
    )
    assert error("--checkpoint", ckpt, "--rollout_seed", 0, "--eval_seed", 5000) == (
        "error: rollout seeds 0..39 include 1 seeds the checkpoint's demonstrations were recorded on (0..0): "
        "move --rollout_seed"
    )
    assert error("--checkpoint", ckpt, "--group", 1) == (
        "error: --group 1: GRPO compares rollouts of one seed, it needs at least 2"
    )
    assert error("--checkpoint", ckpt, "--std_schedule", "cosine") == (
        "error: --std_schedule 'cosine': expected linear:A:B with stds A, B > 0 (e.g. linear:0.2:0.05)"
    )
    assert error("--checkpoint", ckpt, "--algo", "sil", "--demos", missing).startswith(
        "error: --algo sil and --bc_coef train on demonstrations: pass --demos DIR"
    )
    # a checkpoint that reads a camera the simulator does not have
    edited = tmp_path / "wrist"
    shutil.copytree(ckpt, edited)
    args = json.loads((edited / "args.json").read_text())
    cam = "observations/images/wrist"
    args |= {"cameras": cam, "frame_sizes": {cam: args["frame_sizes"]["observations/images/top"]}}
    (edited / "args.json").write_text(json.dumps(args))
    assert error("--checkpoint", edited).startswith(
        f"error: checkpoint {edited} needs camera '{cam}', which the simulator does not render (it has "
    )
    # --oracle is for a located checkpoint
    assert error("--checkpoint", ckpt, "--oracle") == (
        f"error: --locator and --oracle are for a checkpoint trained on observations/object_xy or "
        f"observations/qpos_object_xy; {ckpt} is not"
    )
    assert not os.path.exists(tmp_path / "out")


def test_state_pool_gives_the_state_evaluate_gives_and_holds_it_per_episode():
    """StatePool: each observation's "qpos" becomes the checkpoint's state (here the joint state, then a reading of
    the episode's first observation), read again when an environment starts its next episode."""
    import evaluate

    class Pool:
        n, max_stage = 2, 4

        def reset(self, seeds, render):
            return {i: {"qpos": np.full(2, 10.0 * s), "images": s} for i, s in seeds.items()}

        def step(self, actions, render):
            return {i: (0.0, {"qpos": np.asarray(a, np.float32)}) for i, a in actions.items()}

    reads = []

    def read(obs, seed):
        reads.append(seed)
        return np.array([obs["images"], seed], np.float32)

    pool = rl.StatePool(Pool(), evaluate.after_qpos(evaluate.held(read)))
    first = pool.reset({0: 3, 1: 5}, {0: True, 1: True})
    np.testing.assert_array_equal(first[0]["qpos"], [30, 30, 3, 3])
    np.testing.assert_array_equal(first[1]["qpos"], [50, 50, 5, 5])
    stepped = pool.step({0: [1, 2], 1: [7, 8]}, {0: False, 1: False})
    assert stepped[0][0] == 0.0
    np.testing.assert_array_equal(stepped[0][1]["qpos"], [1, 2, 3, 3])
    np.testing.assert_array_equal(stepped[1][1]["qpos"], [7, 8, 5, 5])
    again = pool.reset({1: 9}, {1: True})
    np.testing.assert_array_equal(again[1]["qpos"], [90, 90, 9, 9])
    assert reads == [3, 5, 9]


@pytest.mark.slow
def test_a_located_checkpoint_rolls_out_on_its_joints_and_where_the_objects_start(start, tmp_path, monkeypatch):
    """A checkpoint on observations/qpos_object_xy: without a locator or --oracle refused in one line; with --oracle
    every decision's state is the simulator's joint state then where that episode's cube starts."""
    import evaluate
    import record

    ckpt, demos = start
    run_args = json.loads((ckpt / "args.json").read_text())
    flags = ["--vla_path", run_args["vla_path"], "--data_dir", demos, "--out_dir", tmp_path / "located", "--proprio"]
    flags += ["--state_key", evaluate.QPOS_LOCATED_KEY, "--cameras", "observations/images/top", "--max_steps", 1]
    flags += ["--instruction", "transfer the cube", "--val_episodes", 0, "--batch_size", 2, "--lora_rank", 4]
    r = run("train.py", *flags, "--save_interval", 1, "--num_workers", 0)
    assert r.returncode == 0, r.stderr[-2000:]
    located = tmp_path / "located" / "step_000001"
    with pytest.raises(SystemExit) as e:
        rl_main(["--checkpoint", located, "--out_dir", tmp_path / "refused"])
    assert str(e.value) == (
        f"error: checkpoint {located} is told where the objects start (observations/qpos_object_xy): give --locator "
        "(written by aloha/locate.py), or --oracle for the simulator's positions"
    )
    assert not (tmp_path / "refused").exists()
    seen = []
    observe = rl.observe

    def recording(helper, obs):
        seen.append(np.array(obs["qpos"]))
        return observe(helper, obs)

    monkeypatch.setattr(rl, "observe", recording)
    rl_main(["--checkpoint", located, "--oracle", *FAST, "--iterations", 1, "--out_dir", tmp_path / "rl"])
    starts = {s: record.object_xy("transfer_cube", record.object_pose("transfer_cube", s)) for s in (20000, 20001)}
    # 4 episodes of 30 steps, a chunk every 8: 16 decisions, each on 14 joints and the cube's x, y
    assert len(seen) == 16 and all(x.shape == (16,) for x in seen)
    tails = [tuple(x[14:]) for x in seen]
    assert {tuple(v) for v in starts.values()} == set(tails)
    assert len({tuple(x[:14]) for x in seen}) > 2
    assert (tmp_path / "rl" / "step_000001" / "args.json").exists()


@pytest.mark.slow
def test_two_ranks_under_torchrun(start, tmp_path):
    """torchrun with 2 CPU ranks (gloo): each rank rolls out its own seeds on its own simulators, the gradients are
    all-reduced by hand, and the save checks that both ranks hold the same weights. sil, so that an update happens
    (the 2-step policy never succeeds in 30 steps: it trains on the demonstrations)."""
    ckpt, demos = start
    out = tmp_path / "ddp"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    flags = ["--checkpoint", ckpt, "--algo", "sil", "--demos", demos, *FAST, "--iterations", 1, "--out_dir", out]
    r = subprocess.run(
        [*launcher, "rl.py", *map(str, flags)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    # 4 episodes on each of the 2 ranks, rank 0 on the first 2 seeds of the iteration's block
    assert row["step"] == 1 and row["episodes"] == 8 and row["seeds"][0] == 20000
    assert json.loads((out / "step_000001" / "args.json").read_text())["rl"]["world_size"] == 2
    assert max_diff(trained_weights(out / "step_000001"), trained_weights(ckpt)) > 0


@pytest.mark.slow
def test_sigterm_saves_and_the_resumed_run_ends_as_a_straight_one(start, tmp_path):
    """SIGTERM mid-run: the last finished iteration is saved (the one in progress is dropped or finished), exit 75;
    --resume auto then ends with the weights of an uninterrupted run."""
    ckpt, demos = start
    flags = ["--checkpoint", ckpt, "--algo", "sil", "--demos", demos, *FAST, "--save_interval", 10, "--iterations", 4]
    r = run("rl.py", *flags, "--out_dir", tmp_path / "straight")
    assert r.returncode == 0, r.stderr[-3000:]
    stopped = tmp_path / "stopped"
    cmd = [sys.executable, "rl.py", *map(str, flags), "--out_dir", str(stopped)]
    with subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        for line in proc.stdout:
            if line.startswith("iter 2/4"):
                proc.send_signal(signal.SIGTERM)
                break
        out = line + proc.stdout.read()
        assert proc.wait(timeout=300) == 75, proc.stderr.read()[-3000:]
    saved = [d for d in os.listdir(stopped) if d.startswith("step_")]
    assert saved in (["step_000002"], ["step_000003"]) and "saved: run the same command with --resume auto" in out
    r = run("rl.py", *flags, "--out_dir", stopped, "--resume", "auto")
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = tmp_path / "straight" / "step_000004", stopped / "step_000004"
    assert max_diff(trained_weights(a), trained_weights(b)) < 1e-6
