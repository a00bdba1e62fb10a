"""Train an IP-Adapter head on the frozen tiny-shapes UNet: the CLIP image embedding of an image becomes 4 extra
cross-attention tokens (diffusers' `ImageProjection` + `IPAdapterAttnProcessor2_0`).

The objective is base training's own (ε-prediction MSE under SD 1.5's noise schedule, see
`base_training.train_unet_and_text`); only `ip_adapter_parameters(unet)` learn. Each example is conditioned on
- its caption's text states, replaced by the empty prompt's with p = `text_dropout`: then the image tokens alone
  must say what to draw, which is what a variation (prompt "") asks of them;
- the CLIP image embedding of the same image, replaced by zeros with p = `image_dropout`: zeros are what diffusers
  feeds the unconditional branch of guidance (`prepare_ip_adapter_image_embeds`), so that branch is trained too.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from tqdm.auto import tqdm
from transformers import CLIPTextModel

from minidalle.errors import InvalidInput
from minidalle.image_conditioning import (
    attach_ip_adapter,
    ip_adapter_parameters,
    ip_adapter_state,
    new_ip_adapter_state,
)
from minidalle.tiny.base_training import _lr_lambda
from minidalle.tiny.build import sd15_scheduler_config


@dataclass
class IpTrainConfig:
    seed: int = 0
    steps: int = 1200  # ~8 CPU-minutes; 1500 kept variations' shape 96.9 % vs 95.3 %, but not in the budget
    batch_size: int = 64  # base training's batch: the same gradient noise the UNet was trained under
    lr: float = 5e-3  # a head of ~0.2 M weights on a frozen net (IP-Adapter's 1e-4 is for SD's 22 M): measured
    #                   better than 1e-3 and no worse than 1e-2 on `quick_check`'s image-only loss
    warmup_steps: int = 100
    weight_decay: float = 0.01
    # caption -> "": only then must the image tokens carry shape, colour and background. Measured on the image-only
    # loss after 200 steps: 0.034 (p = 0.3), 0.031 (0.7), 0.029 (0.9); but at 0.9 the image tokens start to hurt
    # when a caption is given too (text + image 0.028 vs text alone 0.023), at 0.7 barely (0.024)
    text_dropout: float = 0.7
    image_dropout: float = 0.1  # embedding -> zeros: diffusers' unconditional image branch
    minutes_budget: float | None = None  # hard wall-clock cap (stops early, still returns the state)
    threads: int | None = None

    def __post_init__(self):
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InvalidInput(name, f"must be a positive int, got {value!r}")
        for name in ("text_dropout", "image_dropout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise InvalidInput(name, f"must be in [0, 1], got {value!r}")


def noise_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**{k: v for k, v in sd15_scheduler_config().items() if k != "set_alpha_to_one"})


@torch.no_grad()
def text_states(text_encoder: CLIPTextModel, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen encoder's last_hidden_state of each distinct token row, once: (table (U, 77, D), row of each
    example (N,)). Captions repeat thousands of times; the encoder would recompute the same states every step."""
    distinct, inverse = torch.unique(ids, dim=0, return_inverse=True)
    table = torch.cat([text_encoder(distinct[i : i + 256]).last_hidden_state for i in range(0, len(distinct), 256)])
    return table, inverse


def _loss(unet, sched, x0, text, image, noise, t) -> torch.Tensor:
    noisy = sched.add_noise(x0, noise, t)
    pred = unet(noisy, t, text, added_cond_kwargs={"image_embeds": [image[:, None]]}).sample  # (B, 4, h, w)
    return F.mse_loss(pred, noise)


def train_ip_adapter(unet: UNet2DConditionModel, text_encoder: CLIPTextModel, latents: torch.Tensor,
                     ids: torch.Tensor, empty_ids: torch.Tensor, image_embeds: torch.Tensor, cfg: IpTrainConfig,
                     ) -> tuple[dict[str, torch.Tensor], dict]:
    """Attach a fresh (seeded) IP-Adapter to `unet` and train it; returns (flat state, stats). `latents` are
    scaled (N, 4, h, w), `ids` the caption tokens (N, 77), `image_embeds` the CLIP embedding of each image (N, P).
    The UNet keeps the trained adapter attached; its own weights and the text encoder's do not change."""
    n = len(latents)
    if not (len(ids) == len(image_embeds) == n) or n < 1:
        raise InvalidInput("image_embeds", f"{len(image_embeds)} embeddings, {len(ids)} captions, {n} latents: "
                           "one of each per image")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.monotonic()
    # 1. frozen parts; the text side computed once
    unet.requires_grad_(False).eval()
    text_encoder.requires_grad_(False).eval()
    table, rows = text_states(text_encoder, ids)  # (U, 77, D), (N,)
    empty = text_encoder(empty_ids[None]).last_hidden_state.detach()  # (1, 77, D)
    # 2. a fresh head, trainable
    g = torch.Generator().manual_seed(cfg.seed)
    attach_ip_adapter(unet, new_ip_adapter_state(unet, image_embeds.shape[1], generator=g))
    params = ip_adapter_parameters(unet)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.warmup_steps, cfg.steps))
    sched = noise_scheduler()
    check = _check_batch(latents, table[rows[:256]], image_embeds[:256], empty, seed=cfg.seed + 7,
                         timesteps=sched.config.num_train_timesteps)
    before = quick_check(unet, sched, **check)
    # 3. the loop
    deadline = None if cfg.minutes_budget is None else time.monotonic() + 60 * cfg.minutes_budget
    losses, step = [], 0
    bar = tqdm(range(cfg.steps), desc="ip-adapter", dynamic_ncols=True)
    for step in bar:
        idx = torch.randint(0, n, (cfg.batch_size,), generator=g)
        text = table[rows[idx]]  # (B, 77, D)
        drop_text = torch.rand(cfg.batch_size, generator=g) < cfg.text_dropout
        text = torch.where(drop_text[:, None, None], empty, text)
        image = image_embeds[idx]  # (B, P)
        drop_image = torch.rand(cfg.batch_size, generator=g) < cfg.image_dropout
        image = torch.where(drop_image[:, None], torch.zeros_like(image), image)
        noise = torch.randn(latents[idx].shape, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (cfg.batch_size,), generator=g)
        loss = _loss(unet, sched, latents[idx], text, image, noise, t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lr_sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        if deadline is not None and time.monotonic() > deadline:
            tqdm.write(f"minutes budget reached after {step + 1} steps: stopping early")
            break
    for p in params:
        p.requires_grad_(False)
    after = quick_check(unet, sched, **check)
    stats = dict(steps=step + 1, seconds=time.monotonic() - t0, final_loss=float(np.mean(losses[-100:])),
                 losses=losses, check_before=before, check_after=after, config=asdict(cfg))
    return ip_adapter_state(unet), stats


def _check_batch(latents, text, image_embeds, empty, *, seed: int, timesteps: int) -> dict:
    """A fixed batch (the first examples, fixed noise and timesteps) for `quick_check`."""
    g = torch.Generator().manual_seed(seed)
    x0 = latents[: len(text)]
    return dict(x0=x0, text=text, image=image_embeds, empty=empty, noise=torch.randn(x0.shape, generator=g),
                t=torch.randint(0, timesteps, (len(x0),), generator=g))


@torch.no_grad()
def quick_check(unet, sched, *, x0, text, image, empty, noise, t) -> dict[str, float]:
    """ε-MSE on a fixed batch under four conditionings. With the empty prompt, `image` well below `no_image`
    (zeros) and `shuffled` (another example's embedding) means the image tokens carry what is in the picture."""
    empty = empty.expand(len(x0), -1, -1)
    shuffled = image.roll(1, dims=0)  # the batch is random draws: a neighbour is (almost always) another picture
    return dict(text_only=_loss(unet, sched, x0, text, torch.zeros_like(image), noise, t).item(),
                text_and_image=_loss(unet, sched, x0, text, image, noise, t).item(),
                image=_loss(unet, sched, x0, empty, image, noise, t).item(),
                shuffled=_loss(unet, sched, x0, empty, shuffled, noise, t).item(),
                no_image=_loss(unet, sched, x0, empty, torch.zeros_like(image), noise, t).item())
