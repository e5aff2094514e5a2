"""Tests of model.py on the tiny twin (CPU, well under a minute): python -m pytest -q test_model.py"""
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from PIL import Image
from safetensors.torch import load_file, save_file

from model import (VLA, Block, ViT, add_lora, check_keys, enable_grad_ckpt, load_trained, make_tiny, merge_lora,
                   openvla_7b_config, param_report, save_pretrained, save_trained, skipped_prefixes)

torch.set_num_threads(1)
INSTR = ["pick up the shoe", "Grab the left shoe and put it onto the pad next to the blue mat", "place it"]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return make_tiny(str(tmp_path_factory.mktemp("tiny-openvla")))


def images(b=len(INSTR), n=2, size=224, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, n, 3, size, size), dtype=torch.uint8, generator=g)


def lora_vla(tiny_dir, **kw):
    """The tiny model with LoRA whose B matrices are non-zero, as after some training."""
    torch.manual_seed(0)
    vla = add_lora(VLA.from_pretrained(tiny_dir, **kw), rank=32)
    with torch.no_grad():
        for n, p in vla.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return vla.eval()


def openvla_7b_keys():
    """openvla-7b's state dict as the facts file describes it, written out independently of model.py."""
    keys = {}

    def vit(prefix, w, depth, mlp, prefix_tokens, layer_scale, attn_pool):
        keys[f"{prefix}.patch_embed.proj.weight"], keys[f"{prefix}.patch_embed.proj.bias"] = (w, 3, 14, 14), (w,)
        keys.update({f"{prefix}.{k}": v for k, v in prefix_tokens.items()})
        keys[f"{prefix}.pos_embed"] = (1, 256, w)
        for i in range(depth):
            b = f"{prefix}.blocks.{i}"
            keys.update({f"{b}.norm1.weight": (w,), f"{b}.norm1.bias": (w,), f"{b}.norm2.weight": (w,),
                         f"{b}.norm2.bias": (w,), f"{b}.attn.qkv.weight": (3 * w, w), f"{b}.attn.qkv.bias": (3 * w,),
                         f"{b}.attn.proj.weight": (w, w), f"{b}.attn.proj.bias": (w,),
                         f"{b}.mlp.fc1.weight": (mlp, w), f"{b}.mlp.fc1.bias": (mlp,),
                         f"{b}.mlp.fc2.weight": (w, mlp), f"{b}.mlp.fc2.bias": (w,)})
            if layer_scale:
                keys[f"{b}.ls1.scale_factor"], keys[f"{b}.ls2.scale_factor"] = (w,), (w,)
        keys[f"{prefix}.norm.weight"], keys[f"{prefix}.norm.bias"] = (w,), (w,)
        if attn_pool:
            p = f"{prefix}.attn_pool"
            keys.update({f"{p}.latent": (1, 1, w), f"{p}.q.weight": (w, w), f"{p}.q.bias": (w,),
                         f"{p}.kv.weight": (2 * w, w), f"{p}.kv.bias": (2 * w,), f"{p}.proj.weight": (w, w),
                         f"{p}.proj.bias": (w,), f"{p}.norm.weight": (w,), f"{p}.norm.bias": (w,),
                         f"{p}.mlp.fc1.weight": (mlp, w), f"{p}.mlp.fc1.bias": (mlp,),
                         f"{p}.mlp.fc2.weight": (w, mlp), f"{p}.mlp.fc2.bias": (w,)})

    vit("vision_backbone.featurizer", 1024, 24, 4096,
        {"cls_token": (1, 1, 1024), "reg_token": (1, 4, 1024)}, layer_scale=True, attn_pool=False)
    vit("vision_backbone.fused_featurizer", 1152, 27, 4304, {}, layer_scale=False, attn_pool=True)
    for i, (o, n) in enumerate([(8704, 2176), (4096, 8704), (4096, 4096)], 1):
        keys[f"projector.fc{i}.weight"], keys[f"projector.fc{i}.bias"] = (o, n), (o,)
    lm = "language_model.model"
    keys[f"{lm}.embed_tokens.weight"], keys["language_model.lm_head.weight"] = (32064, 4096), (32064, 4096)
    keys[f"{lm}.norm.weight"] = (4096,)
    for i in range(32):
        b = f"{lm}.layers.{i}"
        keys.update({f"{b}.self_attn.{p}_proj.weight": (4096, 4096) for p in "qkvo"})
        keys.update({f"{b}.mlp.gate_proj.weight": (11008, 4096), f"{b}.mlp.up_proj.weight": (11008, 4096),
                     f"{b}.mlp.down_proj.weight": (4096, 11008), f"{b}.input_layernorm.weight": (4096,),
                     f"{b}.post_attention_layernorm.weight": (4096,)})
    return keys


def test_7b_keys_and_shapes_match_the_checkpoint_except_the_skip_list():
    vla = VLA.from_config(openvla_7b_config(), torch.bfloat16, "meta")  # shapes only, no memory
    head = {k for k in vla.state_dict() if k.startswith(("action_head.", "action_queries"))}
    ckpt = {k: torch.empty(s, dtype=torch.bfloat16, device="meta") for k, s in openvla_7b_keys().items()}
    unused = {k for k in ckpt if k.startswith(("vision_backbone.featurizer.blocks.23.",
                                               "vision_backbone.featurizer.norm.",
                                               "vision_backbone.fused_featurizer.blocks.26.",
                                               "vision_backbone.fused_featurizer.norm.",
                                               "vision_backbone.fused_featurizer.attn_pool."))}
    ours = {k: tuple(v.shape) for k, v in vla.state_dict().items() if k not in head}
    assert ours == {k: tuple(v.shape) for k, v in ckpt.items() if k not in unused}
    assert {k for k in ckpt if k.startswith(tuple(skipped_prefixes(vla.config)))} == unused
    check_keys(vla, ckpt.keys(), "openvla-7b")  # the loader's own check accepts it...
    with pytest.raises(ValueError, match="unexpected keys .*language_model.model.rotary_emb.inv_freq"):
        check_keys(vla, [*ckpt, "language_model.model.rotary_emb.inv_freq"], "openvla-7b")  # ...and nothing more
    result = vla.load_state_dict({k: v for k, v in ckpt.items() if k not in unused}, strict=False, assign=True)
    assert set(result.missing_keys) == head and not result.unexpected_keys  # and no shape mismatch was raised
    assert sum(p.numel() for p in vla.action_head.parameters()) == pytest.approx(50e6, rel=0.02)
    assert vla.llm.model.rotary_emb.inv_freq.dtype == torch.float32


def test_tiny_loads_from_its_directory(tiny_dir):
    assert not os.path.exists(os.path.join(tiny_dir, "action_head.safetensors"))  # a base checkpoint
    vla = VLA.from_pretrained(tiny_dir)
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in vla.parameters())
    ckpt = load_file(os.path.join(tiny_dir, "model.safetensors"))
    assert any(k.startswith("vision_backbone.fused_featurizer.attn_pool.") for k in ckpt)  # the skip list is used
    for k, v in vla.state_dict().items():
        if k in ckpt:
            assert torch.equal(v, ckpt[k]), k
    rope = vla.llm.model.rotary_emb.inv_freq
    hd = vla.llm.config.hidden_size // vla.llm.config.num_attention_heads
    assert torch.allclose(rope, 1.0 / 10000 ** (torch.arange(0, hd, 2).float() / hd))
    ids = vla.tokenize(["Pick up the shoe and place it on the mat"])[0]
    tok = vla.tokenizer
    assert ids[0] == tok.token_to_id("<s>") == 1 and ids[-1] == tok.token_to_id("▁")
    prompt = "In: What action should the robot take to pick up the shoe and place it on the mat?\nOut:"
    assert tok.decode(ids) == prompt + " "  # + the bare "▁"
    assert len(ids) < 30  # words are pieces, not bytes
    pre = json.load(open(os.path.join(tiny_dir, "preprocessor_config.json")))["tvf_normalize_params"]
    assert pre[0]["mean"] == [0.484375, 0.455078125, 0.40625]
    assert pre[0]["std"] == [0.228515625, 0.2236328125, 0.224609375]
    assert pre[1]["mean"] == [0.5] * 3 and pre[1]["std"] == [0.5] * 3


def test_forward_shape_and_bf16(tiny_dir):
    vla = VLA.from_pretrained(tiny_dir)
    out = vla(images(size=256), INSTR)  # 256x256 frames are resized to 224
    assert out.shape == (3, 8, 14) and out.dtype == torch.float32 and out.isfinite().all()
    bf = VLA.from_pretrained(tiny_dir, dtype=torch.bfloat16)
    assert bf.projector.fc1.weight.dtype == torch.bfloat16 and bf.action_head[1].weight.dtype == torch.float32
    assert bf.llm.model.rotary_emb.inv_freq.dtype == torch.float32
    assert bf(images(size=256), INSTR).dtype == torch.float32


def test_embed_images_shape_camera_order_and_preprocessing(tiny_dir):
    vla = VLA.from_pretrained(tiny_dir)
    a, b = images(1, 1, seed=1), images(1, 1, seed=2)
    ea, eb, eab, eba = (vla.embed_images(x) for x in (a, b, torch.cat([a, b], 1), torch.cat([b, a], 1)))
    assert eab.shape == (1, 512, vla.llm.config.hidden_size)
    torch.testing.assert_close(eab, torch.cat([ea, eb], 1))
    torch.testing.assert_close(eba, torch.cat([eb, ea], 1))
    # by hand: per-tower normalization from preprocessor_config.json, DINOv2 channels first, GELU projector
    pre = json.load(open(os.path.join(tiny_dir, "preprocessor_config.json")))["tvf_normalize_params"]
    x = a[:, 0].float() / 255
    feats = [tower((x - torch.tensor(p["mean"]).view(3, 1, 1)) / torch.tensor(p["std"]).view(3, 1, 1))
             for tower, p in zip([vla.vision_backbone.featurizer, vla.vision_backbone.fused_featurizer], pre)]
    assert feats[0].shape == (1, 256, 64) and feats[1].shape == (1, 256, 96)
    p = vla.projector
    torch.testing.assert_close(ea, p.fc3(F.gelu(p.fc2(F.gelu(p.fc1(torch.cat(feats, -1)))))))
    assert vla.embed_images(images(2, 3, size=200)).shape == (2, 768, vla.llm.config.hidden_size)
    # 256x256 frames are squashed to 224 like the reference's PIL bicubic resize (antialiased)
    seen = []
    vla.vision_backbone.featurizer.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    big = images(1, 1, size=256)
    vla.embed_images(big)
    mean, std = (torch.tensor(pre[0][k]).view(3, 1, 1) for k in ("mean", "std"))
    ours = (seen[-1][0] * std + mean) * 255
    pil = Image.fromarray(big[0, 0].permute(1, 2, 0).numpy()).resize((224, 224), Image.BICUBIC)
    assert (ours - torch.tensor(np.asarray(pil)).permute(2, 0, 1)).abs().mean() < 1.0


def test_vit_block_and_tower_by_hand():
    torch.manual_seed(0)
    d, heads, mlp = 8, 2, 16
    block = Block(d, heads, mlp, layer_scale=True).double()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_()
    x = torch.randn(2, 5, d, dtype=torch.float64)

    def ln(t, w, b):
        mu, var = t.mean(-1, keepdim=True), t.var(-1, unbiased=False, keepdim=True)
        return (t - mu) / torch.sqrt(var + 1e-6) * w + b

    sd = {k: v.detach() for k, v in block.state_dict().items()}
    h = ln(x, sd["norm1.weight"], sd["norm1.bias"]) @ sd["attn.qkv.weight"].T + sd["attn.qkv.bias"]
    q, k, v = h[..., :d], h[..., d:2 * d], h[..., 2 * d:]  # rows [q; k; v], heads contiguous
    out = []
    for i in range(heads):
        s = slice(i * d // heads, (i + 1) * d // heads)
        att = torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / math.sqrt(d // heads), -1)
        out.append(att @ v[..., s])
    x1 = x + sd["ls1.scale_factor"] * (torch.cat(out, -1) @ sd["attn.proj.weight"].T + sd["attn.proj.bias"])
    m = ln(x1, sd["norm2.weight"], sd["norm2.bias"]) @ sd["mlp.fc1.weight"].T + sd["mlp.fc1.bias"]
    m = 0.5 * m * (1 + torch.erf(m / math.sqrt(2)))  # exact GELU
    expected = x1 + sd["ls2.scale_factor"] * (m @ sd["mlp.fc2.weight"].T + sd["mlp.fc2.bias"])
    torch.testing.assert_close(block(x), expected)

    # the tower: pos_embed added to the patches, then cls + registers prepended, last block not run, prefix dropped
    spec = dict(width=d, depth=3, heads=heads, mlp=mlp, cls=True, regs=4, layer_scale=True)
    vit = ViT(spec, 28).double()
    with torch.no_grad():
        for p in vit.parameters():
            p.normal_(0, 0.5)
    assert len(vit.blocks) == 2
    img = torch.randn(1, 3, 28, 28, dtype=torch.float64)
    w = vit.patch_embed.proj.weight
    patches = torch.stack([(img[0, :, 14 * r:14 * r + 14, 14 * c:14 * c + 14] * w).sum((1, 2, 3))
                           for r in range(2) for c in range(2)])[None] + vit.patch_embed.proj.bias + vit.pos_embed
    t = torch.cat([vit.cls_token, vit.reg_token, patches], 1)
    torch.testing.assert_close(vit(img), vit.blocks[1](vit.blocks[0](t))[:, 5:])


def test_one_step_trains_only_lora_and_head(tiny_dir):
    torch.manual_seed(0)
    vla = add_lora(VLA.from_pretrained(tiny_dir), rank=32).train()
    cfg = vla.peft_config["default"]
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.init_lora_weights) == (32, 16, 0.0, "gaussian")
    wrapped = {n for n, m in vla.named_modules() if isinstance(m, LoraLayer)}
    assert len(wrapped) == 2 * 2 * 4 + 3 + 2 * 7  # 2 towers x 2 blocks x 4, projector, 2 LLM layers x 7
    assert not any(n.startswith(("action_head", "language_model.lm_head")) for n in wrapped)
    trainable = {n for n, p in vla.named_parameters() if p.requires_grad}
    assert all("lora_" in n or n.startswith(("action_head.", "action_queries")) for n in trainable)
    assert {n for n in trainable if not "lora_" in n} == {n for n, _ in vla.named_parameters()
                                                          if n.startswith(("action_head.", "action_queries"))}
    assert [n for n, p in vla.named_parameters() if p.requires_grad] == \
        [n for n, p in add_lora(VLA.from_pretrained(tiny_dir)).named_parameters() if p.requires_grad]  # same order
    frozen = {n: p.detach().clone() for n, p in vla.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in vla.parameters() if p.requires_grad], lr=1e-3)
    x, target = images(2), torch.randn(2, 8, 14)
    out0 = vla(x, INSTR[:2])
    (out0 - target).abs().mean().backward()
    for n, p in vla.named_parameters():
        assert (p.grad is not None) == (n in trainable), n
    # lora_B starts at zero, so lora_A has no gradient until B has moved: after one step every gradient is non-zero
    opt.step()
    opt.zero_grad()
    out1 = vla(x, INSTR[:2])
    (out1 - target).abs().mean().backward()
    assert [n for n, p in vla.named_parameters() if n in trainable and not p.grad.abs().sum() > 0] == []
    assert not torch.equal(out0, out1)
    for n, p in vla.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert "trainable" in param_report(vla)


def test_grad_ckpt_gives_the_same_gradients(tiny_dir):
    def grads(ckpt):
        vla = lora_vla(tiny_dir).train()
        if ckpt:
            enable_grad_ckpt(vla)
        vla(images(1), INSTR[:1]).square().sum().backward()
        return {n: p.grad for n, p in vla.named_parameters() if p.requires_grad}
    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys()
    for n in plain:
        torch.testing.assert_close(plain[n], ckpt[n], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_batched_equals_one_by_one(tiny_dir, bidirectional):
    vla = VLA.from_pretrained(tiny_dir, bidirectional=bidirectional)
    assert len({len(t) for t in vla.tokenize(INSTR)}) == 3
    x = images()
    batched = vla(x, INSTR)
    single = torch.cat([vla(x[i:i + 1], INSTR[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-4)
    swapped = vla(x[[0, 0]], [INSTR[0], INSTR[1]])  # same image, another prompt: the prompt matters
    assert (swapped[0] - swapped[1]).abs().max() > 1e-3


def test_bidirectional_and_causal_differ(tiny_dir):
    vla = VLA.from_pretrained(tiny_dir)
    x, queries = images(2), vla.action_queries.detach().clone()

    def run(bidirectional, bump):  # bump the last action query and see which chunk steps notice
        vla.bidirectional = bidirectional
        with torch.no_grad():
            vla.action_queries.copy_(queries)
            vla.action_queries[-1] += bump
            return vla(x, INSTR[:2])
    c0, c1, b0, b1 = run(False, 0.0), run(False, 1.0), run(True, 0.0), run(True, 1.0)
    torch.testing.assert_close(c0[:, :-1], c1[:, :-1], atol=1e-6, rtol=0)  # causal: earlier queries never see it
    assert (b0[:, :-1] - b1[:, :-1]).abs().amax((0, 2)).min() > 1e-4  # bidirectional: every query sees it
    assert (c0 - b0)[:, 0].abs().max() > 1e-3
    one = VLA.from_pretrained(tiny_dir, chunk=1)  # one query: the same either way, as nothing else sees it
    causal = one(x, INSTR[:2])
    one.bidirectional = True
    torch.testing.assert_close(one(x, INSTR[:2]), causal, atol=1e-6, rtol=1e-5)


def test_save_and_load_trained_reproduce_outputs(tiny_dir, tmp_path):
    vla = lora_vla(tiny_dir, chunk=4, action_dim=7, bidirectional=True)
    x = images(2)
    out = vla(x, INSTR[:2])
    save_trained(vla, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["action_head.safetensors", "adapter_config.json",
                                            "adapter_model.safetensors"]
    assert all(k.startswith("base_model.model.") for k in load_file(tmp_path / "adapter_model.safetensors"))
    fresh = VLA.from_pretrained(tiny_dir)  # default chunk 8 x 14, causal: the head's config wins
    assert not hasattr(fresh, "peft_config")
    load_trained(fresh, str(tmp_path))
    assert (fresh.chunk, fresh.action_dim, fresh.bidirectional) == (4, 7, True)
    assert torch.equal(fresh.eval()(x, INSTR[:2]), out)
    again = add_lora(VLA.from_pretrained(tiny_dir, chunk=4, action_dim=7))  # resume: LoRA already injected
    assert torch.equal(load_trained(again, str(tmp_path)).eval()(x, INSTR[:2]), out)


def test_merge_matches_lora_and_export_reloads(tiny_dir, tmp_path):
    vla = lora_vla(tiny_dir)
    x = images(2)
    out = vla(x, INSTR[:2])
    with pytest.raises(ValueError, match="merge_lora"):
        save_pretrained(vla, str(tmp_path / "export"))
    merge_lora(vla)
    assert not any(isinstance(m, LoraLayer) for m in vla.modules())
    assert set(vla.state_dict()) == set(VLA.from_pretrained(tiny_dir).state_dict())
    merged = vla(x, INSTR[:2])
    torch.testing.assert_close(merged, out, atol=1e-5, rtol=1e-4)
    assert (merged - VLA.from_pretrained(tiny_dir)(x, INSTR[:2])).abs().max() > 1e-3  # LoRA changed something
    save_pretrained(vla, str(tmp_path / "export"), max_shard_bytes=1 << 20)  # several shards + index
    assert os.path.exists(tmp_path / "export" / "model.safetensors.index.json")
    torch.testing.assert_close(VLA.from_pretrained(str(tmp_path / "export"))(x, INSTR[:2]), merged, atol=0, rtol=0)


def test_merge_cli(tiny_dir, tmp_path):
    import subprocess
    import sys
    vla = lora_vla(tiny_dir)
    save_trained(vla, str(tmp_path / "ckpt"))
    for f in ("dataset_statistics.json", "args.json"):
        json.dump({"x": 1}, open(tmp_path / "ckpt" / f, "w"))
    merge_lora(vla)
    cmd = [sys.executable, "model.py", "--merge", str(tmp_path / "ckpt"), "--base", tiny_dir,
           "--out", str(tmp_path / "out"), "--device", "cpu", "--dtype", "float32"]
    subprocess.run(cmd, check=True, cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert {"dataset_statistics.json", "args.json", "config.json"} <= set(os.listdir(tmp_path / "out"))
    assert "adapter_config.json" not in os.listdir(tmp_path / "out")
    x = images(2)
    torch.testing.assert_close(VLA.from_pretrained(str(tmp_path / "out"))(x, INSTR[:2]), vla(x, INSTR[:2]))


def test_broken_checkpoints_give_clear_errors(tiny_dir, tmp_path, monkeypatch):
    def copy(name):
        return shutil.copytree(tiny_dir, tmp_path / name)

    d = copy("corrupt")
    with open(d / "model.safetensors", "r+b") as f:
        f.truncate(os.path.getsize(d / "model.safetensors") // 2)
    with pytest.raises(ValueError, match="corrupt safetensors file .*model.safetensors"):
        VLA.from_pretrained(str(d))

    d = tmp_path / "sharded"
    save_pretrained(VLA.from_pretrained(tiny_dir), str(d), max_shard_bytes=1 << 20)
    shard = sorted(set(json.load(open(d / "model.safetensors.index.json"))["weight_map"].values()))[1]
    os.remove(d / shard)
    with pytest.raises(FileNotFoundError, match=f"missing .*{shard}"):
        VLA.from_pretrained(str(d))

    for name, edit, match in [
            ("missing-key", lambda sd: sd.pop("projector.fc2.bias"), r"missing keys \[projector.fc2.bias\]"),
            ("extra-key", lambda sd: sd.update(extra=torch.zeros(1)), r"unexpected keys \[extra\]")]:
        d = copy(name)
        sd = load_file(d / "model.safetensors")
        edit(sd)
        save_file(sd, d / "model.safetensors")
        with pytest.raises(ValueError, match=match):
            VLA.from_pretrained(str(d))

    d = copy("no-config")
    os.remove(d / "config.json")
    with pytest.raises(FileNotFoundError, match="missing .*config.json"):
        VLA.from_pretrained(str(d))
    (d / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt .*config.json"):
        VLA.from_pretrained(str(d))
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        VLA.from_pretrained(str(tmp_path / "nowhere"))

    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    with pytest.raises(RuntimeError, match="offline.*--vla_path"):
        VLA.from_pretrained("openvla/openvla-7b")

    vla = lora_vla(tiny_dir)
    save_trained(vla, str(tmp_path / "ckpt"))
    with open(tmp_path / "ckpt" / "action_head.safetensors", "r+b") as f:
        f.write(b"\xff" * 16)
    with pytest.raises(ValueError, match="corrupt safetensors file .*action_head.safetensors"):
        load_trained(VLA.from_pretrained(tiny_dir), str(tmp_path / "ckpt"))
    os.remove(tmp_path / "ckpt" / "adapter_model.safetensors")
    with pytest.raises(FileNotFoundError, match="missing .*adapter_model.safetensors"):
        load_trained(VLA.from_pretrained(tiny_dir), str(tmp_path / "ckpt"))
    os.remove(tmp_path / "ckpt" / "adapter_config.json")
    with pytest.raises(FileNotFoundError, match="missing .*adapter_config.json"):
        load_trained(VLA.from_pretrained(tiny_dir), str(tmp_path / "ckpt"))
