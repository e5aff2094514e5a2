"""
demo.py: the synthetic demo episodes have the real layout and are reproducible by seed.
"""

import h5py
import numpy as np
import pytest

import data
from demo import make_demo
from helpers import actions_of


def test_demo_has_the_real_layout(demo):
    assert len(demo) == 6
    lengths = []
    for p in demo:
        with h5py.File(p, "r") as f:
            assert set(f) == {*data.ALL_CAMERAS, "action", "relative_action", "seen", "unseen"}
            T = len(f["action"])
            lengths.append(T)
            for c in data.ALL_CAMERAS:
                assert f[c].shape == (T, 256, 256, 3) and f[c].dtype == np.uint8 and f[c].chunks == (1, 256, 256, 3)
                assert f[c].compression in ("gzip", "lzf")
            a, rel = f["action"][()], f["relative_action"][()]
            assert a.shape == (T, 14) and a.dtype == np.float64 and rel.shape == (T, 14) and rel.dtype == np.float64
            np.testing.assert_allclose(rel[:-1], a[1:] - a[:-1])
            np.testing.assert_array_equal(rel[-1], rel[-2])
            for key in ("seen", "unseen"):
                assert f[key].ndim == 1 and h5py.check_string_dtype(f[key].dtype).encoding == "utf-8"
                assert len(set(f[key].asstr()[()])) >= 24
            assert not set(f["seen"].asstr()[()]) & set(f["unseen"].asstr()[()])
            grips = a[:, [6, 13]]
            assert grips.min() == 0 and grips.max() == 1 and ((grips >= 0) & (grips <= 1)).all()
            joints = [i for i in range(14) if i not in (6, 13)]
            assert np.abs(rel[:, joints]).max() < 0.15 and np.abs(rel).max() < 0.35  # smooth motion, no jumps
            # the frames change while the arm moves: the cameras show what the actions do
            assert not np.array_equal(f["head_camera_image"][0], f["head_camera_image"][T // 2])
    assert 140 <= min(lengths) and max(lengths) <= 240 and len(set(lengths)) > 1


def test_demo_is_reproducible_by_seed(tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        make_demo(str(tmp_path / name), episodes=1, seed=seed)
    a, b, c = (actions_of(tmp_path / name / "episode_0.hdf5") for name in "abc")
    np.testing.assert_array_equal(a, b)
    assert a.shape != c.shape or not np.array_equal(a, c)
    with pytest.raises(data.DataError, match="already holds"):
        make_demo(str(tmp_path / "a"), episodes=1)
