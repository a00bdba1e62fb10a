"""Train a `DiffusionPrior` on (caption, CLIP image embedding) pairs: the tiny-shapes rig's text → image-embedding
stage, on CPU in minutes.

1. encode every distinct caption once (the text encoder is frozen, and the shapes captions number a few hundred),
   plus the empty prompt, the unconditional branch of classifier-free guidance;
2. standardise the embeddings with the training data's per-dimension statistics (`set_embedding_stats`);
3. AdamW on the x₀-prediction loss, warmup then cosine decay, EMA weights copied in at the end.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from minidalle.diffusion_prior import DiffusionPrior, PriorCondition
from minidalle.errors import InvalidInput

ProgressCallback = Callable[[int, int, float], None]  # (step, total, loss); raise minidalle.Cancelled to stop


@dataclass
class PriorTrainConfig:
    seed: int = 0
    steps: int = 6000  # ~4 CPU-minutes at batch 64, 1 thread (~25 steps/s); 8000 judged no better (README)
    batch_size: int = 64  # pairs per step: enough for a stable x₀ loss, small enough for ~15 steps/s on a CPU
    lr: float = 1e-3  # a 0.2 M-parameter transformer: DALLE2-pytorch's 1.1e-4 is for 300 M+ and crawls here
    warmup_steps: int = 200  # attention with fresh LayerNorms is touchy for the first few hundred Adam steps
    weight_decay: float = 0.01  # light: the targets are few and exact, there is little to regularise away
    max_grad_norm: float = 1.0  # DALLE2-pytorch clips too (0.5); guards the rare high-noise-timestep spike
    min_lr_fraction: float = 0.1  # cosine decays to 10 % of lr: the late, small steps are where x̂₀ gets precise
    ema_decay: float = 0.999  # averages the last ~1000 steps: smooths the noisy per-step updates of a tiny batch
    cond_drop_prob: float = 0.1  # DALLE2-pytorch's cond_drop_prob: teaches the unconditional branch for guidance
    fit_embedding_stats: bool = True  # standardise with this data's mean/std; False keeps the prior's (fine-tuning)
    minutes_budget: float | None = None  # wall-clock cap: stops early, still applies the EMA weights
    threads: int | None = None  # torch.set_num_threads for the run (None: leave as is)

    def __post_init__(self):
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InvalidInput(name, f"must be a positive int, got {value!r}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise InvalidInput("warmup_steps", f"must be a non-negative int, got {self.warmup_steps!r}")
        if not self.lr > 0:
            raise InvalidInput("lr", f"must be > 0, got {self.lr!r}")
        if not 0.0 <= self.cond_drop_prob < 1.0:
            raise InvalidInput("cond_drop_prob", f"must be in [0, 1), got {self.cond_drop_prob!r}")
        if not 0.0 < self.ema_decay < 1.0:
            raise InvalidInput("ema_decay", f"must be in (0, 1), got {self.ema_decay!r}")
        if not 0.0 <= self.min_lr_fraction <= 1.0:
            raise InvalidInput("min_lr_fraction", f"must be in [0, 1], got {self.min_lr_fraction!r}")
        if self.minutes_budget is not None and self.minutes_budget <= 0:
            raise InvalidInput("minutes_budget", f"must be > 0, got {self.minutes_budget!r}")


def encode_captions(prior: DiffusionPrior, text_encoder, tokenizer, captions: list[str], *,
                    chunk: int = 256) -> tuple[PriorCondition, PriorCondition]:
    """(conditions of every caption (C, …), the empty prompt's condition (1, …)), computed once."""
    parts = [prior.encode_prompt(captions[i:i + chunk], text_encoder=text_encoder, tokenizer=tokenizer)
             for i in range(0, len(captions), chunk)]
    return PriorCondition.cat(parts), prior.encode_prompt([""], text_encoder=text_encoder, tokenizer=tokenizer)


def _check_data(prior: DiffusionPrior, captions: list[str], caption_index: torch.Tensor,
                image_embeds: torch.Tensor) -> None:
    if not captions:
        raise InvalidInput("captions", "must not be empty")
    if caption_index.ndim != 1 or caption_index.dtype != torch.long:
        raise InvalidInput("caption_index", f"must be a 1-D LongTensor, got {caption_index.dtype} "
                           f"{tuple(caption_index.shape)}")
    if len(caption_index) != len(image_embeds):
        raise InvalidInput("caption_index", f"{len(caption_index)} indices for {len(image_embeds)} image embeddings")
    if len(caption_index) < 2:
        raise InvalidInput("image_embeds", "need at least 2 embeddings (their mean and std standardise the prior)")
    if caption_index.min() < 0 or caption_index.max() >= len(captions):
        raise InvalidInput("caption_index", f"values must lie in [0, {len(captions)}), got "
                           f"[{int(caption_index.min())}, {int(caption_index.max())}]")
    prior._check_embeds(image_embeds, "image_embeds")


def _lr_factor(step: int, cfg: PriorTrainConfig) -> float:
    """Linear warmup, then cosine from 1 down to `min_lr_fraction`."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_fraction + (1 - cfg.min_lr_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


def train_diffusion_prior(prior: DiffusionPrior, text_encoder, tokenizer, captions: list[str],
                          caption_index: torch.Tensor, image_embeds: torch.Tensor, cfg: PriorTrainConfig, *,
                          progress: bool = True, on_progress: ProgressCallback | None = None) -> dict:
    """Train `prior` in place on pairs (captions[caption_index[i]], image_embeds[i]); returns the run's stats."""
    _check_data(prior, captions, caption_index, image_embeds)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)  # anything inside torch that draws without our generator (none today) is seeded too
    gen = torch.Generator().manual_seed(cfg.seed)
    start = time.perf_counter()
    # 1. conditions, once per distinct caption
    text_encoder.requires_grad_(False).eval()
    conds, uncond = encode_captions(prior, text_encoder, tokenizer, captions)
    encode_s = time.perf_counter() - start
    # 2. unit-scale targets
    image_embeds = image_embeds.to(device=prior.device, dtype=torch.float32)
    if cfg.fit_embedding_stats:
        prior.set_embedding_stats(image_embeds)
    # 3. the loop
    prior.cond_drop_prob = cfg.cond_drop_prob
    prior.train().requires_grad_(True)
    params = prior.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg))
    ema = EMAModel(params, decay=cfg.ema_decay)
    losses: list[float] = []
    deadline = start + 60 * cfg.minutes_budget if cfg.minutes_budget else math.inf
    bar = tqdm(range(cfg.steps), desc="diffusion prior", disable=not progress)
    for step in bar:
        rows = torch.randint(0, len(image_embeds), (cfg.batch_size,), generator=gen)  # (B,)
        cond = conds[caption_index[rows]]
        loss = prior.loss(image_embeds[rows.to(prior.device)], cond, uncond, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        ema.step(params)
        losses.append(loss.item())
        if step % 25 == 0:
            bar.set_postfix(loss=f"{sum(losses[-100:]) / len(losses[-100:]):.4f}")
        if on_progress is not None:
            on_progress(step + 1, cfg.steps, losses[-1])
        if time.perf_counter() > deadline:
            break
    bar.close()
    ema.copy_to(params)
    prior.eval().requires_grad_(False)
    head, tail = losses[:100], losses[-100:]
    return {"steps": len(losses), "captions": len(captions), "pairs": len(image_embeds),
            "loss_first100": sum(head) / len(head), "loss_last100": sum(tail) / len(tail),
            "losses": losses, "timings": {"encode_s": encode_s, "total_s": time.perf_counter() - start},
            "config": asdict(cfg)}
