"""A tiny CLIP image tower for the shapes data, trained contrastively against the frozen tiny-shapes text encoder.

The text side is the model's own text encoder (frozen, as the real CLIP is) with CLIP's layout on top: its
`pooler_output` (the end-of-text token) through a trainable `text_projection` (Linear, no bias). The image side is a
new `CLIPVisionModelWithProjection`; its `image_embeds` are what the IP-Adapter and the diffusion prior take. Its
projection width is the text encoder's hidden size, because the prior (a PriorTransformer) reads the text states
and the image embedding at one width.

1. encode every distinct caption once (the text encoder is frozen): (C, W) pooled states;
2. symmetric InfoNCE over a batch of images and their captions, with CLIP's learnable logit scale;
3. many images share a caption, so same-caption pairs in a batch are positives, not negatives (see `clip_loss`).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import CLIPTextModel, CLIPTokenizer, CLIPVisionConfig, CLIPVisionModelWithProjection

from minidalle.errors import InvalidInput
from minidalle.image_conditioning import ImageProcessor, new_image_processor
from minidalle.tiny.base_training import _lr_lambda, tokenize


@dataclass
class ClipTrainConfig:
    seed: int = 0
    steps: int = 6000  # ~6.5 CPU-min; colours are right within ~100 steps, shapes take the rest (see patch_size)
    batch_size: int = 128  # 2x the steps per minute of 256; a 256-batch run of the same minutes learnt far fewer shapes
    lr: float = 3e-3  # a 4-layer, 64-wide ViT from scratch; 2e-3 learnt fewer shapes in the same steps
    warmup_steps: int = 50
    weight_decay: float = 0.05
    image_size: int = 32  # the shapes images; the processor resizes anything else to it
    # 4x4 patches of 8 px. Shapes, not colours, are what takes a ViT long to learn, and steps buy them: measured
    # held-out caption retrieval (all 224 captions; every miss is the shape), 1 thread: 8-px patches 43 % (600
    # steps, 39 s), 79 % (2400, 157 s), 97.6 % (6000, 392 s); 4-px patches 59 % (600 steps, 160 s), 79 % (1000,
    # 276 s, the tower shipped before), 2-px patches 1.5 s a step. A 128-wide tower: 66 % (1200 steps, 212 s)
    patch_size: int = 8
    hidden_size: int = 64
    layers: int = 4
    heads: int = 4
    init_temperature: float = 0.07  # CLIP's: logit scale starts at ln(1 / 0.07)
    max_logit_scale: float = 100.0  # CLIP's clamp: beyond it training turns unstable
    minutes_budget: float | None = None  # hard wall-clock cap (stops early, still returns the model)
    threads: int | None = None

    def __post_init__(self):
        for name in ("steps", "batch_size", "image_size", "patch_size", "hidden_size", "layers", "heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InvalidInput(name, f"must be a positive int, got {value!r}")
        if self.batch_size < 2:
            raise InvalidInput("batch_size", f"contrastive training needs at least 2, got {self.batch_size}")
        if self.image_size % self.patch_size:
            raise InvalidInput("patch_size", f"{self.patch_size} does not divide image_size {self.image_size}")
        if self.hidden_size % self.heads:
            raise InvalidInput("heads", f"{self.heads} does not divide hidden_size {self.hidden_size}")
        if not 0.0 < self.init_temperature < 1.0:
            raise InvalidInput("init_temperature", f"must be in (0, 1), got {self.init_temperature!r}")


def new_vision_model(cfg: ClipTrainConfig, projection_dim: int) -> CLIPVisionModelWithProjection:
    """A random CLIP image tower (seeded, without touching the global RNG)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return CLIPVisionModelWithProjection(CLIPVisionConfig(
            image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_size=cfg.hidden_size,
            intermediate_size=4 * cfg.hidden_size, num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
            projection_dim=projection_dim))


def pixel_values(processor: ImageProcessor, images: np.ndarray) -> torch.Tensor:
    """uint8 (N, S, S, 3) at the encoder's size -> what `processor` makes of them (rescale, CLIP mean/std), without
    a PIL round trip per image. (N, 3, S, S)"""
    size = processor.crop_size["height"]
    if images.ndim != 4 or images.shape[1:] != (size, size, 3):
        raise InvalidInput("images", f"must be uint8 (N, {size}, {size}, 3), got {images.shape}")
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() * processor.rescale_factor
    mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def pooled_text(text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, captions: list[str]) -> torch.Tensor:
    """The frozen text encoder's pooled state (end-of-text token) of each caption. (C, W)"""
    return text_encoder(tokenize(tokenizer, captions)).pooler_output


def clip_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, caption_ids: torch.Tensor,
              logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE where every same-caption pair in the batch is a positive: the target of row i is uniform
    over the columns with i's caption. (Counting them as negatives would push apart images that must embed alike.)"""
    img = F.normalize(image_embeds, dim=-1)  # (B, P)
    txt = F.normalize(text_embeds, dim=-1)  # (B, P)
    logits = logit_scale.exp() * img @ txt.T  # (B, B): image i vs the caption of image j
    same = (caption_ids[:, None] == caption_ids[None, :]).float()  # (B, B), symmetric
    targets = same / same.sum(dim=1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


def train_clip(text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, images: np.ndarray, captions: list[str],
               cfg: ClipTrainConfig) -> tuple[CLIPVisionModelWithProjection, ImageProcessor, nn.Linear, dict]:
    """Train the image tower and the text projection; returns (vision model, processor, text_projection, stats).
    The text encoder stays frozen. Deterministic from `cfg.seed`."""
    if len(images) != len(captions) or len(images) < 2:
        raise InvalidInput("captions", f"{len(captions)} captions for {len(images)} images (need >= 2, one each)")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.monotonic()
    # 1. the text side, once: distinct captions through the frozen encoder
    distinct = sorted(set(captions))
    index = {c: i for i, c in enumerate(distinct)}
    caption_ids = torch.tensor([index[c] for c in captions])  # (N,)
    text_encoder.requires_grad_(False).eval()
    pooled = pooled_text(text_encoder, tokenizer, distinct)  # (C, W)
    width = pooled.shape[1]
    # 2. the trainable parts: image tower, CLIP's text projection, logit scale
    vision = new_vision_model(cfg, projection_dim=width)
    processor = new_image_processor(cfg.image_size)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    text_projection = nn.Linear(width, width, bias=False)
    with torch.no_grad():
        text_projection.weight.copy_(torch.randn(width, width, generator=g) * width**-0.5)  # CLIP's init
    logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.init_temperature)))
    params = [*vision.parameters(), *text_projection.parameters()]
    opt = torch.optim.AdamW([dict(params=params, weight_decay=cfg.weight_decay),
                             dict(params=[logit_scale], weight_decay=0.0)], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.warmup_steps, cfg.steps))
    # 3. the loop
    vision.train()
    deadline = None if cfg.minutes_budget is None else time.monotonic() + 60 * cfg.minutes_budget
    losses, step = [], 0
    bar = tqdm(range(cfg.steps), desc="clip", dynamic_ncols=True)
    for step in bar:
        idx = torch.randint(0, len(images), (cfg.batch_size,), generator=g)
        x = pixel_values(processor, images[idx.numpy()])  # (B, 3, S, S)
        ids = caption_ids[idx]  # (B,)
        loss = clip_loss(vision(pixel_values=x).image_embeds, text_projection(pooled[ids]), ids, logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            logit_scale.clamp_(max=math.log(cfg.max_logit_scale))
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", scale=f"{logit_scale.exp().item():.1f}")
        if deadline is not None and time.monotonic() > deadline:
            tqdm.write(f"minutes budget reached after {step + 1} steps: stopping early")
            break
    vision.requires_grad_(False).eval()
    text_projection.requires_grad_(False)
    stats = dict(steps=step + 1, seconds=time.monotonic() - t0, final_loss=float(np.mean(losses[-50:])),
                 losses=losses, logit_scale=float(logit_scale.detach().exp()), config=asdict(cfg))
    return vision, processor, text_projection, stats


@torch.no_grad()
def image_embeddings(vision: CLIPVisionModelWithProjection, processor: ImageProcessor, images: np.ndarray,
                     batch: int = 512) -> torch.Tensor:
    """`image_embeds` of uint8 images at the encoder's size, in batches (what `encode_images` gives). (N, P)"""
    out = [vision(pixel_values=pixel_values(processor, images[i : i + batch])).image_embeds
           for i in range(0, len(images), batch)]
    return torch.cat(out)


@torch.no_grad()
def retrieval_accuracy(image_embeds: torch.Tensor, true_captions: list[str], text_embeds: torch.Tensor,
                       candidates: list[str]) -> float:
    """Top-1 accuracy of picking each image's caption among `candidates` by cosine similarity."""
    sims = F.normalize(image_embeds, dim=-1) @ F.normalize(text_embeds, dim=-1).T  # (N, C)
    picked = sims.argmax(dim=1).tolist()
    return float(np.mean([candidates[j] == c for j, c in zip(picked, true_captions, strict=True)]))
