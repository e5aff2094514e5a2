"""
Tests of the policies shipped in aloha/policies/ and of aloha/ship.py, which puts them there: a shipped policy loads
from any working directory against the tiny twin `python demo.py --tiny out/tiny-openvla` writes, refuses another
base, and still succeeds closed loop where it did when it was measured.

    python -m pytest -q aloha/test_policies.py
"""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import evaluate
import infer
import locate
import model
import record
import ship
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(ROOT, "aloha", "policies", "transfer_cube")
LOCATED = os.path.join(ROOT, "aloha", "policies", "transfer_cube_located")
INSERTION = os.path.join(ROOT, "aloha", "policies", "insertion_located")


@pytest.fixture(scope="module")
def small_checkpoint(tiny_dir, tmp_path_factory):
    """Two steps of the recipe's flags on three tiny demos."""
    demos, out = tmp_path_factory.mktemp("demos"), tmp_path_factory.mktemp("run")
    record.main([str(demos), "--episodes", "3", "--seed", "0", "--size", "48x64"])
    flags = ["--vla_path", tiny_dir, "--data_dir", demos, "--out_dir", out, "--cameras", "observations/images/top"]
    flags += ["--instruction", "transfer the cube", "--attention", "full", "--no-image_aug", "--num_workers", "0"]
    flags += [
        "--val_episodes",
        "0",
        "--batch_size",
        "2",
        "--lora_rank",
        "4",
        "--max_steps",
        "2",
        "--save_interval",
        "2",
    ]
    train.main(list(map(str, flags)))
    return out / "step_000002"


def fresh_clone(tmp_path, tiny_dir, policy):
    """A repository's layout in tmp_path: the policy shipped under aloha/policies/, the tiny twin in out/."""
    clone = tmp_path / "clone"
    shipped = clone / "aloha" / "policies" / os.path.basename(policy)
    shutil.copytree(policy, shipped)
    (clone / "out").mkdir()
    os.symlink(tiny_dir, clone / "out" / "tiny-openvla")
    return shipped


@pytest.mark.slow
def test_ship_writes_a_policy_that_loads_from_anywhere(small_checkpoint, tiny_dir, tmp_path, monkeypatch):
    policies = tmp_path / "repo" / "aloha" / "policies"
    base = tmp_path / "repo" / "out" / "tiny-openvla"
    base.parent.mkdir(parents=True)
    os.symlink(tiny_dir, base)
    out = ship.ship(str(small_checkpoint), "tc", str(base), policies=str(policies))
    assert sorted(os.listdir(out)) == sorted(model.ADAPTER_FILES + model.POLICY_FILES)
    run = json.loads(open(os.path.join(out, "args.json")).read())
    assert run["vla_path"] == "../../../out/tiny-openvla"
    # the same predictions as the checkpoint it came from, loaded from another working directory
    monkeypatch.chdir(tmp_path)
    frames = {"observations/images/top": np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)}
    shipped = infer.Policy.from_checkpoint(out, device="cpu").predict(frames)
    original = infer.Policy.from_checkpoint(str(small_checkpoint), device="cpu").predict(frames)
    np.testing.assert_allclose(shipped, original, atol=1e-6)
    with pytest.raises(ValueError, match="already holds a policy: pass --overwrite"):
        ship.ship(str(small_checkpoint), "tc", str(base), policies=str(policies))


@pytest.mark.slow
def test_ship_puts_a_located_policys_locator_beside_it(small_checkpoint, tiny_dir, tmp_path):
    scene = {"camera": "top", "size": [48, 64], "zoom": 1.0, "fast_render": True}
    locate.save(str(tmp_path / "loc.pt"), locate.Locator("transfer_cube"), "transfer_cube", scene)
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    policies = str(tmp_path / "p")
    with pytest.raises(ValueError, match="not a locator written by aloha/locate.py"):
        ship.ship(str(small_checkpoint), "tc", tiny_dir, policies=policies, locator=str(tmp_path / "other.pt"))
    assert not os.path.exists(policies)
    out = ship.ship(str(small_checkpoint), "tc", tiny_dir, policies=policies, locator=str(tmp_path / "loc.pt"))
    assert sorted(os.listdir(out)) == sorted(model.ADAPTER_FILES + model.POLICY_FILES + ["locator.pt"])
    frames = torch.randint(0, 256, (2, 48, 64, 3), dtype=torch.uint8)
    shipped, original = locate.load(os.path.join(out, "locator.pt"))[0], locate.load(str(tmp_path / "loc.pt"))[0]
    assert torch.equal(shipped(frames), original(frames))


@pytest.mark.slow
def test_a_shipped_policy_refuses_another_base(small_checkpoint, tmp_path):
    other = tmp_path / "other-base"
    shutil.copytree(json.loads(open(small_checkpoint / "args.json").read())["vla_path"], other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(config | {"norm_stats": {"x": 1}}))
    with pytest.raises(ValueError, match="was trained on another base"):
        ship.ship(str(small_checkpoint), "tc", str(other), policies=str(tmp_path / "p"))


def test_the_reference_policy_ships_with_its_files():
    """aloha/policies/transfer_cube: the files a policy needs, its base named relative to itself, the demos it
    trained on described (task, scene, seeds) so that evaluate.py renders what it saw, and its measured report."""
    shipped = model.ADAPTER_FILES + model.POLICY_FILES + ["README.md", "closed_loop.json"]
    assert sorted(os.listdir(SHIPPED)) == sorted(shipped)
    run = model.check_checkpoint(SHIPPED)
    assert run["vla_path"] == "../../../out/tiny-openvla"
    attrs = run["episode_attrs"]
    assert attrs["task"] == "transfer_cube" and attrs["render"] == "fast" and attrs["zoom"] == 1.0
    assert min(attrs["seed"]) == 0 and max(attrs["seed"]) == 199
    size = sum(os.path.getsize(os.path.join(SHIPPED, f)) for f in os.listdir(SHIPPED))
    assert size < 4e6
    report = json.loads(open(os.path.join(SHIPPED, "closed_loop.json")).read())
    assert report["settings"]["seeds"] == list(range(1000, 1100)) and report["settings"]["ensemble"]
    assert report["policy"]["success"] == sum(e["success"] for e in report["policy"]["per_episode"])


def evaluate_in_a_fresh_clone(tmp_path, tiny_dir, policy, flags):
    """evaluate.py, run from outside a fresh clone holding the shipped policy, on the one unseen seed its README
    says it succeeds on (with flags, how it was scored). -> the report."""
    policy_dir = fresh_clone(tmp_path, tiny_dir, policy)
    readme = open(os.path.join(policy, "README.md")).read()
    seed = int(re.search(r"succeeds on unseen seed (\d+)", readme)[1])
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "aloha", "evaluate.py"), "--checkpoint", policy_dir, "--episodes", "1"]
        + ["--seed", str(seed), *flags, "--envs", "1", "--gif", "0", "--out", str(tmp_path / "eval")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((tmp_path / "eval" / "report.json").read_text())


@pytest.mark.slow
def test_the_reference_policy_loads_in_a_fresh_clone_and_hands_the_cube_over(tiny_dir, tmp_path):
    """After the one documented command (the tiny twin in out/), the shipped policy loads from any directory and
    succeeds closed loop on an unseen seed where its measurement saw it succeed."""
    report = evaluate_in_a_fresh_clone(tmp_path, tiny_dir, SHIPPED, ["--ensemble"])
    assert report["policy"]["per_episode"][0]["success"], report["policy"]["per_episode"]
    assert evaluate.summarize(report["policy"]["per_episode"])["success"] == 1


@pytest.mark.parametrize("policy, task", [(LOCATED, "transfer_cube"), (INSERTION, "insertion")])
def test_a_located_policy_ships_with_its_locator(policy, task):
    """aloha/policies/*_located: the policy told where the objects start, the locator that reads them from the top
    frame beside it (for the same task, camera, frame size and scene, every object read under 1 cm), and its
    measured report."""
    shipped = model.ADAPTER_FILES + model.POLICY_FILES + ["README.md", "closed_loop.json", "locator.pt"]
    assert sorted(os.listdir(policy)) == sorted(shipped)
    run = model.check_checkpoint(policy)
    assert run["proprio"] and run["state_key"] in (evaluate.LOCATED_KEY, evaluate.QPOS_LOCATED_KEY)
    _, saved = locate.load(os.path.join(policy, "locator.pt"))
    assert saved["task"] == run["episode_attrs"]["task"] == task
    assert saved["size"] == run["frame_sizes"]["observations/images/top"] and saved["camera"] == "top"
    assert saved["first_scene"] >= locate.LOWEST_SCENE
    assert list(saved["val_error_cm"]) == list(locate.OBJECTS[task])
    assert all(error["mean"] < 1 for error in saved["val_error_cm"].values()), saved["val_error_cm"]
    report = json.loads(open(os.path.join(policy, "closed_loop.json")).read())
    assert report["settings"]["seeds"] == list(range(1000, 1100)) and report["settings"]["locator"]
    assert report["settings"]["task"] == task
    assert report["policy"]["success"] == sum(e["success"] for e in report["policy"]["per_episode"])


@pytest.mark.slow
@pytest.mark.parametrize(
    "policy, flags",
    [(LOCATED, ["--execute", "8"]), (INSERTION, ["--task", "insertion", "--execute", "8"])],
)
def test_a_located_policy_succeeds_in_a_fresh_clone(policy, flags, tiny_dir, tmp_path):
    """The same one command as the reference policy: its locator is found beside it, and the unseen seed its
    README names succeeds (transfer cube: handed over; insertion: the peg touches the pin)."""
    report = evaluate_in_a_fresh_clone(tmp_path, tiny_dir, policy, flags)
    assert "locator.pt" in report["policy"]["what"] and report["policy"]["per_episode"][0]["success"]
