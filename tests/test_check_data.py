"""
check_data.py, the data check (python check_data.py DIR): every problem one line naming its file, no traceback; the
layout, counts, statistics and instructions of a directory, and the train.py flags that read it.
"""

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

import check_data
import data
import model
from helpers import (
    BROKEN,
    LIBERO_TASK,
    ROOT,
    write_act_sim,
    write_blank_instructions,
    write_broken,
    write_episode,
    write_libero,
)

pytestmark = pytest.mark.filterwarnings("ignore:Creating a dataset without passing data or dtype")  # as ACT does


def run_cli(*args):
    """check_data.py as a user runs it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "check_data.py"), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


@pytest.mark.slow
def test_cli_reports_problems_without_traceback(tmp_path):
    broken = write_broken(tmp_path)
    r = run_cli(broken)
    assert r.returncode != 0 and "Traceback" not in r.stdout + r.stderr
    for i in BROKEN:
        assert str(broken / f"episode_{i}.hdf5") in r.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run_cli(empty, "--cameras", "head_camera_image,wrist_cam")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "no episode_*.hdf5 (or other .hdf5) files" in r.stderr
    r = run_cli(broken / "episode_0.hdf5", "--cameras", "head_camera_image,wrist_cam")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "missing wrist_cam" in r.stderr
    r = run_cli()
    assert r.returncode == 2 and r.stderr.splitlines()[-1].endswith(
        "give a directory to check (demo episodes: python demo.py DIR)"
    )


@pytest.mark.slow
def test_cli_summary(tmp_path):
    write_episode(tmp_path / "episode_0.hdf5", T=30)
    write_episode(tmp_path / "episode_1.hdf5", T=5)
    r = run_cli(tmp_path, "--action_offset", "1")
    assert r.returncode == 0, r.stderr
    assert "warning" in r.stderr and "episode_1.hdf5" in r.stderr
    out = r.stdout
    assert out.splitlines()[0] == "layout: RoboTwin (flat)"
    assert "1 episodes, 30 frames" in out and "22 samples" in out and "at 8x8" in out
    assert "right_gripper" in out and "seen: 2-2 variants per episode, e.g. pick it | place it" in out
    # a RoboTwin layout: where to check that the instructions name the arm that moves
    assert f"arms: to check that instructions name the arm that moves: python robotwin/check.py {tmp_path}" in out
    assert out.splitlines()[-1] == "flags: --cameras head_camera_image,left_wrist_image"


@pytest.mark.slow
def test_cli_names_every_missing_empty_and_blank_instruction(tmp_path):
    paths = write_blank_instructions(tmp_path)
    with pytest.raises(data.DataError) as err:
        data.check_episodes(paths, data.DEFAULT_CAMERAS, 8, 14)
    r = run_cli(tmp_path)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == str(err.value).splitlines() and len(r.stderr.strip().splitlines()) == 4


@pytest.mark.slow
def test_check_measures_prompts_with_the_models_tokenizer(tmp_path, tiny_dir, capsys):
    """A 5,000-word instruction is ~5,000 tokens: with the image patches, past Llama-2's 2,048 positions."""
    good = write_episode(tmp_path / "episode_0.hdf5", seen=("pick it", "put the shoe on the mat"))
    config, tok = model.load_tokenizer(tiny_dir)
    n = model.check_sequence_length(config, tok, "put the shoe on the mat", 2, True, 8)
    assert n == len(model.prompt_ids(tok, "put the shoe on the mat")) + 2 * 256 + 1 + 8

    def summarize(**kw):
        return check_data.summarize(str(tmp_path), data.DEFAULT_CAMERAS, 8, 14, 0, **kw)

    summarize(vla_path=tiny_dir, proprio=True)
    assert f"prompts: the longest instruction fills {n} of the LLM's 2048 positions" in capsys.readouterr().out
    long = write_episode(tmp_path / "episode_1.hdf5", seen=("pick it", "place the shoe " * 1700))
    summarize()  # without --vla_path there is no tokenizer to measure with
    with pytest.raises(data.DataError, match="nowhere: no such checkpoint directory"):
        summarize(vla_path=str(tmp_path / "nowhere"))
    r = run_cli(tmp_path, "--vla_path", tiny_dir)
    assert r.returncode != 0 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith(f"{long}: the instruction is too long: ") and "2048" in r.stderr and good not in r.stderr


def test_summary_names_generic_dimensions_and_points_robotwin_only_at_the_arm_check(tmp_path, capsys):
    """Actions other than the 14 two-arm joints are dim_0, dim_1, ...; only a 14-D RoboTwin layout gets the pointer
    to robotwin/check.py."""
    (tmp_path / "seven").mkdir()
    write_episode(tmp_path / "seven" / "episode_0.hdf5", T=12, width=7)
    check_data.summarize(str(tmp_path / "seven"), chunk=4)
    out = capsys.readouterr().out
    rows = [line.split()[0] for line in out.splitlines() if line.startswith("dim_")]
    assert rows == [f"dim_{i}" for i in range(7)] and "gripper" not in out and "arms:" not in out
    assert out.splitlines()[-1] == "flags: --cameras head_camera_image,left_wrist_image --action_dim 7"
    (tmp_path / "act").mkdir()
    write_act_sim(tmp_path / "act" / "episode_0.hdf5", 12, np.random.default_rng(0))
    check_data.summarize(str(tmp_path / "act"), chunk=4, instruction="transfer the cube")
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "layout: ACT/ALOHA" and "right_gripper" in out and "arms:" not in out
    assert out.splitlines()[-1] == "flags: --cameras observations/images/top --instruction 'transfer the cube'"


def test_summary_flags_line():
    assert check_data.summary_flags(["a", "b"], "action", 14, None, None) == "flags: --cameras a,b"
    line = check_data.summary_flags(["obs/x"], "actions", 7, "obs/joint_states", "put the bowl")
    assert line == "flags: --cameras obs/x --action_key actions --action_dim 7 --state_key obs/joint_states " + (
        "--instruction 'put the bowl'"
    )
    line = check_data.summary_flags(["top"], "action", 14, None, "TEXT")
    assert line.startswith("flags: --cameras top --instruction TEXT   # the files hold no instructions")


@pytest.mark.slow
def test_cli_names_a_libero_file_without_demos_and_reads_the_layout_from_the_good_one(tmp_path):
    """The empty file sorts first: the layout still comes from the good file, so the one line is about the empty
    file, not the good demos (which would fail as episodes of another layout)."""
    with h5py.File(tmp_path / "A_empty_demo.hdf5", "w") as f:
        f.create_group("data").attrs["problem_info"] = json.dumps({"language_instruction": LIBERO_TASK})
    good = write_libero(tmp_path / "KITCHEN_SCENE1_demo.hdf5", (12, 14), np.random.default_rng(1))
    r = run_cli(tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.splitlines() == [
        f"{tmp_path / 'A_empty_demo.hdf5'}: a robomimic/LIBERO file whose data/ group holds no demo_N groups"
    ]
    r = run_cli(good)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == "layout: robomimic/LIBERO, 2 demos in 1 files"
    assert r.stdout.splitlines()[-1] == (
        "flags: --cameras obs/agentview_rgb,obs/eye_in_hand_rgb --action_key actions --action_dim 7"
    )


@pytest.mark.slow
def test_cli_a_group_named_as_a_camera_is_one_line(tmp_path):
    path = write_act_sim(tmp_path / "episode_0.hdf5", 12, np.random.default_rng(2))
    r = run_cli(tmp_path, "--cameras", "observations/images", "--instruction", "go")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.splitlines() == [
        f"{path}: observations/images is a group, not a dataset: name the datasets inside it "
        "(e.g. observations/images/top)"
    ]
