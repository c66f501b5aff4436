"""A plain CLIP (ViT image tower + causal text transformer) for the trainer and
the throughput benchmark, with a token-dropout slot for the masking modes.

``vit-b-16`` has the dimensions of open_clip's ViT-B-16: image 224², patch 16,
width 768, 12 layers, 12 heads, MLP 3072; text context 77, vocab 49408, width
512, 12 layers, 8 heads; joint embedding 512. ``tiny`` and ``small`` are CPU
sized. Attention is ``F.scaled_dot_product_attention`` so a CUDA run gets the
flash kernel whenever no attention mask is passed.

Masking modes (the slot sits right after the positional embedding, so every
mode sees the same tokens and the blocks see only what is kept):

* ``none``          every patch;
* ``random``        ``python_ref.random_masking`` (FLIP), ``1 + K`` tokens;
* ``pgs``           ``PGSPatchDropout`` with ``backend="auto"``, ``1 + K`` tokens;
* ``pgs-reference`` ``PGSPatchDropout`` with ``backend="reference"``;
* ``published``     ``python_ref.published_pgs``: a batch-dependent ``1 + K'``
                    tokens plus its additive attention mask, which is passed to
                    SDPA in every image block.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from bench.common import SectionTimer
from pgs_kernels import PGSPatchDropout
from python_ref import published_pgs, random_masking

MASK_MODES = ("none", "random", "pgs", "pgs-reference", "published")


@dataclass(frozen=True)
class CLIPConfig:
    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    vision_mlp: int = 3072
    context_length: int = 77
    vocab_size: int = 49408
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    text_mlp: int = 2048
    embed_dim: int = 512

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


CONFIGS = {
    "vit-b-16": CLIPConfig(),
    # a few ms per step on one CPU core; captions of the synthetic scenes fit in 32 tokens
    "tiny": CLIPConfig(image_size=64, patch_size=8, vision_width=64, vision_layers=2, vision_heads=4,
                       vision_mlp=256, context_length=32, vocab_size=256, text_width=64, text_layers=2,
                       text_heads=4, text_mlp=256, embed_dim=64),
    # same grid as ViT-B/16 (196 patches) at a fraction of the width and depth
    "small": CLIPConfig(image_size=224, patch_size=16, vision_width=256, vision_layers=4, vision_heads=4,
                        vision_mlp=1024, context_length=32, vocab_size=4096, text_width=256, text_layers=4,
                        text_heads=4, text_mlp=1024, embed_dim=256),
}


def get_config(name: str, **overrides) -> CLIPConfig:
    if name not in CONFIGS:
        raise ValueError(f"model must be one of {sorted(CONFIGS)}, got {name!r}")
    return replace(CONFIGS[name], **overrides)


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width={width} is not divisible by heads={heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, causal: bool = False) -> Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        if attn_mask is not None:
            # SDPA wants a float mask in the query's dtype (bf16 under autocast); -1e12 stays finite in bf16
            attn_mask = attn_mask.to(q.dtype)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal)
        return self.out(y.transpose(1, 2).reshape(B, N, D))


class Block(nn.Module):
    """Pre-norm transformer block (LN -> attention, LN -> GELU MLP)."""

    def __init__(self, width: int, heads: int, mlp: int, causal: bool = False):
        super().__init__()
        self.causal = causal
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp), nn.GELU(), nn.Linear(mlp, width))

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None) -> Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask, self.causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp: int, causal: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, heads, mlp, causal) for _ in range(layers))
        self.grad_checkpointing = False
        self._init(width, layers)

    def _init(self, width: int, layers: int) -> None:
        # open_clip's scheme: residual-branch outputs shrink with depth
        attn_std = width ** -0.5
        proj_std = attn_std * (2 * layers) ** -0.5
        fc_std = (2 * width) ** -0.5
        for b in self.blocks:
            nn.init.normal_(b.attn.qkv.weight, std=attn_std)
            nn.init.normal_(b.attn.out.weight, std=proj_std)
            nn.init.normal_(b.mlp[0].weight, std=fc_std)
            nn.init.normal_(b.mlp[2].weight, std=proj_std)
            for lin in (b.attn.qkv, b.attn.out, b.mlp[0], b.mlp[2]):
                nn.init.zeros_(lin.bias)

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None) -> Tensor:
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, attn_mask, use_reentrant=False)
            else:
                x = blk(x, attn_mask)
        return x


class VisionTower(nn.Module):
    def __init__(self, cfg: CLIPConfig, mask: str = "none", mask_ratio: float = 0.5, **pgs_kwargs):
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image_size={cfg.image_size} is not divisible by patch_size={cfg.patch_size}")
        w = cfg.vision_width
        scale = w ** -0.5
        self.patch_size = cfg.patch_size
        self.conv1 = nn.Conv2d(3, w, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(w))
        self.positional_embedding = nn.Parameter(scale * torch.randn(cfg.num_patches + 1, w))
        self.ln_pre = nn.LayerNorm(w)
        self.transformer = Transformer(w, cfg.vision_layers, cfg.vision_heads, cfg.vision_mlp)
        self.ln_post = nn.LayerNorm(w)
        self.proj = nn.Parameter(scale * torch.randn(w, cfg.embed_dim))
        self.pgs_kwargs = pgs_kwargs
        self.token_weight = 0.0
        self.timer: Optional[SectionTimer] = None  # set by the trainer to time the masking slot
        self.last_num_tokens = None  # 1 + kept patches that reached the blocks, for tests and logs
        self.set_mask(mask, mask_ratio)

    def set_mask(self, mask: str, mask_ratio: Optional[float] = None) -> None:
        """Switch the masking mode in place (the benchmark reuses one model)."""
        if mask not in MASK_MODES:
            raise ValueError(f"mask must be one of {MASK_MODES}, got {mask!r}")
        if mask_ratio is not None:
            if not 0.0 <= float(mask_ratio) < 1.0:
                raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
            self.mask_ratio = float(mask_ratio)
        self.mask = mask
        self.dropout = None
        if mask in ("pgs", "pgs-reference"):
            self.dropout = PGSPatchDropout(self.mask_ratio, self.patch_size, self.token_weight,
                                           backend="reference" if mask == "pgs-reference" else "auto",
                                           **self.pgs_kwargs)

    def set_epoch(self, epoch: float, epochs: float) -> None:
        """The published schedule ``token_weight = epoch / epochs``, for pgs and published alike."""
        self.token_weight = min(1.0, max(0.0, float(epoch) / float(epochs)))
        if self.dropout is not None:
            self.dropout.set_epoch(epoch, epochs)

    def _drop(self, x: Tensor, images: Tensor):
        """Apply the masking mode; returns the kept tokens and an attention mask or None."""
        if not self.training or self.mask == "none" or self.mask_ratio == 0.0:
            return x, None
        if self.dropout is not None:
            return self.dropout(x, images), None
        patches = x[:, 1:]
        attn = None
        if self.mask == "random":
            keep = random_masking(images, patch_size=self.patch_size, mask_ratio=self.mask_ratio).keep_idx
        else:  # published
            sel, attn = published_pgs(images, patches.detach(), patch_size=self.patch_size,
                                      mask_ratio=self.mask_ratio, token_weight=self.token_weight,
                                      return_attn_mask=True)
            keep = sel.keep_idx
            attn = attn[:, None]  # broadcast over heads
        kept = torch.gather(patches, 1, keep[..., None].expand(-1, -1, x.shape[-1]))
        return torch.cat([x[:, :1], kept], dim=1), attn

    def forward(self, images: Tensor) -> Tensor:
        x = self.conv1(images).flatten(2).transpose(1, 2)  # (B, L, D), row-major patches
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        if self.timer is not None:
            self.timer.start()
        # The selection is fp32 by contract; autocast would silently run its matmuls in bf16.
        with torch.autocast(device_type=x.device.type, enabled=False):
            x, attn = self._drop(x, images)
        if self.timer is not None:
            self.timer.stop()
        self.last_num_tokens = x.shape[1]
        x = self.ln_pre(x)
        x = self.transformer(x, attn)
        return self.ln_post(x[:, 0]) @ self.proj


class TextTower(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        w = cfg.text_width
        self.token_embedding = nn.Embedding(cfg.vocab_size, w)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, w))
        self.transformer = Transformer(w, cfg.text_layers, cfg.text_heads, cfg.text_mlp, causal=True)
        self.ln_final = nn.LayerNorm(w)
        self.text_projection = nn.Parameter(torch.empty(w, cfg.embed_dim))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=w ** -0.5)

    def forward(self, text: Tensor) -> Tensor:
        x = self.token_embedding(text) + self.positional_embedding[: text.shape[1]]
        x = self.ln_final(self.transformer(x))
        # EOT has the largest id of the vocabulary, as in CLIP's tokenizer, so argmax finds it
        eot = text.argmax(dim=-1)
        return x[torch.arange(x.shape[0], device=x.device), eot] @ self.text_projection


class CLIP(nn.Module):
    def __init__(self, cfg: CLIPConfig, mask: str = "none", mask_ratio: float = 0.5, **pgs_kwargs):
        super().__init__()
        self.cfg = cfg
        self.visual = VisionTower(cfg, mask, mask_ratio, **pgs_kwargs)
        self.text = TextTower(cfg)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        self.visual.transformer.grad_checkpointing = enabled
        self.text.transformer.grad_checkpointing = enabled

    def encode_image(self, images: Tensor) -> Tensor:
        return F.normalize(self.visual(images).float(), dim=-1)

    def encode_text(self, text: Tensor) -> Tensor:
        return F.normalize(self.text(text).float(), dim=-1)

    def forward(self, images: Tensor, text: Tensor):
        """Normalized fp32 image and text features and the clamped temperature."""
        return self.encode_image(images), self.encode_text(text), self.logit_scale.exp().clamp(max=100.0)


def gather_features(image_features: Tensor, text_features: Tensor):
    """Features of every rank, the local block kept differentiable (open_clip's
    default: all_gather has no autograd, so the local slot is put back)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return image_features, text_features
    world, rank = dist.get_world_size(), dist.get_rank()
    out = []
    for f in (image_features, text_features):
        parts = [torch.zeros_like(f) for _ in range(world)]
        dist.all_gather(parts, f.detach().contiguous())
        parts[rank] = f
        out.append(torch.cat(parts, dim=0))
    return out[0], out[1]


def clip_loss(image_features: Tensor, text_features: Tensor, logit_scale: Tensor) -> Tensor:
    """Symmetric InfoNCE over the global batch (gathered across ranks)."""
    img, txt = gather_features(image_features, text_features)
    logits = logit_scale * img @ txt.t()
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def check_model_name(name: str) -> str:
    """A config of this module (``tiny``, ``small``, ``vit-b-16``) or
    ``open_clip:<arch>`` (open_clip's own model, masked through ``use_pgs``)."""
    if name in CONFIGS or (name.startswith("open_clip:") and len(name) > len("open_clip:")):
        return name
    raise ValueError(f"model must be one of {sorted(CONFIGS)} or open_clip:<arch> (e.g. open_clip:ViT-B-16), "
                     f"got {name!r}")


def model_arg(text: str) -> str:
    """``--model`` of the scripts."""
    import argparse

    try:
        return check_model_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_model(name: str = "tiny", mask: str = "none", mask_ratio: float = 0.5,
                grad_checkpointing: bool = False, **pgs_kwargs):
    """The CLIP ``name`` says: this module's, or open_clip's behind the same
    interface (bench/clip/open_clip_model.py)."""
    if check_model_name(name).startswith("open_clip:"):
        from bench.clip.open_clip_model import build_open_clip

        return build_open_clip(name, mask, mask_ratio, grad_checkpointing, **pgs_kwargs)
    model = CLIP(get_config(name), mask, mask_ratio, **pgs_kwargs)
    model.set_grad_checkpointing(grad_checkpointing)
    return model


def param_groups(model: nn.Module, weight_decay: float):
    """open_clip's split: no decay on gains, biases, embeddings and the temperature."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        flat = p.ndim < 2 or "embedding" in name or "logit_scale" in name
        (no_decay if flat else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def config_dict(model) -> dict:
    return asdict(model.cfg) if isinstance(model, CLIP) else dict(vars(model.cfg))
