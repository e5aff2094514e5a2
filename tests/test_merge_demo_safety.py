"""
Nothing already saved is replaced unasked by `demo.py --tiny` or `merge.py --out`; merge.py exports in the dtype the
checkpoint trained in; and `demo.py --tiny` keeps writing the very bytes it writes today (policies are shipped
against the tiny twin, guarded only by its config fingerprint).

    python -m pytest -q tests/test_merge_demo_safety.py
"""

import hashlib
import json
import os
import runpy
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open

import infer
import merge
import train
from demo import make_demo, make_tiny

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# sha256 of what `python demo.py --tiny DIR` wrote on 2026-12-05 (main 0ab59a2, torch 2.13.0, tokenizers, safetensors
# 0.8.0): a change here changes the twin that trained policies were shipped against
TINY_SHA256 = {
    "config.json": "8aee00235e298c31f671aa3b81528574a30d2967396b30a9a31930918a869bce",
    "model.safetensors": "b844033868d912b0aaf1a0c132575a32097097a7adcefb0b8f3246b989ceff22",
    "preprocessor_config.json": "afc7c7b0a87471ec257c2dc36c1765139a3ce13c6879f82729d39de2a7f92235",
    "special_tokens_map.json": "1a782a742fca63954a25ea71997fd962a8dbd4e31006da54adb485f61136dca8",
    "tokenizer.json": "d3450a76b91beecfd589655ab7e289bfc1cd7447e174888a4636fcd70cf93119",
    "tokenizer_config.json": "2d92a27ad85cf6febeb67bbfed5384a48137926578d8824f190913bbecea2611",
}


def contents(directory):
    """{file name: bytes} of a directory, to show that nothing in it changed."""
    return {f: open(os.path.join(directory, f), "rb").read() for f in sorted(os.listdir(directory))}


def sha256s(directory):
    return {f: hashlib.sha256(b).hexdigest() for f, b in contents(directory).items()}


@pytest.fixture(scope="module")
def twin(tmp_path_factory):
    return make_tiny(str(tmp_path_factory.mktemp("base") / "tiny"))


@pytest.fixture(scope="module")
def ckpt(twin, tmp_path_factory):
    """One training step of the twin on 2 demo episodes, on the CPU with train.py's defaults (--dtype auto)."""
    root = tmp_path_factory.mktemp("run")
    make_demo(str(root / "demo"), episodes=2, seed=0)
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}  # train.main installs its own
    try:
        train.main(
            [
                *("--vla_path", twin, "--data_dir", str(root / "demo"), "--out_dir", str(root / "out")),
                *("--val_episodes", "1", "--batch_size", "2", "--num_workers", "0", "--lora_rank", "4"),
                *("--max_steps", "1", "--save_interval", "1", "--eval_interval", "1", "--eval_batches", "1"),
            ]
        )
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
    return str(root / "out" / "step_000001")


def run_merge(monkeypatch, *args):
    """merge.py's command line, in this process."""
    monkeypatch.setattr(sys, "argv", ["merge.py", *map(str, args)])
    runpy.run_path(os.path.join(HERE, "merge.py"), run_name="__main__")


def weight_dtypes(export):
    with safe_open(os.path.join(export, "model.safetensors"), framework="pt") as f:
        return {f.get_slice(k).get_dtype() for k in f.keys()}


def test_make_tiny_writes_identical_files_into_two_directories(tmp_path):
    make_tiny(str(tmp_path / "a"))
    make_tiny(str(tmp_path / "b"))
    assert contents(tmp_path / "a") == contents(tmp_path / "b")
    assert sha256s(tmp_path / "a") == TINY_SHA256


@pytest.mark.slow
def test_demo_tiny_refuses_a_model_or_a_checkpoint_unless_overwrite(twin, ckpt, tmp_path):
    model_dir, ckpt_dir = shutil.copytree(twin, tmp_path / "model"), shutil.copytree(ckpt, tmp_path / "ckpt")
    (tmp_path / "file").write_text("x")
    for target, held in [
        (model_dir, "config.json, model.safetensors, preprocessor_config.json and 3 more"),
        (ckpt_dir, "action_head.safetensors, adapter_config.json, adapter_model.safetensors and 3 more"),
    ]:
        before = contents(target)
        r = subprocess.run(
            [sys.executable, "demo.py", "--tiny", str(target)], cwd=HERE, env=ENV, capture_output=True, text=True
        )
        assert (r.returncode, r.stderr) == (
            1,
            f"error: --tiny {target} is not empty (it holds {held}): pass --overwrite to write over it, or another "
            "directory\n",
        )
        assert contents(target) == before
    r = subprocess.run(
        [sys.executable, "demo.py", "--tiny", str(tmp_path / "file")], cwd=HERE, env=ENV, capture_output=True, text=True
    )
    assert (r.returncode, r.stderr) == (1, f"error: --tiny {tmp_path / 'file'} is a file, not a directory\n")
    assert (tmp_path / "file").read_text() == "x"
    r = subprocess.run(
        [sys.executable, "demo.py", "--tiny", str(model_dir), "--overwrite"], cwd=HERE, env=ENV, capture_output=True
    )
    assert r.returncode == 0 and contents(model_dir) == contents(twin)


@pytest.mark.slow
def test_merge_refuses_another_export_and_the_bases_parent(twin, ckpt, tmp_path, monkeypatch, capsys):
    out = tmp_path / "export"
    run_merge(monkeypatch, ckpt, "--out", out)
    capsys.readouterr()
    os.remove(out / "args.json")  # as if another run's export: refused, not replaced
    before = contents(out)
    with pytest.raises(SystemExit) as e:
        run_merge(monkeypatch, ckpt, "--out", out)
    assert e.value.code == (
        f"error: --out {out} is not empty (it holds action_head.safetensors, config.json, dataset_statistics.json "
        "and 5 more): pass --overwrite to write over it, or another directory"
    )
    assert contents(out) == before
    run_merge(monkeypatch, ckpt, "--out", out, "--overwrite")
    assert "args.json" in os.listdir(out) and contents(out)["model.safetensors"] == before["model.safetensors"]

    parent, beside = os.path.dirname(twin), os.listdir(os.path.dirname(twin))
    for overwrite in [[], ["--overwrite"]]:  # writing beside the base is never what was asked for
        with pytest.raises(SystemExit, match=f"^error: --out {parent} holds {twin}: pass another --out$"):
            run_merge(monkeypatch, ckpt, "--base", twin, "--out", parent, *overwrite)
    assert os.listdir(parent) == beside
    with pytest.raises(SystemExit, match=f"^error: --out {os.path.dirname(ckpt)} holds {ckpt}: pass another --out$"):
        run_merge(monkeypatch, ckpt, "--base", twin, "--out", os.path.dirname(ckpt))


@pytest.mark.slow
def test_merge_exports_in_the_dtype_the_checkpoint_trained_in(ckpt, tmp_path, monkeypatch, capsys):
    """Trained in float32 on a CPU: a bfloat16 export would act differently from the checkpoint it came from."""
    run_merge(monkeypatch, ckpt, "--out", tmp_path / "f32")
    assert (
        capsys.readouterr()
        .out.splitlines()[-1]
        .endswith("/f32, in float32 (the dtype it trained in: --dtype auto on a CPU)")
    )
    assert weight_dtypes(tmp_path / "f32") == {"F32"}
    trained = infer.Policy.from_checkpoint(ckpt, device="cpu")
    merged = infer.Policy.from_checkpoint(str(tmp_path / "f32"), device="cpu")
    rng = np.random.default_rng(0)
    images = {c: rng.integers(0, 256, (240, 320, 3), dtype=np.uint8) for c in trained.cameras}
    np.testing.assert_allclose(merged.predict(images, "place it"), trained.predict(images, "place it"), atol=1e-5)

    run_merge(monkeypatch, ckpt, "--out", tmp_path / "f16", "--dtype", "float16")
    assert capsys.readouterr().out.splitlines()[-1].endswith("/f16, in float16 (--dtype)")
    assert weight_dtypes(tmp_path / "f16") == {"F16"}

    bf16 = shutil.copytree(ckpt, tmp_path / "bf16-ckpt")
    args = json.load(open(bf16 / "args.json"))
    json.dump(args | {"dtype": "bfloat16"}, open(bf16 / "args.json", "w"))
    run_merge(monkeypatch, bf16, "--out", tmp_path / "bf16")
    assert (
        capsys.readouterr()
        .out.splitlines()[-1]
        .endswith("/bf16, in bfloat16 (the dtype it trained in: --dtype bfloat16)")
    )
    assert weight_dtypes(tmp_path / "bf16") == {"BF16"}


@pytest.mark.slow
def test_trained_dtype_reads_auto_from_the_device_it_trained_on(ckpt, tmp_path):
    args = json.load(open(os.path.join(ckpt, "args.json")))
    assert (args["dtype"], args["device"]) == ("auto", "auto")
    assert merge.trained_dtype(ckpt, args) == ("float32", "--dtype auto on a CPU")
    assert merge.trained_dtype(ckpt, args | {"device": "cuda:1"}) == (
        "bfloat16",
        "--dtype auto on CUDA (--device cuda:1)",
    )
    assert merge.trained_dtype(ckpt, args | {"device": "cpu", "dtype": "float32"}) == ("float32", "--dtype float32")
    # --device auto on a machine with CUDA: train.py saved the CUDA RNG state beside the CPU's
    state = torch.load(os.path.join(ckpt, "trainer_state.pt"), weights_only=True)
    state["rng"] = [r | {"cuda": torch.zeros(16, dtype=torch.uint8)} for r in state["rng"]]
    os.makedirs(tmp_path / "cuda")
    torch.save(state, tmp_path / "cuda" / "trainer_state.pt")
    assert merge.trained_dtype(str(tmp_path / "cuda"), args) == ("bfloat16", "--dtype auto on CUDA (--device auto)")
    with pytest.raises(ValueError, match=f"^cannot tell whether {tmp_path} trained on CUDA .*: pass --dtype$"):
        merge.trained_dtype(str(tmp_path), args)
    with pytest.raises(ValueError, match="records no --dtype and --device: pass --dtype$"):
        merge.trained_dtype(ckpt, {k: v for k, v in args.items() if k != "dtype"})
