"""
model.py: the VLA against the 7B checkpoint's keys and independent reference implementations (PIL's resize, TF's
colour ops, timm's ViT block, OFT's FiLM), LoRA training, saving and loading, and broken checkpoints.
"""

import json
import math
import os
import shutil

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from PIL import Image
from safetensors.torch import load_file, save_file

import data
import model
from demo import openvla_7b_config, param_report
from helpers import INSTR, images, lora_vla, pil_resized, tower_input
from merge import save_pretrained
from model import (
    VLA,
    Block,
    ViT,
    add_lora,
    check_keys,
    enable_grad_ckpt,
    load_trained,
    save_trained,
    skipped_prefixes,
)


def openvla_7b_keys():
    """openvla-7b's state dict as the facts file describes it, written out independently of model.py."""
    keys = {}

    def vit(prefix, w, depth, mlp, prefix_tokens, layer_scale, attn_pool):
        keys[f"{prefix}.patch_embed.proj.weight"], keys[f"{prefix}.patch_embed.proj.bias"] = (w, 3, 14, 14), (w,)
        keys.update({f"{prefix}.{k}": v for k, v in prefix_tokens.items()})
        keys[f"{prefix}.pos_embed"] = (1, 256, w)
        for i in range(depth):
            b = f"{prefix}.blocks.{i}"
            keys.update(
                {
                    f"{b}.norm1.weight": (w,),
                    f"{b}.norm1.bias": (w,),
                    f"{b}.norm2.weight": (w,),
                    f"{b}.norm2.bias": (w,),
                    f"{b}.attn.qkv.weight": (3 * w, w),
                    f"{b}.attn.qkv.bias": (3 * w,),
                    f"{b}.attn.proj.weight": (w, w),
                    f"{b}.attn.proj.bias": (w,),
                    f"{b}.mlp.fc1.weight": (mlp, w),
                    f"{b}.mlp.fc1.bias": (mlp,),
                    f"{b}.mlp.fc2.weight": (w, mlp),
                    f"{b}.mlp.fc2.bias": (w,),
                }
            )
            if layer_scale:
                keys[f"{b}.ls1.scale_factor"], keys[f"{b}.ls2.scale_factor"] = (w,), (w,)
        keys[f"{prefix}.norm.weight"], keys[f"{prefix}.norm.bias"] = (w,), (w,)
        if attn_pool:
            p = f"{prefix}.attn_pool"
            keys.update(
                {
                    f"{p}.latent": (1, 1, w),
                    f"{p}.q.weight": (w, w),
                    f"{p}.q.bias": (w,),
                    f"{p}.kv.weight": (2 * w, w),
                    f"{p}.kv.bias": (2 * w,),
                    f"{p}.proj.weight": (w, w),
                    f"{p}.proj.bias": (w,),
                    f"{p}.norm.weight": (w,),
                    f"{p}.norm.bias": (w,),
                    f"{p}.mlp.fc1.weight": (mlp, w),
                    f"{p}.mlp.fc1.bias": (mlp,),
                    f"{p}.mlp.fc2.weight": (w, mlp),
                    f"{p}.mlp.fc2.bias": (w,),
                }
            )

    vit(
        "vision_backbone.featurizer",
        1024,
        24,
        4096,
        {"cls_token": (1, 1, 1024), "reg_token": (1, 4, 1024)},
        layer_scale=True,
        attn_pool=False,
    )
    vit("vision_backbone.fused_featurizer", 1152, 27, 4304, {}, layer_scale=False, attn_pool=True)
    for i, (o, n) in enumerate([(8704, 2176), (4096, 8704), (4096, 4096)], 1):
        keys[f"projector.fc{i}.weight"], keys[f"projector.fc{i}.bias"] = (o, n), (o,)
    lm = "language_model.model"
    keys[f"{lm}.embed_tokens.weight"], keys["language_model.lm_head.weight"] = (32064, 4096), (32064, 4096)
    keys[f"{lm}.norm.weight"] = (4096,)
    for i in range(32):
        b = f"{lm}.layers.{i}"
        keys.update({f"{b}.self_attn.{p}_proj.weight": (4096, 4096) for p in "qkvo"})
        keys.update(
            {
                f"{b}.mlp.gate_proj.weight": (11008, 4096),
                f"{b}.mlp.up_proj.weight": (11008, 4096),
                f"{b}.mlp.down_proj.weight": (4096, 11008),
                f"{b}.input_layernorm.weight": (4096,),
                f"{b}.post_attention_layernorm.weight": (4096,),
            }
        )
    return keys


def test_7b_keys_and_shapes_match_the_checkpoint_except_the_skip_list():
    vla = VLA.from_config(openvla_7b_config(), torch.bfloat16, "meta")  # shapes only, no memory
    head = {k for k in vla.state_dict() if k.startswith(("action_head.", "action_queries"))}
    ckpt = {k: torch.empty(s, dtype=torch.bfloat16, device="meta") for k, s in openvla_7b_keys().items()}
    unused = {
        k
        for k in ckpt
        if k.startswith(
            (
                "vision_backbone.featurizer.blocks.23.",
                "vision_backbone.featurizer.norm.",
                "vision_backbone.fused_featurizer.blocks.26.",
                "vision_backbone.fused_featurizer.norm.",
                "vision_backbone.fused_featurizer.attn_pool.",
            )
        )
    }
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


@pytest.mark.parametrize("cameras, proprio_dim, chunk", [(1, 0, 8), (3, 5, 2)])
def test_sequence_length_is_what_forward_builds(tiny_dir, cameras, proprio_dim, chunk):
    vla = VLA.from_pretrained(tiny_dir, proprio_dim=proprio_dim, chunk=chunk)
    lengths = []
    vla.llm.model.register_forward_pre_hook(
        lambda m, a, k: lengths.append(k["inputs_embeds"].shape[1]), with_kwargs=True
    )
    for text in ["pick it", "Put the red sneaker onto the green mat, then let go of it."]:
        vla(images(b=1, n=cameras, size=64), [text], torch.zeros(1, proprio_dim) if proprio_dim else None)
        assert lengths[-1] == model.check_sequence_length(vla.config, vla.tokenizer, text, cameras, proprio_dim, chunk)
    assert model.max_positions(vla.config) == vla.llm.config.max_position_embeddings == 2048  # Llama-2's default
    n = lengths[-1]
    for limit in (n, n - 1):  # the limit comes from the config, and a sequence of exactly the limit fits
        config = vla.config | {"text_config": vla.config["text_config"] | {"max_position_embeddings": limit}}

        def check():
            return model.check_sequence_length(config, vla.tokenizer, text, cameras, proprio_dim, chunk)

        if limit == n:
            assert check() == n
        else:
            with pytest.raises(ValueError, match=f"too long: .* = {n} positions, more than the LLM's {n - 1}$"):
                check()


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
    feats = [
        tower((x - torch.tensor(p["mean"]).view(3, 1, 1)) / torch.tensor(p["std"]).view(3, 1, 1))
        for tower, p in zip([vla.vision_backbone.featurizer, vla.vision_backbone.fused_featurizer], pre)
    ]
    assert feats[0].shape == (1, 256, 64) and feats[1].shape == (1, 256, 96)
    p = vla.projector
    torch.testing.assert_close(ea, p.fc3(F.gelu(p.fc2(F.gelu(p.fc1(torch.cat(feats, -1)))))))
    assert vla.embed_images(images(2, 3, size=200)).shape == (2, 768, vla.llm.config.hidden_size)
    # 256x256 frames are squashed to 224 exactly as the reference's PIL bicubic resize does it
    big = images(1, 1, size=256)
    assert torch.equal(tower_input(vla, big)[0].round(), pil_resized(big[0, 0]))


@pytest.mark.parametrize("height, width", [(256, 256), (240, 320)])
def test_resize_is_pils_bicubic_bit_for_bit(demo, height, width):
    """OpenVLA's processor resizes PIL images: the batched resize must give PIL's levels on camera-like scenes, noisy
    ones and pure noise (the bound asked for is <= 1 level on <= 1% of pixels; it is exact)."""
    with h5py.File(demo[0]) as f:
        scene = np.asarray(Image.fromarray(f["head_camera_image"][60]).resize((width, height), Image.BICUBIC))
    rng = np.random.default_rng(0)
    frames = np.stack(
        [
            scene,
            np.clip(scene + rng.normal(0, 12, scene.shape), 0, 255).astype(np.uint8),
            rng.integers(0, 256, scene.shape, dtype=np.uint8),
        ]
    )
    frames = torch.from_numpy(frames).permute(0, 3, 1, 2)
    ours = model.resize_like_pil(frames, 224)
    assert torch.equal(ours, torch.stack([pil_resized(f) for f in frames]))
    square = images(2, 1)[:, 0]  # already 224x224: untouched
    assert torch.equal(model.resize_like_pil(square, 224), square.float())


def test_jitter_matches_tf_ops_computed_with_colorsys():
    """OFT's colour augmentation (TF's adjust_brightness/contrast/saturation/hue, each clipped) against a per-pixel
    reference written with Python's colorsys."""
    import colorsys

    g = torch.Generator().manual_seed(0)
    x, u = torch.rand(3, 3, 5, 6, generator=g), torch.rand(3, 4, generator=g)
    ours = model.jitter(x, u)
    for i in range(3):
        b, c, s, h = ((2 * u[i] - 1) * torch.tensor([0.2, 0.2, 0.2, 0.05])).tolist()
        y = np.clip(x[i].numpy().astype(np.float64) + b, 0, 1)
        y = np.clip((y - y.mean((1, 2), keepdims=True)) * (1 + c) + y.mean((1, 2), keepdims=True), 0, 1)
        for r, col in np.ndindex(y.shape[1:]):
            hh, ss, vv = colorsys.rgb_to_hsv(*y[:, r, col])
            y[:, r, col] = colorsys.hsv_to_rgb((hh + h) % 1, min(ss * (1 + s), 1.0), vv)
        np.testing.assert_allclose(ours[i].numpy(), y, atol=2e-6)
    torch.testing.assert_close(model.jitter(x, torch.full((3, 4), 0.5)), x, atol=2e-6, rtol=0)  # strength 0


def test_augmentation_is_seeded_per_sample_and_train_only(tiny_dir, demo):
    train, again, other = (data.EpisodeDataset(demo[:2], image_aug=True, seed=s) for s in (3, 3, 4))
    assert "aug" not in data.EpisodeDataset(demo[:2])[5]  # validation sets draw nothing
    batch, same, different = (torch.utils.data.default_collate([d[i] for i in (5, 90)]) for d in (train, again, other))
    assert batch["aug"].shape == (2, 2, 6) and torch.equal(batch["aug"], same["aug"])
    assert not torch.equal(batch["aug"], different["aug"]) and not torch.equal(batch["aug"][:, 0], batch["aug"][:, 1])
    vla = VLA.from_pretrained(tiny_dir, image_aug=True).train()
    x = batch["images"]
    augmented = tower_input(vla, x, batch["aug"])
    assert torch.equal(augmented, tower_input(vla, x, same["aug"]))  # same seed, same augmented batch
    centre = tower_input(vla, x)  # no draws (evaluation, deployment): the centre crop, never random
    assert torch.equal(centre, tower_input(vla.eval(), x))
    assert ((augmented - centre).abs().flatten(1).mean(1) > 3).all()  # every camera of every sample changed
    # the centre crop is PIL's crop + resize of the frame's middle 90% of the area
    lo, hi = (1 - 0.9**0.5) / 2 * 256, (1 + 0.9**0.5) / 2 * 256
    assert torch.equal(centre.round(), torch.stack([pil_resized(f, (lo, lo, hi, hi)) for f in x.flatten(0, 1)]))
    assert not torch.equal(centre.round(), torch.stack([pil_resized(f) for f in x.flatten(0, 1)]))


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
    q, k, v = h[..., :d], h[..., d : 2 * d], h[..., 2 * d :]  # rows [q; k; v], heads contiguous
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
    patches = (
        torch.stack(
            [
                (img[0, :, 14 * r : 14 * r + 14, 14 * c : 14 * c + 14] * w).sum((1, 2, 3))
                for r in range(2)
                for c in range(2)
            ]
        )[None]
        + vit.patch_embed.proj.bias
        + vit.pos_embed
    )
    t = torch.cat([vit.cls_token, vit.reg_token, patches], 1)
    torch.testing.assert_close(vit(img), vit.blocks[1](vit.blocks[0](t))[:, 5:])


def timm_film_block(sd, x, heads, gamma, beta):
    """timm's ViT Block.forward (fused qkv, softmax attention, exact GELU) wrapped as OpenVLA-OFT's
    FiLMedVisionTransformerBlock: x * (1 + gamma) + beta between the attention and the MLP residuals."""
    B, T, d = x.shape

    def ls(name, t):
        return t * sd[f"{name}.scale_factor"] if f"{name}.scale_factor" in sd else t

    qkv = (
        F.linear(
            F.layer_norm(x, (d,), sd["norm1.weight"], sd["norm1.bias"], 1e-6),
            sd["attn.qkv.weight"],
            sd["attn.qkv.bias"],
        )
        .reshape(B, T, 3, heads, d // heads)
        .permute(2, 0, 3, 1, 4)
    )
    q, k, v = qkv.unbind(0)
    attn = ((q * (d // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
    a = (attn @ v).transpose(1, 2).reshape(B, T, d)
    x = x + ls("ls1", F.linear(a, sd["attn.proj.weight"], sd["attn.proj.bias"]))
    x = x * (1 + gamma.view(B, 1, d)) + beta.view(B, 1, d)
    m = F.linear(
        F.layer_norm(x, (d,), sd["norm2.weight"], sd["norm2.bias"], 1e-6), sd["mlp.fc1.weight"], sd["mlp.fc1.bias"]
    )
    return x + ls("ls2", F.linear(F.gelu(m), sd["mlp.fc2.weight"], sd["mlp.fc2.bias"]))


def tower_outputs(vla, x, instructions):
    """What each tower receives and gives in vla(x, instructions): {tower name: (pixels, features)}."""
    seen, hooks = (
        {},
        [
            t.register_forward_hook(lambda m, args, out, name=name: seen.update({name: (args[0], out)}))
            for name, t in vla.vision_backbone.items()
        ],
    )
    with torch.no_grad():
        vla(x, instructions)
    for h in hooks:
        h.remove()
    return seen


def test_film_is_ofts_formula_on_each_samples_prompt_and_listens_to_it(tiny_dir):
    """--film against an independent implementation: timm-style blocks with OFT's FiLM, the same weights (read by
    their names film_layers.{tower}.{block}), e = OFT's language vector: the mean input embedding of every non-action
    token of its LLM input, i.e. each sample's own prompt (BOS, prompt, "▁") and the stop token </s>, taken row by
    row, so the batch's padding cannot enter. Then: another instruction, other image features."""
    torch.manual_seed(0)
    vla = VLA.from_pretrained(tiny_dir, film=True).eval()
    x, tok = images(3, 2), vla.tokenizer
    assert len({len(t) for t in vla.tokenize(INSTR)}) == 3  # the two shorter prompts are padded in the batch
    table, sd = vla.llm.model.embed_tokens.weight.detach(), vla.state_dict()
    stop = tok.token_to_id("</s>")
    assert stop is not None and stop not in model.prompt_ids(tok, INSTR[0])
    per_sample = torch.stack([table[model.prompt_ids(tok, s) + [stop]].mean(0) for s in INSTR])
    # the model's own language vector, from the batch's right-padded embeddings, is that formula
    ids = vla.tokenize(INSTR)
    n, T = torch.tensor([len(t) for t in ids]), max(len(t) for t in ids)
    padded = torch.tensor([t + [vla.config["pad_token_id"]] * (T - len(t)) for t in ids])
    with torch.no_grad():
        torch.testing.assert_close(vla.language_vector(vla.llm.model.embed_tokens(padded), n), per_sample)
    without_stop = torch.stack([table[model.prompt_ids(tok, s)].mean(0) for s in INSTR])
    assert (per_sample - without_stop).abs().max() > 1e-3  # </s> counts: the formula is not the prompt's mean
    e = per_sample.repeat_interleave(2, 0)  # per camera
    seen = tower_outputs(vla, x, INSTR)
    for name, tid in zip(model.TOWERS, vla.config["timm_model_ids"]):
        (pixels, out), tower, spec = seen[name], vla.vision_backbone[name], model.VIT[tid]
        h = F.conv2d(pixels, tower.patch_embed.proj.weight, tower.patch_embed.proj.bias, stride=14)
        h = h.flatten(2).transpose(1, 2) + tower.pos_embed
        prefix = [t.expand(len(h), -1, -1) for t in (tower.cls_token, tower.reg_token) if t is not None]
        h = torch.cat(prefix + [h], 1)
        for i in range(spec["depth"] - 1):  # features from the second-to-last block: those are FiLMed
            block = {
                k[len(f"vision_backbone.{name}.blocks.{i}.") :]: v
                for k, v in sd.items()
                if k.startswith(f"vision_backbone.{name}.blocks.{i}.")
            }

            def film(part):
                return F.linear(
                    e, sd[f"film_layers.{name}.{i}.{part}.weight"], sd[f"film_layers.{name}.{i}.{part}.bias"]
                )

            h = timm_film_block(block, h, spec["heads"], film("scale"), film("shift"))
        expected = h[:, spec["regs"] + spec["cls"] :]
        assert (out - expected).abs().max() < 1e-5, name
    assert sorted(k for k in sd if k.startswith("film_layers.")) == sorted(
        f"film_layers.{t}.{i}.{p}.{w}"
        for t in model.TOWERS
        for i in range(2)
        for p in ("scale", "shift")
        for w in ("weight", "bias")
    )
    # only the instruction changes: with FiLM the features follow it, without they cannot
    other = ["place it", "pick up the shoe", INSTR[2]]  # and a shorter batch: sample 2 sees other padding
    for film, vla in [(True, vla), (False, VLA.from_pretrained(tiny_dir).eval())]:
        a, b = tower_outputs(vla, x, INSTR), tower_outputs(vla, x, other)
        for name in model.TOWERS:
            diff = (a[name][1] - b[name][1]).abs().amax((1, 2))  # per image: samples 0 and 1 changed, sample 2 not
            assert (diff[:4].min() > 1e-3) if film else diff.max() == 0, (film, name, diff)
            assert diff[4:].max() == 0


@pytest.mark.parametrize("proprio_dim, film", [(0, False), (5, True)])
def test_one_step_trains_only_lora_and_head(tiny_dir, proprio_dim, film):
    torch.manual_seed(0)
    vla = add_lora(VLA.from_pretrained(tiny_dir, proprio_dim=proprio_dim, film=film), rank=32).train()
    cfg = vla.peft_config["default"]
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.init_lora_weights) == (32, 16, 0.0, "gaussian")
    wrapped = {n for n, m in vla.named_modules() if isinstance(m, LoraLayer)}
    assert len(wrapped) == 2 * 2 * 4 + 3 + 2 * 7  # 2 towers x 2 blocks x 4, projector, 2 LLM layers x 7
    assert not any(n.startswith(("action_head", "language_model.lm_head", "film_layers")) for n in wrapped)
    trainable = {n for n, p in vla.named_parameters() if p.requires_grad}
    head = ("action_head.", "action_queries", "proprio_projector.", "film_layers.")
    assert all("lora_" in n or n.startswith(head) for n in trainable)
    fully = {n for n, p in vla.named_parameters() if n.startswith(head)}
    assert {n for n in trainable if "lora_" not in n} == fully and all(
        vla.get_parameter(n).dtype == torch.float32 for n in fully
    )
    assert len([n for n in fully if n.startswith("proprio_projector.")]) == 4 * (proprio_dim > 0)  # 2 Linear layers
    assert len([n for n in fully if n.startswith("film_layers.")]) == 16 * film  # 2 towers x 2 blocks x 2 Linear
    assert [n for n, p in vla.named_parameters() if p.requires_grad] == [
        n
        for n, p in add_lora(VLA.from_pretrained(tiny_dir, proprio_dim=proprio_dim, film=film)).named_parameters()
        if p.requires_grad
    ]
    frozen = {n: p.detach().clone() for n, p in vla.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in vla.parameters() if p.requires_grad], lr=1e-3)
    x, target, state = images(2), torch.randn(2, 8, 14), torch.rand(2, proprio_dim) * 2 - 1
    out0 = vla(x, INSTR[:2], state)
    (out0 - target).abs().mean().backward()
    for n, p in vla.named_parameters():
        assert (p.grad is not None) == (n in trainable), n
    # lora_B starts at zero, so lora_A has no gradient until B has moved: after one step every gradient is non-zero
    opt.step()
    opt.zero_grad()
    out1 = vla(x, INSTR[:2], state)
    (out1 - target).abs().mean().backward()
    assert [n for n, p in vla.named_parameters() if n in trainable and not p.grad.abs().sum() > 0] == []
    assert not torch.equal(out0, out1)
    if proprio_dim:  # the state token is read: another state, another chunk; none at all is refused
        assert (vla(x, INSTR[:2], state.flip(0)) - out1).abs().max() > 1e-3
        with pytest.raises(ValueError, match="trained with proprioception: pass state"):
            vla(x, INSTR[:2])
    for n, p in vla.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert "trainable" in param_report(vla)


@pytest.mark.parametrize("film", [False, True])
def test_grad_ckpt_gives_the_same_gradients(tiny_dir, film):
    def grads(ckpt):
        vla = lora_vla(tiny_dir, film=film).train()
        if ckpt:
            enable_grad_ckpt(vla)
        vla(images(1), INSTR[:1]).square().sum().backward()
        return {n: p.grad for n, p in vla.named_parameters() if p.requires_grad}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys() and sum(n.startswith("film_layers.") for n in plain) == 16 * film
    for n in plain:
        torch.testing.assert_close(plain[n], ckpt[n], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("attention", model.ATTENTION)
def test_batched_equals_one_by_one(tiny_dir, attention):
    vla = VLA.from_pretrained(tiny_dir, attention=attention)
    assert len({len(t) for t in vla.tokenize(INSTR)}) == 3
    x = images()
    batched = vla(x, INSTR)
    single = torch.cat([vla(x[i : i + 1], INSTR[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-4)
    swapped = vla(x[[0, 0]], [INSTR[0], INSTR[1]])  # same image, another prompt: the prompt matters
    assert (swapped[0] - swapped[1]).abs().max() > 1e-3


def test_attention_modes_differ_and_never_see_padding(tiny_dir):
    vla = VLA.from_pretrained(tiny_dir)
    x, queries = images(2), vla.action_queries.detach().clone()

    def run(attention, bump):  # bump the last action query and see which chunk steps notice
        vla.attention = attention
        with torch.no_grad():
            vla.action_queries.copy_(queries)
            vla.action_queries[-1] += bump
            return vla(x, INSTR[:2])

    assert model.ATTENTION == ("causal", "full")
    out = {(a, bump): run(a, bump) for a in model.ATTENTION for bump in (0.0, 1.0)}
    c0, c1 = out["causal", 0.0], out["causal", 1.0]
    torch.testing.assert_close(c0[:, :-1], c1[:, :-1], atol=1e-6, rtol=0)  # causal: earlier queries never see it
    f0, f1 = out["full", 0.0], out["full", 1.0]
    assert (f0[:, :-1] - f1[:, :-1]).abs().amax((0, 2)).min() > 1e-4  # full: every query sees it
    assert (c0 - f0)[:, 0].abs().max() > 1e-3
    with pytest.raises(ValueError, match="^attention must be one of causal, full, got 'queries'$"):
        VLA.from_pretrained(tiny_dir, attention="queries")
    # right padding: the shorter prompts' rows hold pads; no mode may let a real token read them
    x3, pad = images(), vla.config["pad_token_id"]
    for a in model.ATTENTION:
        vla.attention = a
        with torch.no_grad():
            vla.action_queries.copy_(queries)
            before = vla(x3, INSTR)
            vla.llm.model.embed_tokens.weight[pad] += 5.0
            after = vla(x3, INSTR)
            vla.llm.model.embed_tokens.weight[pad] -= 5.0
        assert torch.equal(before, after), a


def test_save_and_load_trained_reproduce_outputs(tiny_dir, tmp_path):
    vla = lora_vla(tiny_dir, chunk=4, action_dim=7, attention="full", proprio_dim=3, image_aug=True, film=True)
    x, state = images(2), torch.rand(2, 3) * 2 - 1
    out = vla(x, INSTR[:2], state)
    save_trained(vla, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [
        "action_head.safetensors",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert all(k.startswith("base_model.model.") for k in load_file(tmp_path / "adapter_model.safetensors"))
    fresh = VLA.from_pretrained(tiny_dir)  # default chunk 8 x 14, causal, no state, no FiLM: the head's config wins
    assert not hasattr(fresh, "peft_config")
    load_trained(fresh, str(tmp_path))
    assert (fresh.chunk, fresh.action_dim, fresh.attention, fresh.proprio_dim, fresh.image_aug, fresh.film) == (
        4,
        7,
        "full",
        3,
        True,
        True,
    )
    assert torch.equal(fresh.eval()(x, INSTR[:2], state), out)
    again = add_lora(VLA.from_pretrained(tiny_dir, chunk=4, action_dim=7, proprio_dim=3, film=True))  # resume
    assert torch.equal(load_trained(again, str(tmp_path)).eval()(x, INSTR[:2], state), out)
    # a head file without the options it was trained with is refused by name, never loaded with guessed ones
    head, old = str(tmp_path / "bare_head.safetensors"), lora_vla(tiny_dir, chunk=4, action_dim=7)
    save_file({k: v.contiguous() for k, v in old.state_dict().items() if k.startswith(model.HEAD)}, head)
    with pytest.raises(ValueError, match="bare_head.safetensors: no action-head config in its metadata"):
        model.load_head(fresh, head)


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
        ("extra-key", lambda sd: sd.update(extra=torch.zeros(1)), r"unexpected keys \[extra\]"),
    ]:
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


def test_trained_base_is_as_recorded_or_relative_to_the_checkpoint(tmp_path, monkeypatch):
    """args.json's vla_path: an absolute path (what train.py records for a directory) and a hub id are used as given;
    a relative one (a policy shipped inside a repository beside its base) is relative to the checkpoint's own
    directory, whatever the working directory."""
    repo = tmp_path / "repo"
    ckpt = repo / "policies" / "shoe" / "step_000100"
    ckpt.mkdir(parents=True)
    (repo / "base").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert model.trained_base(str(ckpt), {"vla_path": "/models/openvla-7b"}) == "/models/openvla-7b"
    assert model.trained_base(str(ckpt), {"vla_path": "openvla/openvla-7b"}) == "openvla/openvla-7b"
    home = os.path.expanduser("~")
    assert model.trained_base(str(ckpt), {"vla_path": "~/models/openvla-7b"}) == f"{home}/models/openvla-7b"
    for relative in ("../../../base", "./../../../base", "../../../base/"):
        assert model.trained_base(str(ckpt), {"vla_path": relative}) == str(repo / "base"), relative
    assert model.trained_base(str(ckpt), {"vla_path": "base"}) == str(ckpt / "base")  # one name: a directory there
    # the checkpoint named relative to the working directory: the base is found from there too
    monkeypatch.chdir(repo)
    found = model.trained_base(os.path.join("policies", "shoe", "step_000100"), {"vla_path": "../../../base"})
    assert found == "base" and os.path.samefile(found, repo / "base")
