"""
merge.py: LoRA merged into the base weights gives the same outputs, the export reloads and serves, and merge.py never
writes into the base or the checkpoint.
"""

import json
import os
import re
import runpy
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file

import data
import infer
import model
from helpers import ENV, INSTR, ROOT, edit_json, frame_dict, images, lora_vla
from merge import save_pretrained
from model import VLA, load_trained, merge_lora


def test_merge_matches_lora_and_export_reloads(tiny_dir, tmp_path):
    vla = lora_vla(tiny_dir, proprio_dim=4, attention="full", film=True)
    x, state = images(2), torch.rand(2, 4) * 2 - 1
    out = vla(x, INSTR[:2], state)
    with pytest.raises(ValueError, match="merge_lora"):
        save_pretrained(vla, str(tmp_path / "export"))
    merge_lora(vla)
    assert not any(isinstance(m, LoraLayer) for m in vla.modules())
    plain = VLA.from_pretrained(tiny_dir, proprio_dim=4, attention="full", film=True)
    plain.load_state_dict({k: v for k, v in vla.state_dict().items() if k.startswith(model.HEAD)}, strict=False)
    assert set(vla.state_dict()) == set(plain.state_dict())
    merged = vla(x, INSTR[:2], state)
    torch.testing.assert_close(merged, out, atol=1e-5, rtol=1e-4)
    assert (merged - plain(x, INSTR[:2], state)).abs().max() > 1e-3  # LoRA changed something
    save_pretrained(vla, str(tmp_path / "export"), max_shard_bytes=1 << 20)  # several shards + index
    assert os.path.exists(tmp_path / "export" / "model.safetensors.index.json")
    export = VLA.from_pretrained(str(tmp_path / "export"))  # the head brings proprio_dim, attention, FiLM along
    assert (export.proprio_dim, export.attention, export.film) == (4, "full", True)
    film = {k for k in vla.state_dict() if k.startswith("film_layers.")}
    assert len(film) == 16 and film <= set(load_file(tmp_path / "export" / "action_head.safetensors"))
    torch.testing.assert_close(export(x, INSTR[:2], state), merged, atol=0, rtol=0)


@pytest.mark.slow
def test_merge_cli(tiny_dir, tmp_path):
    vla = lora_vla(tiny_dir)
    # a checkpoint as train.py writes it (model.write_checkpoint), its run record holding what a policy needs
    stats = data.compute_stats([np.random.default_rng(0).normal(size=(50, 14))])
    run = dict(vla_path=tiny_dir, cameras="head_camera_image", chunk=8, action_dim=14, action_offset=0, norm="bounds")
    run["frame_sizes"] = {"head_camera_image": [224, 224]}
    run.update(dtype="float32", action_key="action", state_key=None, instruction=None, swap_red_blue=False)
    model.write_checkpoint(str(tmp_path / "ckpt"), vla, dict(action_stats=stats), run)
    assert sorted(os.listdir(tmp_path / "ckpt")) == sorted(model.ADAPTER_FILES + model.POLICY_FILES)
    assert model.check_checkpoint(str(tmp_path / "ckpt")) == run
    merge_lora(vla)
    cmd = [
        sys.executable,
        "merge.py",
        str(tmp_path / "ckpt"),
        "--base",
        tiny_dir,
        "--out",
        str(tmp_path / "out"),
        "--device",
        "cpu",
        "--dtype",
        "float32",
    ]
    subprocess.run(
        cmd,
        check=True,
        cwd=ROOT,
        capture_output=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert {"dataset_statistics.json", "args.json", "config.json"} <= set(os.listdir(tmp_path / "out"))
    assert "adapter_config.json" not in os.listdir(tmp_path / "out")
    assert model.is_export(str(tmp_path / "out")) and model.check_checkpoint(str(tmp_path / "out")) == run
    x = images(2)
    torch.testing.assert_close(VLA.from_pretrained(str(tmp_path / "out"))(x, INSTR[:2]), vla(x, INSTR[:2]))


@pytest.mark.slow
def test_policy_from_merged_export(run_a, policy, val_episode, tmp_path):
    """--base defaults to the base the checkpoint trained on."""
    cmd = [sys.executable, "merge.py", str(run_a / "step_000006"), "--out", str(tmp_path), "--dtype", "float32"]
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    merged = infer.Policy.from_checkpoint(str(tmp_path), device="cpu")
    episode = data.read_episode(val_episode, policy.cameras)
    images = frame_dict(episode, 5, policy.cameras)
    np.testing.assert_allclose(
        merged.predict(images, "place it"), policy.predict(images, "place it"), rtol=1e-3, atol=1e-4
    )


@pytest.mark.slow
def test_merged_export_with_a_missing_shard_is_one_line(run_a, tiny_dir, tmp_path):
    export = tmp_path / "export"
    vla = merge_lora(load_trained(VLA.from_pretrained(tiny_dir), str(run_a / "step_000006")))
    save_pretrained(vla, str(export), max_shard_bytes=1 << 20)
    for f in ("args.json", "dataset_statistics.json"):
        shutil.copy(run_a / "step_000006" / f, export)
    shard = sorted(set(json.load(open(export / "model.safetensors.index.json"))["weight_map"].values()))[1]
    os.remove(export / shard)
    with pytest.raises(FileNotFoundError, match=f"^missing .*{shard}$"):
        infer.Policy.from_checkpoint(str(export), device="cpu")


def run_merge(monkeypatch, *args):
    """merge.py in this process: runpy runs its __main__ block as the command line does."""
    monkeypatch.setattr(sys, "argv", ["merge.py", *map(str, args), "--dtype", "float32"])
    runpy.run_path(os.path.join(ROOT, "merge.py"), run_name="__main__")


@pytest.mark.slow
def test_merge_never_writes_into_the_base_or_the_checkpoint_and_refuses_another_base(
    run_a, tiny_dir, tmp_path, monkeypatch, capsys
):
    ckpt = str(run_a / "step_000006")
    before = {f: open(os.path.join(tiny_dir, f), "rb").read() for f in os.listdir(tiny_dir)}
    for out, where in [
        (tiny_dir, tiny_dir),
        (os.path.join(tiny_dir, "merged"), tiny_dir),
        (ckpt, ckpt),
        (os.path.join(ckpt, "merged"), ckpt),
    ]:
        with pytest.raises(SystemExit, match=f"--out {re.escape(out)} is \\(or is inside\\) .*{re.escape(where)}"):
            run_merge(monkeypatch, ckpt, "--base", tiny_dir, "--out", out)
    assert {f: open(os.path.join(tiny_dir, f), "rb").read() for f in os.listdir(tiny_dir)} == before
    assert not os.path.exists(os.path.join(ckpt, "merged")) and "config.json" not in os.listdir(ckpt)

    other = shutil.copytree(tiny_dir, tmp_path / "other-base")  # the same shapes, another config (norm_stats)
    edit_json(other / "config.json", lambda c: c.update(norm_stats={"libero": {}}))
    with pytest.raises(
        SystemExit,
        match=f"{ckpt} was trained on another base than {other} \\(config.json "
        f"[0-9a-f]{{16}}; {other}'s: [0-9a-f]{{16}}\\): pass the base",
    ):
        run_merge(monkeypatch, ckpt, "--base", other, "--out", tmp_path / "out")
    assert not os.path.exists(tmp_path / "out")
