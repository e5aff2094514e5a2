"""
bench.py: FLOPs against a hand count, the memory model against a real step, and its tables.
"""

import pytest
import torch

import bench
import model
from demo import SEEN, make_tokenizer, openvla_7b_config, tiny_config
from model import VLA, add_lora


def test_bench_flops_match_a_hand_count_and_a_train_row(tiny_dir, capsys):
    """bench.py's FLOPs equal a count written out from the tiny twin's published shapes; one real training step
    (grad ckpt) gives a row whose throughput, MFU and HFU are consistent with that count."""
    r, n, K = 4, 2, 8  # LoRA rank, cameras, action queries

    def vit(w, blocks, mlp, prefix):  # per image: T tokens, frozen 4x, LoRA 6x, attention, patch embed forward only
        T, frozen, lora = 256 + prefix, blocks * (4 * w * w + 2 * w * mlp), blocks * r * (8 * w + 2 * mlp)
        return (
            n * (T * (4 * frozen + 6 * lora) + 12 * blocks * w * T * T + 2 * 3 * 14 * 14 * w * 256),
            n * (T * 2 * (frozen + lora) + 4 * blocks * w * T * T),
        )

    def hand(prompt, d=128, ff=512, L=2):  # -> (model FLOPs, grad ckpt recompute) of one sample
        T = n * 256 + prompt + K
        frozen, lora = L * (4 * d * d + 3 * d * ff), L * r * (8 * d + 3 * (d + ff))
        llm = (
            T * (4 * frozen + 6 * lora) + 12 * L * d * T * (T + 1) // 2,
            T * 2 * (frozen + lora) + 4 * L * d * T * (T + 1) // 2,
        )
        proj = n * 256 * (4 * (160 * 640 + 640 * 128 + 128 * 128) + 6 * r * (160 + 2 * 640 + 3 * 128))
        dino, siglip = vit(64, 2, 256, 5), vit(96, 2, 384, 0)  # depth 3, the last block is never built
        return dino[0] + siglip[0] + proj + llm[0] + 6 * K * (3 * d * d + d * 14), dino[1] + siglip[1] + llm[1]

    vla = add_lora(VLA.from_pretrained(tiny_dir), rank=r)
    parts = bench.flops_per_sample(vla, n, 20)
    assert (sum(f for f, _ in parts.values()), sum(c for _, c in parts.values())) == hand(20)

    args = bench.get_args(
        [
            "--vla_path",
            tiny_dir,
            "--batch_size",
            "2",
            "--lora_rank",
            str(r),
            "--warmup",
            "1",
            "--iters",
            "1",
            "--peak_tflops",
            "1",
        ]
    )
    row = bench.train_row(args, torch.device("cpu"), ckpt=True)
    name, ms, samples_per_s, memory, tflops, mfu, hfu, gflop_per_sample = row
    model_flops, recomputed = (sum(hand(len(ids))[i] for ids in vla.tokenize(SEEN[:2])) for i in (0, 1))
    assert name == "grad ckpt" and gflop_per_sample == pytest.approx(model_flops / 2e9)
    assert samples_per_s == pytest.approx(2000 / ms) and mfu == pytest.approx(100 * tflops)  # peak 1 TFLOP/s
    assert hfu / mfu == pytest.approx((model_flops + recomputed) / model_flops)
    bench.table("t", ["config"] + ["x"] * 7, [row, ["no grad ckpt", "out of memory"]])
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].startswith("config") and lines[3].startswith("grad ckpt") and "out of memory" in lines[4]


def test_memory_model_matches_a_real_step_and_its_own_extrapolation(monkeypatch):
    """On a tiny twin with 4 blocks per stage (grad ckpt, a state token, augmentation, full attention, FiLM): the
    estimate, extrapolated from fake runs at 1 and 2 blocks, equals a fake run at full depth, and is within 15% of the
    CPU allocator's real peak for the same step."""
    tiny = tiny_config(make_tokenizer())
    for tid in tiny["timm_model_ids"]:
        monkeypatch.setitem(model.VIT, tid, dict(model.VIT[tid], depth=5))  # 4 blocks built
    deep = dict(tiny, text_config=dict(tiny["text_config"], num_hidden_layers=4))
    common = (deep, 2, True, 2, 20, 4, torch.float32)  # batch, grad ckpt, cameras, prompt tokens, LoRA rank, dtype
    options = dict(chunk=8, action_dim=14, proprio_dim=5, image_aug=True, attention="full", film=True)  # as train.py
    assert set(options) == set(model.HEAD_OPTIONS)
    est = bench.estimate_memory(*common, **options)
    direct = bench.estimate_memory(*common, depths=(4, 4, 4), **options)
    assert est["phase"] == direct["phase"] and est["total"] == pytest.approx(direct["total"], rel=0.01)
    assert sum(v for k, v in est.items() if k not in ("total", "phase")) == est["total"]
    real = bench.measured_peak(*common, **options)
    assert abs(est["total"] / real - 1) < 0.15, (est, real)


def test_bench_memory_film(monkeypatch, capsys):
    """--what memory --film: the 7B's FiLM layers are 2 x (4096 + 1) x tower width per block used (23 DINOv2 blocks
    of 1024, 26 SigLIP blocks of 1152); the memory model counts them as trained fp32 weights with AdamW state, and
    every estimate behind the table and the fit table has them (stubbed there: the 7B's take minutes)."""
    n, towers = bench.film_parameters(openvla_7b_config())
    assert towers == [(23, 1024), (26, 1152)] and n == 2 * (4096 + 1) * (23 * 1024 + 26 * 1152) == 438_411_776
    tiny, one = tiny_config(make_tokenizer()), 2 * (128 + 1) * (64 + 96)  # FiLM at one block per tower
    plain, film = (
        bench.estimate_memory(tiny, 1, False, 2, 20, 4, depths=(1, 1, 1), image_aug=True, film=f) for f in (False, True)
    )
    assert film["trainable weights"] - plain["trainable weights"] == 4 * one
    assert 8 * one <= film["AdamW state"] - plain["AdamW state"] < 8 * one + 1024  # 2 moments (+ AdamW's step)
    calls = []

    def estimate(config, batch_size, grad_ckpt, *args, **options):
        calls.append(options)
        return dict(total=(batch_size + 10 * grad_ckpt) * bench.GB, phase="forward")

    monkeypatch.setattr(bench, "estimate_memory", estimate)
    bench.main(["--what", "memory", "--film"])
    out = capsys.readouterr().out
    assert len(calls) == 11 and all(c == dict(image_aug=True, film=True) for c in calls)
    assert "FiLM layers: 438,411,776 parameters = 2 x (4096 + 1) x (23 x 1024 + 26 x 1152)" in out
    assert "1.63 GB in float32, 6.53 GB with their gradients and AdamW state" in out
    assert "batch 8: 8.0 GB without grad ckpt, 18.0 GB with" in out and "LoRA rank 32, FiLM, bf16" in out


def test_fit_table_lines():
    G = bench.GB
    lines = bench.fit_lines([(1, 20.2 * G, 16.9 * G), (8, 49.84 * G, 18.9 * G), (16, 85.6 * G, 73 * G)])
    assert lines[:3] == [
        "batch 1: 20.2 GB without grad ckpt, 16.9 GB with",
        "batch 8: 49.8 GB without grad ckpt, 18.9 GB with",
        "batch 16: 85.6 GB without grad ckpt, 73.0 GB with",
    ]
    assert lines[-4].split() == ["batch", "24", "GB", "40", "GB", "80", "GB"]
    assert lines[-3].split() == ["1", "yes", "yes", "yes"]  # 20.2 x 1.1 = 22.2
    assert lines[-2].split() == ["8", "grad", "ckpt", "grad", "ckpt", "yes"]
    assert lines[-1].split() == ["16", "no", "no", "no"]  # 73 x 1.1 > 80: the margin counts
