"""
Tests of aloha/locate.py, the CNN that reads where the objects start from an episode's first frame: its ranges
against gym-aloha's draws, the soft-argmax's geometry, gradients, a short run end to end (the file it writes loads
and reproduces its recorded error) and its one-line refusals.

    python -m pytest -q aloha/test_locate.py
"""

import numpy as np
import pytest
import torch

import locate
import record


@pytest.mark.parametrize("task", record.TASKS)
def test_the_ranges_are_those_gym_aloha_draws_from(task):
    """Every start position lies in the task's RANGES, and 2,000 seeds come within 1% of each end."""
    xy = np.stack([record.object_xy(task, record.object_pose(task, s)) for s in range(2000)])
    lo, hi = (np.array(v, np.float32) for v in locate.RANGES[task])
    assert (xy >= lo).all() and (xy <= hi).all()
    np.testing.assert_allclose(xy.min(0), lo, atol=0.01 * (hi - lo).max())
    np.testing.assert_allclose(xy.max(0), hi, atol=0.01 * (hi - lo).max())


def test_the_soft_argmax_finds_each_maps_peak():
    """A map peaked at row r, column c gives the keypoint (-1 + 2c/(w-1), -1 + 2r/(h-1)): with the output layer
    reading keypoint 0's x and keypoint 1's y, the normalized prediction is where the peaks are."""
    net = locate.Locator("transfer_cube", keypoints=2)
    h, w = 30, 40  # a 240x320 frame: half resolution, then two stride-2 convolutions
    peaks = [(3, 31), (17, 5)]

    class Peaks(torch.nn.Module):
        def forward(self, x):
            m = torch.full((x.shape[0], 2, h, w), -1e4)
            for k, (r, c) in enumerate(peaks):
                m[:, k, r, c] = 1e4
            return m

    net.convs = Peaks()
    with torch.no_grad():
        net.out.weight.zero_()
        net.out.bias.zero_()
        net.out.weight[0, 0] = 1  # x of keypoint 0 (the keypoints' x come first, then their y)
        net.out.weight[1, 3] = 1  # y of keypoint 1
        got = net.normalized(torch.zeros(1, 240, 320, 3, dtype=torch.uint8))[0]
    np.testing.assert_allclose(got, [-1 + 2 * 31 / (w - 1), -1 + 2 * 17 / (h - 1)], atol=1e-6)


def test_positions_round_trip_and_gradients_reach_every_parameter():
    torch.manual_seed(0)
    net = locate.Locator("insertion")
    frames = torch.randint(0, 256, (3, 48, 64, 3), dtype=torch.uint8)
    xy = net(frames)  # (3, 4): peg x, y and socket x, y in metres
    assert xy.shape == (3, 4)
    np.testing.assert_allclose(net.normalize(xy).detach(), net.normalized(frames).detach(), atol=1e-5)
    net.normalized(frames).abs().sum().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_each_task_gets_its_measured_keypoints_unless_told():
    # 8 never found insertion's peg; 32 read it to 0.33 cm (docs/simulation.md)
    assert locate.Locator("transfer_cube").out.in_features == 2 * 8
    assert locate.Locator("insertion").out.in_features == 2 * 32
    assert locate.Locator("insertion", 4).out.in_features == 2 * 4
    assert locate.get_args(["loc.pt", "--task", "insertion"]).keypoints is None


def test_the_error_is_summarized_per_object_in_object_xy_order():
    """A locator that reads the socket and misses the peg must say so, not hide it in a pooled median."""
    errors = np.array([[1.0, 0.1], [3.0, 0.3], [8.0, 0.2]])  # (scenes, peg then socket), cm
    summary = locate.error_summary(errors, "insertion")
    assert list(summary) == ["peg", "socket"]
    assert summary["peg"] == {"mean": 4.0, "median": 3.0, "p90": 7.0, "max": 8.0}
    assert summary["socket"] == {"mean": 0.2, "median": 0.2, "p90": 0.28, "max": 0.3}


@pytest.mark.slow
def test_a_short_run_writes_a_locator_that_reproduces_its_error(tmp_path, capsys):
    """Twelve scenes, three steps: the file loads, names what it reads, and its recorded validation error is what
    the loaded network's readings of freshly rendered validation scenes give."""
    out = tmp_path / "loc.pt"
    locate.main([str(out), "--scenes", "8", "--val_scenes", "4", "--steps", "3", "--size", "48x64", "--seed", "1"])
    assert f"wrote {out}" in capsys.readouterr().out
    net, saved = locate.load(str(out))
    assert saved["task"] == "transfer_cube" and saved["camera"] == "top" and saved["size"] == [48, 64]
    assert saved["zoom"] == 1.0 and saved["fast_render"] and saved["val_seeds"] == [30008, 30011]
    frames, xy = locate.render_scenes("transfer_cube", list(range(30008, 30012)), "top", (48, 64), True, 1.0, 2)
    again = locate.error_summary(locate.errors_cm(net, frames, xy), "transfer_cube")
    assert again == saved["val_error_cm"] and list(again) == ["cube"]
    with pytest.raises(SystemExit, match="exists: pass --overwrite"):
        locate.main([str(out), "--scenes", "8", "--steps", "3"])


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--first_scene", "500"], "--first_scene 500: below 10000, where record.py's demos and evaluate.py's"),
        (["--task", "stack"], "--task 'stack': unknown task"),
        (["--camera", "front"], "--camera 'front': the scene has no such camera (it has "),
        (["--steps", "0"], "--steps 0: must be at least 1"),
        (["--keypoints", "0"], "--keypoints 0: must be at least 1"),
    ],
)
def test_bad_input_is_one_line(flags, message, tmp_path):
    with pytest.raises(SystemExit) as e:
        locate.main([str(tmp_path / "loc.pt"), *flags])
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "loc.pt").exists()


def test_a_file_that_is_not_a_locator_is_refused_in_one_line(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ValueError, match="not a locator written by aloha/locate.py") as e:
        locate.load(str(path))
    assert "\n" not in str(e.value)
