"""
nanoOFT's model: OpenVLA-7B (DINOv2 + SigLIP towers -> fused-GELU projector -> Llama-2) owned in plain PyTorch and
loaded straight from the published safetensors (no remote code, no timm), plus K learned action queries whose
final hidden states feed an L1 regression head: one forward pass gives a normalized (chunk, action_dim) action chunk.

    import torch
    from model import VLA, add_lora, save_trained
    from demo import openvla_7b_config                 # the 7B config (demo.py: fixtures beside the core)
    vla = VLA.from_pretrained("openvla/openvla-7b", dtype=torch.bfloat16, device="cuda")  # or a local directory
    add_lora(vla, rank=32)                              # in place: LoRA on every linear, head + queries train fully
    chunk = vla(images, ["pick up the shoe"])           # images uint8 (B, N cameras, 3, H, W) -> (B, 8, 14) float32
    save_trained(vla, "checkpoints/step-1000")          # adapter_model.safetensors + action_head.safetensors

    # OpenVLA-OFT's other levers: a state token, attention over the whole sequence, augmentation (centre crop in eval),
    # and OFT+'s FiLM: the instruction scales and shifts the features in every ViT block
    vla = VLA.from_pretrained(path, proprio_dim=14, attention="full", image_aug=True, film=True)
    chunk = vla(images, instructions, state, aug)       # state (B, 14) in [-1, 1]; aug (B, N, 6) uniform draws

    vla = VLA.from_config(openvla_7b_config(), torch.bfloat16, "cuda")  # 7B-shaped, random weights, no download

Command line:

    python demo.py --tiny tiny-openvla                  # tiny random OpenVLA-format twin (CPU demo and tests)
    python merge.py checkpoints/step-1000 --base openvla/openvla-7b --out out/merged --device cpu  # fold LoRA in
"""

import hashlib
import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer
from torch.utils.checkpoint import checkpoint
from transformers import LlamaConfig, LlamaForCausalLM

import data

# -----------------------------------------------------------------------------
# configuration

PATCH = 14
# DINOv2 first, then SigLIP: the order of the fused channels
TOWERS = ("featurizer", "fused_featurizer")
# the checkpoint's timm_model_ids -> tower settings; the tiny twin's towers run through the same code
VIT = {
    "vit_large_patch14_reg4_dinov2.lvd142m": dict(
        width=1024, depth=24, heads=16, mlp=4096, cls=True, regs=4, layer_scale=True, attn_pool=False
    ),
    "vit_so400m_patch14_siglip_224": dict(
        width=1152, depth=27, heads=16, mlp=4304, cls=False, regs=0, layer_scale=False, attn_pool=True
    ),
    "nanooft_tiny_dinov2_reg4": dict(
        width=64, depth=3, heads=2, mlp=256, cls=True, regs=4, layer_scale=True, attn_pool=False
    ),
    "nanooft_tiny_siglip": dict(
        width=96, depth=3, heads=2, mlp=384, cls=False, regs=0, layer_scale=False, attn_pool=True
    ),
}
# the shipped preprocessor_config.json's tvf_normalize_params (bf16-rounded values), used when the file has none
NORMALIZE = [
    dict(mean=[0.484375, 0.455078125, 0.40625], std=[0.228515625, 0.2236328125, 0.224609375]),
    dict(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5]),
]
# what trains fully
HEAD = ("action_head.", "action_queries", "proprio_projector.", "film_layers.")
ATTENTION = ("causal", "full")


def default_preprocessor(config):
    size = config["image_sizes"][0]
    return dict(
        image_processor_type="PrismaticImageProcessor",
        use_fused_vision_backbone=True,
        image_resize_strategy="resize-naive",
        input_sizes=[[3, size, size]] * 2,
        interpolations=["bicubic", "bicubic"],
        tvf_normalize_params=NORMALIZE,
    )


def skipped_prefixes(config):
    """The only checkpoint keys the loader ignores: the features come from the second-to-last block, un-normed."""
    out = []
    for name, tid in zip(TOWERS, config["timm_model_ids"]):
        spec = VIT[tid]
        out += [f"vision_backbone.{name}.blocks.{spec['depth'] - 1}.", f"vision_backbone.{name}.norm."]
        out += [f"vision_backbone.{name}.attn_pool."] if spec["attn_pool"] else []
    return out


# -----------------------------------------------------------------------------
# modules


class LayerScale(nn.Module):
    def __init__(self, d):
        super().__init__()
        # timm's `gamma`; OpenVLA renamed it so HF would not mangle it
        self.scale_factor = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * self.scale_factor


class Block(nn.Module):
    def __init__(self, d, heads, mlp, layer_scale):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d, eps=1e-6)
        self.attn = nn.ModuleDict(dict(qkv=nn.Linear(d, 3 * d), proj=nn.Linear(d, d)))
        self.ls1 = LayerScale(d) if layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(d, eps=1e-6)
        self.mlp = nn.ModuleDict(dict(fc1=nn.Linear(d, mlp), fc2=nn.Linear(mlp, d)))
        self.ls2 = LayerScale(d) if layer_scale else nn.Identity()

    def forward(self, x, gamma=None, beta=None):
        B, T, d = x.shape
        q, k, v = self.attn.qkv(self.norm1(x)).view(B, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, d)
        x = x + self.ls1(self.attn.proj(a))
        # FiLM (OFT+): the same scale and shift for every token; the identity at 0
        if gamma is not None:
            x = x * (1 + gamma[:, None]) + beta[:, None]
        return x + self.ls2(self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x)))))


class ViT(nn.Module):
    def __init__(self, spec, image_size):
        super().__init__()
        w = spec["width"]
        self.patch_embed = nn.ModuleDict(dict(proj=nn.Conv2d(3, w, PATCH, PATCH)))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, w)) if spec["cls"] else None
        self.reg_token = nn.Parameter(torch.zeros(1, spec["regs"], w)) if spec["regs"] else None
        self.pos_embed = nn.Parameter(torch.zeros(1, (image_size // PATCH) ** 2, w))
        # the last block only feeds the final norm / pooling that OpenVLA never reads, so it is not built
        self.blocks = nn.ModuleList(
            Block(w, spec["heads"], spec["mlp"], spec["layer_scale"]) for _ in range(spec["depth"] - 1)
        )
        self.grad_ckpt = False

    def forward(self, x, film=None):
        """film: (gamma, beta) per block, each (B, width), or None."""
        # pos_embed covers patches only
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
        prefix = [t.expand(len(x), -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        x = torch.cat(prefix + [x], 1)
        if film is None:
            film = [()] * len(self.blocks)
        for block, f in zip(self.blocks, film):
            if self.grad_ckpt and self.training:
                x = checkpoint(block, x, *f, use_reentrant=False)
            else:
                x = block(x, *f)
        return x[:, sum(t.shape[1] for t in prefix) :]


class ResBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(d), nn.Linear(d, d)

    def forward(self, x):
        return x + F.relu(self.fc(self.norm(x)))


@torch.no_grad()
def init_weights(named_parameters):
    for name, p in named_parameters:
        if name.endswith("bias"):
            p.zero_()
        # norm weights and layer scales
        elif p.ndim == 1:
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02)


# -----------------------------------------------------------------------------
# frames -> pixels

# OpenVLA-OFT: a square crop of 90% of the area, random in training, centred at evaluation
CROP_AREA = 0.9
# OFT: brightness +-0.2, contrast and saturation 0.8-1.2, hue +-0.05
JITTER = (0.2, 0.2, 0.2, 0.05)


def pil_weights(n, lo, hi, size):
    """Pillow's bicubic resampling of n samples over the boxes [lo, hi) (M,) to `size` outputs, as (M, size, n)
    fixed-point weights: the filter, window and 22-bit rounding of its precompute_coeffs / normalize_coeffs_8bpc."""
    # PIL takes the box as C floats
    lo, span = lo.float().double(), (hi.float() - lo.float()).double()
    scale = (span / size)[:, None]
    # downscaling widens the filter: antialiasing
    fs = scale.clamp(min=1)
    center = lo[:, None] + (torch.arange(size, device=lo.device, dtype=torch.float64) + 0.5) * scale
    # PIL's (int) casts
    first, end = (center - 2 * fs + 0.5).trunc(), (center + 2 * fs + 0.5).trunc()
    # per output at most, for boxes inside the frame (no data-dependent sync)
    taps = int(4 * max(n / size, 1)) + 2
    i = first[..., None] + torch.arange(taps, device=lo.device)
    t = ((i - center[..., None] + 0.5) / fs[..., None]).abs()
    w = torch.where(t < 1, (1.5 * t - 2.5) * t * t + 1, torch.where(t < 2, ((t - 5) * t + 8) * t * -0.5 + 2, 0.0))
    w = w * ((i >= 0) & (i < n) & (i < end[..., None]))
    w = w / w.sum(-1, keepdim=True)
    w = (w * 2**22 + torch.where(w < 0, -0.5, 0.5)).trunc()
    return w.new_zeros(*w.shape[:2], n).scatter_add_(-1, i.clamp(0, n - 1).long(), w)


def resize_like_pil(frames, size, boxes=None):
    """uint8 frames (M, 3, H, W) -> float levels (M, 3, size, size), exactly as PIL's Image.resize((size, size),
    BICUBIC, box) (OpenVLA's processor): two separable passes, horizontal first, each rounded to whole levels.
    float64 keeps the fixed-point sums exact on CPU and CUDA. boxes (M, 4): left, top, right, bottom in pixels."""
    M, _, H, W = frames.shape
    if boxes is None:
        if (H, W) == (size, size):
            return frames.float()
        boxes = torch.tensor([0.0, 0, W, H], dtype=torch.float64, device=frames.device).expand(M, 4)

    def level(v):
        # PIL's clip8 of the rounded sum
        return ((v + 2**21) / 2**22).floor().clamp(0, 255)

    x = level(frames.double() @ pil_weights(W, boxes[:, 0], boxes[:, 2], size).transpose(1, 2)[:, None])
    return level(pil_weights(H, boxes[:, 1], boxes[:, 3], size)[:, None] @ x).float()


def crop_boxes(u, H, W):
    """OFT's square crop of 90% of its 224 px image's area, placed by u (M, 2) in [0, 1] (0.5: centred), mapped onto
    the H x W frame, so that a frame is resampled once instead of resized and then cropped and resized again."""
    lo = (1 - CROP_AREA**0.5) * u
    return torch.cat([lo, lo + CROP_AREA**0.5], 1) * u.new_tensor([W, H, W, H])


def jitter(x, u):
    """OFT's colour augmentation of [0, 1] pixels (M, 3, S, S) with strengths drawn as u (M, 4) in [0, 1): brightness
    (added), contrast (about each channel's mean), saturation and hue (in HSV), clipped after each as TF's ops are."""
    b, c, s, h = ((2 * u - 1) * u.new_tensor(JITTER)).T[..., None, None, None]
    x = (x + b).clamp(0, 1)
    mean = x.mean((2, 3), keepdim=True)
    x = ((x - mean) * (1 + c) + mean).clamp(0, 1)
    r, g, bl = x.split(1, 1)
    v, d = x.amax(1, keepdim=True), x.amax(1, keepdim=True) - x.amin(1, keepdim=True)
    dd = d.clamp(min=1e-12)
    hue = torch.where(v == r, (g - bl) / dd, torch.where(v == g, (bl - r) / dd + 2, (r - g) / dd + 4)) / 6
    sat = (d / v.clamp(min=1e-12) * (1 + s)).clamp(0, 1)
    # HSV -> RGB, channel by channel
    k = (x.new_tensor([5.0, 3.0, 1.0]).view(3, 1, 1) + 6 * (hue + h)) % 6
    return v - v * sat * torch.minimum(k, 4 - k).clamp(0, 1)


# -----------------------------------------------------------------------------
# the prompt


def prompt_ids(tokenizer, instruction):
    """BOS and OpenVLA's prompt, as the LLM reads it after the image patches."""
    prompt = f"In: What action should the robot take to {instruction.lower()}?\nOut:"
    ids = [tokenizer.token_to_id("<s>")] + tokenizer.encode(prompt, add_special_tokens=False).ids
    space = tokenizer.token_to_id("▁")
    # OpenVLA's action prediction appends the bare "▁"
    if ids[-1] != space:
        ids.append(space)
    return ids


def check_sequence_length(config, tokenizer, instruction, cameras, proprio=False, chunk=8):
    """Positions one sample fills in the LLM, laid out as VLA.forward does (BOS, every camera's patches, the state
    token, the prompt, the action queries); a ValueError when that is more than the LLM has (2048 for Llama-2)."""
    prompt, patches = len(prompt_ids(tokenizer, instruction)), (config["image_sizes"][0] // PATCH) ** 2
    n, limit = prompt + cameras * patches + bool(proprio) + chunk, max_positions(config)
    if n > limit:
        state = " + 1 state token" if proprio else ""
        raise ValueError(
            f"the instruction is too long: {prompt} prompt tokens + {cameras} camera(s) x {patches} image "
            f"tokens{state} + {chunk} action queries = {n} positions, more than the LLM's {limit}"
        )
    return n


def max_positions(config):
    # text_config is a diff from LlamaConfig()
    return LlamaConfig(**config["text_config"]).max_position_embeddings


def load_tokenizer(path):
    """config.json and the tokenizer of a checkpoint (directory or hub id): enough to measure prompts, no weights."""
    path = resolve(path)
    tok = os.path.join(path, "tokenizer.json")
    if not os.path.exists(tok):
        raise FileNotFoundError(f"{path}: missing tokenizer.json")
    return read_json(os.path.join(path, "config.json")), Tokenizer.from_file(tok)


# -----------------------------------------------------------------------------
# the VLA


class VLA(nn.Module):
    def __init__(
        self,
        config,
        tokenizer=None,
        preprocessor=None,
        chunk=8,
        action_dim=14,
        proprio_dim=0,
        attention="causal",
        image_aug=False,
        film=False,
    ):
        super().__init__()
        if unknown := [tid for tid in config["timm_model_ids"] if tid not in VIT]:
            raise ValueError(f"unknown vision tower {unknown[0]!r} in config.json; known: {', '.join(VIT)}")
        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION)}, got {attention!r}")
        self.config, self.tokenizer = config, tokenizer
        self.preprocessor = preprocessor or default_preprocessor(config)
        # image_aug: trained on crops, so centre-crop in eval
        self.attention, self.image_aug = attention, image_aug
        self.image_size = config["image_sizes"][0]
        specs = [VIT[tid] for tid in config["timm_model_ids"]]
        self.vision_backbone = nn.ModuleDict({n: ViT(s, self.image_size) for n, s in zip(TOWERS, specs)})
        vision = sum(s["width"] for s in specs)
        # sdpa takes the boolean 4D masks of the non-causal modes as they are (eager would want additive ones)
        text = LlamaConfig(**config["text_config"], attn_implementation="sdpa")
        d = text.hidden_size
        self.projector = nn.ModuleDict(
            dict(fc1=nn.Linear(vision, 4 * vision), fc2=nn.Linear(4 * vision, d), fc3=nn.Linear(d, d))
        )
        self.language_model = LlamaForCausalLM(text)
        self.new_head(chunk, action_dim, proprio_dim, film, torch.get_default_device())

    def new_head(self, chunk, action_dim, proprio_dim, film, device):
        """(Re)build what trains fully, in float32 like peft's adapters: queries, head, state projector, FiLM layers."""
        d = self.llm.config.hidden_size
        with torch.device(device):
            self.action_queries = nn.Parameter(torch.empty(chunk, d))
            self.action_head = nn.Sequential(
                nn.LayerNorm(d),
                nn.Linear(d, d),
                nn.ReLU(),
                ResBlock(d),
                ResBlock(d),
                nn.LayerNorm(d),
                nn.Linear(d, action_dim),
            )
            self.proprio_projector = (
                nn.ModuleDict(dict(fc1=nn.Linear(proprio_dim, d), fc2=nn.Linear(d, d))) if proprio_dim else None
            )

            def film_block(w):
                # init as OFT
                return nn.ModuleDict(dict(scale=nn.Linear(d, w), shift=nn.Linear(d, w)))

            self.film_layers = (
                nn.ModuleDict(
                    {
                        name: nn.ModuleList(film_block(t.pos_embed.shape[-1]) for _ in t.blocks)
                        for name, t in self.vision_backbone.items()
                    }
                )
                if film
                else None
            )
        init_weights([(n, p) for n, p in self.named_parameters() if n.startswith(HEAD[:-1])])
        self.chunk, self.action_dim, self.proprio_dim, self.film = chunk, action_dim, proprio_dim, film

    @property
    def llm(self):
        return self.language_model

    @property
    def device(self):
        return self.action_queries.device

    def embed_images(self, images, aug=None, lang=None):
        """uint8 frames (B, N, 3, H, W) -> projected patches (B, N * 256, d). aug (B, N, 6) in [0, 1): OFT's random
        crop and colour jitter (training); else its centre crop if trained with image_aug. lang (B, d): FiLM's input."""
        if images.dtype != torch.uint8 or images.ndim != 5:
            raise ValueError(f"images must be uint8 (B, N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        B, N, _, H, W = images.shape
        x = images.to(self.device).flatten(0, 1)
        if aug is None and not self.image_aug:
            x = resize_like_pil(x, self.image_size) / 255
        else:
            u = (
                aug.to(self.device, torch.float64).flatten(0, 1)
                if aug is not None
                else torch.full((len(x), 2), 0.5, dtype=torch.float64, device=x.device)
            )
            x = resize_like_pil(x, self.image_size, crop_boxes(u[:, :2], H, W)) / 255
            x = jitter(x, u[:, 2:].float()) if aug is not None else x
        feats, lang = [], lang.repeat_interleave(N, 0) if self.film else None
        for (name, tower), p in zip(self.vision_backbone.items(), self.preprocessor["tvf_normalize_params"]):
            mean, std = (torch.tensor(p[k], device=x.device).view(3, 1, 1) for k in ("mean", "std"))
            film = [(f.scale(lang), f.shift(lang)) for f in self.film_layers[name]] if self.film else None
            feats.append(tower(((x - mean) / std).to(tower.pos_embed.dtype), film))
        p = self.projector
        x = p.fc3(F.gelu(p.fc2(F.gelu(p.fc1(torch.cat(feats, -1))))))
        return x.reshape(B, N * x.shape[1], x.shape[2])

    def tokenize(self, instructions):
        return [prompt_ids(self.tokenizer, s) for s in instructions]

    def language_vector(self, emb, n):
        """FiLM's input (OFT+): the mean input embedding of what OFT averages, every token of its LLM input that is
        not an action token: BOS, the prompt, the trailing "▁" and the stop token </s> (one fixed token in OFT's
        training and deployment alike), never padding. emb (B, T, d) holds n (B,) real tokens -> (B, d) float32."""
        real = (torch.arange(emb.shape[1], device=emb.device) < n[:, None])[..., None]
        stop = self.llm.model.embed_tokens.weight[self.tokenizer.token_to_id("</s>")].float()
        return ((emb.float() * real).sum(1) + stop) / (n[:, None] + 1)

    def forward(self, images, instructions, state=None, aug=None):
        """-> normalized action chunks (B, chunk, action_dim). state: normalized proprioception (B, proprio_dim)."""
        ids = self.tokenize(instructions)
        B, K, dev = len(ids), self.chunk, self.device
        # BOS + prompt tokens
        n = torch.tensor([len(t) for t in ids], device=dev)
        T = max(len(t) for t in ids)
        tokens = torch.tensor([t + [self.config["pad_token_id"]] * (T - len(t)) for t in ids], device=dev)
        emb = self.llm.model.embed_tokens(tokens)
        lang = self.language_vector(emb, n) if self.film else None
        patches = self.embed_images(images, aug, lang)
        # OFT: one state token right after the image patches
        if self.proprio_dim:
            if state is None:
                raise ValueError(f"the model was trained with proprioception: pass state (B, {self.proprio_dim})")
            p = self.proprio_projector
            token = p.fc2(F.gelu(p.fc1(state.to(self.device, torch.float32))))
            patches = torch.cat([patches, token[:, None].to(patches.dtype)], 1)
        P = patches.shape[1]
        x = torch.cat([emb[:, :1], patches.to(emb.dtype), emb[:, 1:], emb.new_zeros(B, K, emb.shape[2])], 1)
        # right padding: each sample's queries follow its own prompt, so every real token sits at the position it
        # would have alone, and causal attention never reaches the padding after it: no mask needed (flash sdpa)
        rows = torch.arange(B, device=dev)[:, None]
        q_pos = P + n[:, None] + torch.arange(K, device=dev)
        x = x.index_put((rows, q_pos), self.action_queries.to(x.dtype).expand(B, K, -1))
        # causal attention needs no mask; OFT's full attention: every real token sees every real token, never a pad
        mask = None
        if self.attention == "full":
            real = torch.arange(x.shape[1], device=dev) < (P + n + K)[:, None]
            mask = real[:, None, None, :].expand(B, 1, x.shape[1], -1)
        # no lm_head
        h = self.llm.model(inputs_embeds=x, attention_mask=mask, use_cache=False).last_hidden_state
        return self.action_head(h[rows, q_pos].float())

    @classmethod
    def _meta(cls, config, dtype, tokenizer, preprocessor, options):
        # no memory: shapes only, weights arrive later
        with torch.device("meta"):
            vla = cls(config, tokenizer, preprocessor, **options)
        return vla.to(dtype)

    def _finish(self, device):
        # rotary inv_freq is not in checkpoints: recompute it (float32) on the real device
        rope = self.llm.model.rotary_emb
        with torch.device(device):
            self.llm.model.rotary_emb = type(rope)(rope.config)
        self.new_head(self.chunk, self.action_dim, self.proprio_dim, self.film, device)

    @classmethod
    def from_config(cls, config, dtype=torch.float32, device="cpu", tokenizer=None, **options):
        """Random weights built directly on `device` (benchmarks, the tiny twin); options: VLA's head arguments."""
        vla = cls._meta(config, dtype, tokenizer, None, options)
        vla.to_empty(device=device)
        init_weights(vla.named_parameters())
        vla._finish(device)
        return vla

    @classmethod
    def from_pretrained(cls, path="openvla/openvla-7b", dtype=torch.float32, device="cpu", **options):
        """A local OpenVLA-format directory or a hub id. An action_head.safetensors there (a merged export) is
        loaded too, and the options it records (HEAD_OPTIONS) win."""
        path = resolve(path)
        config, tok = load_tokenizer(path)
        pre = os.path.join(path, "preprocessor_config.json")
        pre = read_json(pre) if os.path.exists(pre) else None
        vla = cls._meta(config, dtype, tok, pre, options)
        load_weights(vla, path, dtype, device)
        vla._finish(device)
        if os.path.exists(os.path.join(path, "action_head.safetensors")):
            load_head(vla, os.path.join(path, "action_head.safetensors"))
        return vla


# -----------------------------------------------------------------------------
# loading


HUB_FILES = [
    "config.json",
    "model*.safetensors",
    "model.safetensors.index.json",
    "tokenizer*",
    "*_tokens*.json",
    "preprocessor_config.json",
    "action_head.safetensors",
]


def is_hub_id(path):
    """'owner/name' that cannot be a local path: only those are looked up on the Hugging Face Hub."""
    return not (path.startswith(("/", ".")) or path.count("/") != 1 or os.path.isdir(path.split("/")[0]))


def resolve(path):
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        return path
    if not is_hub_id(path):
        raise FileNotFoundError(f"{path}: no such checkpoint directory")
    from huggingface_hub import snapshot_download

    # weights, config and tokenizer only: the repo's .py remote code is never fetched
    try:
        return snapshot_download(path, allow_patterns=HUB_FILES)
    # offline, unknown repo, gated...: one line that says what to do
    except Exception as e:
        raise RuntimeError(
            f"cannot download {path} from the Hugging Face Hub ({type(e).__name__}; offline?): "
            f"fetch it where there is internet (hf download {path} --local-dir DIR) "
            f"and pass --vla_path DIR"
        ) from None


def read_json(path):
    if not os.path.exists(path):
        raise FileNotFoundError(f"missing {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise ValueError(f"corrupt {path}: {e}") from None


def open_safetensors(path, device="cpu"):
    if not os.path.exists(path):
        raise FileNotFoundError(f"missing {path}")
    try:
        return safe_open(path, framework="pt", device=str(device))
    except Exception as e:
        raise ValueError(f"corrupt safetensors file {path}: {e}") from None


def get_tensor(f, key):
    """f.get_tensor(key) of an open safetensors file. torch.asarray, which safetensors reads the tensor with, swallows
    a KeyboardInterrupt (Ctrl-C) raised inside it and fails with a ValueError: a tensor that then reads was one."""
    try:
        return f.get_tensor(key)
    except ValueError:
        f.get_tensor(key)  # a file at fault fails again
        raise KeyboardInterrupt from None


def _listing(keys):
    return ", ".join(keys[:20]) + (f" ... ({len(keys)} in all)" if len(keys) > 20 else "")


def check_keys(vla, keys, where):
    """The checkpoint's keys must be the model's, plus at most the skip list; returns the keys to load."""
    wanted = {k for k in vla.state_dict() if not k.startswith(HEAD)}
    skip = tuple(skipped_prefixes(vla.config))
    missing = sorted(wanted - set(keys))
    unexpected = sorted(k for k in set(keys) - wanted if not k.startswith(skip))
    if missing or unexpected:
        raise ValueError(
            f"{where} does not match the model: missing keys [{_listing(missing)}]; "
            f"unexpected keys [{_listing(unexpected)}]"
        )
    return wanted


def load_weights(vla, path, dtype, device):
    index = os.path.join(path, "model.safetensors.index.json")
    shards = sorted(
        set(read_json(index)["weight_map"].values())
        if os.path.exists(index)
        else (f for f in os.listdir(path) if f.startswith("model") and f.endswith(".safetensors"))
    )
    if not shards:
        raise FileNotFoundError(f"{path}: no model*.safetensors weights")
    shards = [os.path.join(path, s) for s in shards]
    # from the headers only: a bad checkpoint fails before gigabytes are read
    wanted = check_keys(vla, [k for shard in shards for k in open_safetensors(shard).keys()], path)
    # one shard at a time, straight into the target dtype and device: never two copies of the model
    for shard in shards:
        with open_safetensors(shard, device) as f:
            vla.load_state_dict(
                {k: get_tensor(f, k).to(dtype) for k in f.keys() if k in wanted}, strict=False, assign=True
            )


# saved with the head's weights
HEAD_OPTIONS = ("chunk", "action_dim", "proprio_dim", "attention", "image_aug", "film")


def fingerprint(config):
    """What a checkpoint records of its base: a hash of config.json, which fixes every shape."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def save_head(vla, path):
    meta = {k: getattr(vla, k) for k in HEAD_OPTIONS} | dict(
        hidden=vla.llm.config.hidden_size, base=fingerprint(vla.config)
    )
    sd = {k: v.detach().contiguous() for k, v in vla.state_dict().items() if k.startswith(HEAD)}
    save_file(sd, path, metadata={k: json.dumps(v) for k, v in meta.items()})


def head_options(path):
    """What a head was trained with, from its file's header: HEAD_OPTIONS, its width and its base's fingerprint."""
    with open_safetensors(path) as f:
        meta = f.metadata() or {}
    try:
        meta = {k: json.loads(v) for k, v in meta.items()}
        return {k: meta[k] for k in HEAD_OPTIONS + ("hidden", "base")}
    except (KeyError, ValueError):
        raise ValueError(f"{path}: no action-head config in its metadata (not written by save_trained?)") from None


def load_head(vla, path):
    """The head's weights, and the options it was trained with (they win over the model's)."""
    options = head_options(path)
    with open_safetensors(path) as f:
        sd = {k: get_tensor(f, k) for k in f.keys()}
    if options["hidden"] != vla.llm.config.hidden_size:
        raise ValueError(f"{path}: head width {options['hidden']} != LLM width {vla.llm.config.hidden_size}")
    shape = [options[k] for k in ("chunk", "action_dim", "proprio_dim", "film")]
    if shape != [vla.chunk, vla.action_dim, vla.proprio_dim, vla.film]:
        vla.new_head(*shape, vla.device)
    vla.attention, vla.image_aug = options["attention"], options["image_aug"]
    wanted = sorted(k for k in vla.state_dict() if k.startswith(HEAD))
    if sorted(sd) != wanted:
        raise ValueError(f"{path}: head keys [{_listing(sorted(sd))}] != expected [{_listing(wanted)}]")
    vla.load_state_dict(sd, strict=False)


# -----------------------------------------------------------------------------
# LoRA and what trains


def _inject(vla, lora_config):
    inject_adapter_in_model(lora_config, vla)
    for name, p in vla.named_parameters():
        p.requires_grad = "lora_" in name or name.startswith(HEAD)
        if p.requires_grad:
            # peft would cast adapters to a bf16 base's dtype; keep what trains in fp32
            p.data = p.data.float()


def add_lora(vla, rank=32):
    """peft LoRA on every nn.Linear of the towers, the projector and the LLM layers (not lm_head, not the head)."""
    targets = [
        n
        for n, m in vla.named_modules()
        if isinstance(m, nn.Linear) and n.startswith(("vision_backbone.", "projector.", "language_model.model.layers."))
    ]
    _inject(
        vla,
        LoraConfig(
            r=rank, lora_alpha=min(rank, 16), lora_dropout=0.0, init_lora_weights="gaussian", target_modules=targets
        ),
    )
    return vla


def enable_grad_ckpt(vla):
    """Non-reentrant activation checkpointing (works under DDP) of every decoder layer and ViT block."""
    vla.llm.activation_checkpointing_enable({"use_reentrant": False})
    for tower in vla.vision_backbone.values():
        tower.grad_ckpt = True


def merge_lora(vla):
    """Fold LoRA into the base weights in place and drop the adapter modules (for deployment / export)."""
    for name, m in list(vla.named_modules()):
        if isinstance(m, LoraLayer):
            m.merge()
            parent, child = name.rsplit(".", 1)
            setattr(vla.get_submodule(parent), child, m.get_base_layer())
    vla.__dict__.pop("peft_config", None)
    return vla


# -----------------------------------------------------------------------------
# checkpoints: the one home of their format
#
# A training checkpoint, step_NNNNNN/, holds what training changed and what deployment needs:
#   adapter_model.safetensors, adapter_config.json   LoRA, in peft's format (peft's own tools read it)
#   action_head.safetensors                          head, queries, state projector, FiLM, and the options they need
#   dataset_statistics.json                          OpenVLA's norm_stats: how actions (and states) were normalized
#   args.json                                        the run record: the flags as typed and what the run resolved
#   trainer_state.pt                                 step, optimizer, data position, RNG states: resuming only
# A merged export (merge.py) holds the base's files (config.json, model*.safetensors, tokenizer) with LoRA folded in
# instead of the adapter, and no trainer state.

ADAPTER_FILES = ["adapter_model.safetensors", "adapter_config.json"]
POLICY_FILES = ["action_head.safetensors", "dataset_statistics.json", "args.json"]
TRAINER_STATE = "trainer_state.pt"
CHECKPOINT_FILES = ADAPTER_FILES + POLICY_FILES + [TRAINER_STATE]
# what args.json must hold for a policy to run
POLICY_ARGS = ["vla_path", "cameras", "chunk", "action_dim", "action_offset", "norm", "frame_sizes", "dtype"]
POLICY_ARGS += ["action_key", "state_key", "instruction", "swap_red_blue"]


def save_trained(vla, ckpt_dir):
    """What training changed: the LoRA adapter in peft's format and the head + queries with their config."""
    os.makedirs(ckpt_dir, exist_ok=True)
    # peft's own key names, with PeftModel's prefix so that peft's tools read it
    sd = get_peft_model_state_dict(vla)
    save_file(
        {f"base_model.model.{k}": v.detach().contiguous() for k, v in sd.items()},
        os.path.join(ckpt_dir, "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )
    vla.peft_config["default"].save_pretrained(ckpt_dir)
    save_head(vla, os.path.join(ckpt_dir, "action_head.safetensors"))


def write_checkpoint(ckpt_dir, vla, stats, run, trainer_state=None):
    """Every file of a training checkpoint. stats: data.save_stats's arguments; run: the run record (args.json)."""
    save_trained(vla, ckpt_dir)
    data.save_stats(os.path.join(ckpt_dir, "dataset_statistics.json"), **stats)
    with open(os.path.join(ckpt_dir, "args.json"), "w") as f:
        json.dump(run, f, indent=1)
    if trainer_state is not None:
        torch.save(trainer_state, os.path.join(ckpt_dir, TRAINER_STATE))


def is_export(ckpt_dir):
    """A merged export (merge.py) rather than a training checkpoint: it holds a whole model's config.json."""
    return os.path.isfile(os.path.join(ckpt_dir, "config.json"))


def check_checkpoint(ckpt_dir):
    """Every file a policy needs, opened and checked against the others before any weight loads: the adapter's
    config against its tensors, args.json against the options the head records, the statistics' widths. Raises
    an OSError or ValueError naming the file. -> the run record (args.json)."""
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"{ckpt_dir}: not a directory")
    wanted = POLICY_FILES if is_export(ckpt_dir) else ADAPTER_FILES + POLICY_FILES
    missing = [f for f in wanted if not os.path.isfile(os.path.join(ckpt_dir, f))]
    if missing:
        raise FileNotFoundError(f"checkpoint {ckpt_dir} is missing {', '.join(missing)}")
    if not is_export(ckpt_dir):
        check_adapter(ckpt_dir)
    where = os.path.join(ckpt_dir, "args.json")
    run = read_json(where)
    head = head_options(os.path.join(ckpt_dir, "action_head.safetensors"))
    absent = [k for k in POLICY_ARGS if k not in run]
    if absent:
        raise ValueError(f"{where}: no {', '.join(absent)}")
    # what the weights were trained for, as the head records it, and the cameras in the order frame_sizes has them
    trained = {k: head[k] for k in ("chunk", "action_dim", "attention", "image_aug", "film")}
    trained |= {"proprio": bool(head["proprio_dim"]), "cameras": ",".join(run["frame_sizes"])}
    for k, value in trained.items():
        if k in run and run[k] != value:
            raise ValueError(f"{where}: {k} {run[k]!r}, but the checkpoint was trained with {value!r}")
    stats = os.path.join(ckpt_dir, "dataset_statistics.json")
    data.load_stats(stats, key="action", dim=head["action_dim"])
    if head["proprio_dim"]:
        data.load_stats(stats, key="proprio", dim=head["proprio_dim"])
    return run


def read_trainer_state(ckpt_dir):
    """trainer_state.pt, for resuming; a ValueError naming it when it is missing, empty or cut off."""
    path = os.path.join(ckpt_dir, TRAINER_STATE)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    # an OSError, EOFError, a zip or an unpickling error
    except Exception as e:
        raise ValueError(f"unreadable {path}: {e}") from None


def check_adapter(ckpt_dir):
    """adapter_config.json's rank and target_modules against the tensors in adapter_model.safetensors (headers)."""
    config = read_json(os.path.join(ckpt_dir, "adapter_config.json"))
    # each <module>.lora_A.weight is (rank, in_features)
    with open_safetensors(os.path.join(ckpt_dir, "adapter_model.safetensors")) as f:
        ranks = {
            k.removeprefix("base_model.model.").split(".lora_A.")[0]: f.get_slice(k).get_shape()[0]
            for k in f.keys()
            if ".lora_A." in k
        }
    targets = config.get("target_modules") or []
    odd = [t for t in targets if not any(peft_matches(m, t) for m in ranks)]
    odd += [m for m in ranks if not any(peft_matches(m, t) for t in targets)]
    if set(ranks.values()) != {config.get("r")} or odd:
        raise ValueError(
            f"{ckpt_dir}: adapter_config.json (r {config.get('r')}) does not match the tensors in "
            f"adapter_model.safetensors (rank {sorted(set(ranks.values()))}; modules [{_listing(odd)}])"
        )


def peft_matches(module, target):
    """peft's rule for a target_modules entry: the module's name, or its last dotted parts."""
    return module == target or module.endswith(f".{target}")


def check_base(ckpt_dir, base):
    """Refuses, before it loads, another base than ckpt_dir trained on (by the fingerprint of config.json that its
    head records: LoRA and a head of another base would load without a complaint). -> the base's directory."""
    path = resolve(base)
    trained = head_options(os.path.join(ckpt_dir, "action_head.safetensors"))["base"]
    found = fingerprint(read_json(os.path.join(path, "config.json")))
    if found != trained:
        raise ValueError(
            f"{ckpt_dir} was trained on another base than {base} (config.json {trained}; {base}'s: {found}): "
            "pass the base it was trained on"
        )
    return path


def trained_base(ckpt_dir, run):
    """The base a checkpoint trained on: args.json's vla_path, a hub id or an absolute path as train.py records it;
    a relative one (a policy shipped inside a repository) is relative to the checkpoint's own directory."""
    path = os.path.expanduser(run["vla_path"])
    beside = os.path.join(ckpt_dir, path)
    # owner/name is a hub id unless the checkpoint has such a folder beside it
    if os.path.isabs(path) or (is_hub_id(path) and not os.path.isdir(beside)):
        return path
    return os.path.normpath(beside)


def load_trained(vla, ckpt_dir):
    """A training checkpoint's LoRA and head into vla (LoRA injected first if it has none)."""
    # a clear error if missing or corrupt, or if its config does not fit its tensors
    check_adapter(ckpt_dir)
    if not hasattr(vla, "peft_config"):
        _inject(vla, LoraConfig.from_pretrained(ckpt_dir))
    path = os.path.join(ckpt_dir, "adapter_model.safetensors")
    with open_safetensors(path) as f:
        sd = {k: get_tensor(f, k) for k in f.keys()}
    result = set_peft_model_state_dict(vla, sd)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{path} does not match the model's LoRA: missing [{_listing(missing)}]; "
            f"unexpected [{_listing(result.unexpected_keys)}]"
        )
    load_head(vla, os.path.join(ckpt_dir, "action_head.safetensors"))
    return vla
