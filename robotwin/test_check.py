"""
robotwin/check.py: instructions that name the arm which does not move (RoboTwin's OFT conversion paired episodes with
other episodes' texts) are found, and handovers, which move both arms, raise no alarm. Run from the repository root:

    python -m pytest -q robotwin/test_check.py
"""

import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

from robotwin import check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_episode(path, action, seen):
    """A flat RoboTwin episode with these actions and seen instructions (4x4 frames: the check never reads them)."""
    with h5py.File(path, "w") as f:
        f["head_camera_image"] = np.zeros((len(action), 4, 4, 3), np.uint8)
        f["action"] = action
        f.create_dataset("seen", data=list(seen), dtype=h5py.string_dtype())
    return str(path)


def arm_lines(directory, capsys):
    """robotwin/check.py's `arms:` lines on a directory, and its exit status."""
    try:
        check.main([str(directory)])
        code = 0
    except SystemExit as e:
        code = e.code
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith("arms:")], code


def test_arm_check_flags_instructions_of_other_episodes(demo, tmp_path, capsys):
    """Demo episodes move one arm and hold the other still; give them instructions that name the moving arm or,
    in some, the other one (as RoboTwin's OFT conversion did by pairing episodes with other episodes' texts)."""
    moving = {}
    for src in demo:
        shutil.copy(src, tmp_path / os.path.basename(src))
        with h5py.File(src) as f:
            action = f["action"][()]
        still = [np.ptp(action[:, arm], 0).max() == 0 for arm in (slice(0, 7), slice(7, 14))]
        assert sum(still) == 1
        moving[os.path.basename(src)] = "right" if still[0] else "left"
    assert set(moving.values()) == {"left", "right"}

    def give_instructions(wrong):
        for name, arm in moving.items():
            other = {"left": "right", "right": "left"}[arm]
            said, against = (other, arm) if name in wrong else (arm, other)
            seen = [
                f"Put the shoe down with the {said} arm.",
                f"{said.upper()} gripper: place the shoe",
                f"Use the {against} arm.",
                "Place it using the left and right arms.",
                "Put the shoe on the leftmost mat.",
            ]
            with h5py.File(tmp_path / name, "a") as f:
                del f["seen"]
                f.create_dataset("seen", data=seen, dtype=h5py.string_dtype())

    give_instructions(set())
    assert arm_lines(tmp_path, capsys) == (
        ["arms: all 6 episodes whose instructions name an arm move that arm most"],
        0,
    )
    give_instructions({"episode_1.hdf5", "episode_4.hdf5"})
    lines, code = arm_lines(tmp_path, capsys)
    assert code == 0 and lines == [
        "arms: in 2 of 6 episodes the instructions name one arm and the other arm moves most: "
        "episode_1.hdf5, episode_4.hdf5"
    ]
    give_instructions({f"episode_{i}.hdf5" for i in (0, 1, 2, 4, 5)})
    lines, code = arm_lines(tmp_path, capsys)
    assert code == 1 and len(lines) == 2
    assert lines[0].startswith("arms: in 5 of 6 episodes") and "episode_3" not in lines[0]
    assert "RoboTwin's OFT conversion" in lines[1] and "python robotwin/convert.py" in lines[1]


def test_named_and_moving_arm():
    assert check.named_arm(["Use the left and the right arm.", "no arm here", "Rightly placed"]) is None
    assert check.named_arm(["LEFT arm", "right arm", "the left one"]) == "left"
    assert check.named_arm(["the left arm", "the right arm"]) is None  # a tie
    assert check.moving_arm(np.zeros((5, 14))) is None
    assert check.moving_arm(np.stack([np.linspace(0, 1, 9)] * 6 + [np.zeros(9)] * 8, 1)) == "left"
    right = np.zeros((9, 14))
    right[:, 7:13] = np.linspace(0, 1, 9)[:, None]
    assert check.moving_arm(right) == "right"


def test_handover_does_not_raise_the_arm_alarm(tmp_path, capsys):
    """Both arms travel far in a handover: the arm an instruction names (the receiving one) is no evidence."""
    rng = np.random.default_rng(6)
    for i in range(4):
        action = np.cumsum(rng.normal(0, 0.05, (30, 14)), 0)
        action[:, 7:13] *= 1.3  # the giving (right) arm travels a little further than the receiving (left) one
        assert check.moving_arm(action) is None
        write_episode(tmp_path / f"episode_{i}.hdf5", action, ["hand the cube to the left arm"])
    assert arm_lines(tmp_path, capsys) == ([], 0)


def test_only_two_arm_episodes_are_checked(tmp_path, capsys):
    path = write_episode(tmp_path / "episode_0.hdf5", np.zeros((30, 13)), ["use the left arm"])
    with pytest.raises(SystemExit) as e:
        check.main([str(tmp_path)])
    assert e.value.code == f"error: {path}: no action of shape (T, 14): not a RoboTwin episode"


@pytest.mark.slow
def test_cli_exit_status(tmp_path):
    """python robotwin/check.py DIR from the repository root: 0 when the instructions name the arm that moves, 1 when
    most name the other."""
    rng = np.random.default_rng(0)
    for i in range(3):
        action = np.zeros((20, 14))
        action[:, :6] = np.cumsum(rng.normal(0, 0.1, (20, 6)), 0)  # the left arm moves
        write_episode(tmp_path / f"episode_{i}.hdf5", action, ["pick it up with the left arm"])
    cmd = [sys.executable, os.path.join("robotwin", "check.py"), str(tmp_path)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.splitlines() == [
        "arms: all 3 episodes whose instructions name an arm move that arm most"
    ], r.stderr
    for i in range(2):
        with h5py.File(tmp_path / f"episode_{i}.hdf5", "a") as f:
            del f["seen"]
            f.create_dataset("seen", data=["pick it up with the right arm"], dtype=h5py.string_dtype())
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stdout.startswith("arms: in 2 of 3 episodes"), r.stdout + r.stderr
