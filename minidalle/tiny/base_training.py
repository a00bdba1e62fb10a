"""`minidalle train-base`: train the embedded "tiny-shapes" model from a seed, on CPU.

The same classes as SD 1.5 (AutoencoderKL, CLIPTextModel + CLIPTokenizer, UNet2DConditionModel, a DDIM scheduler),
only tiny, saved in the same folder layout, so `from_pretrained` loads it like a real checkpoint.

1. draw the shapes dataset (train combinations only; held-out combinations are never seen);
2. train the VAE (reconstruction MSE + a tiny KL), encode every image once to latents;
3. train the text encoder jointly with the UNet (ε-prediction MSE, 10 % caption dropout for classifier-free
   guidance, EMA weights), then freeze it — fine-tuning later treats it like the real, frozen CLIP;
4. save the folder (fp32 safetensors; the whole model is ~20 MB);
5. the image side (`train_image_side`, also alone on an existing model: `minidalle train-base --stages image`):
   a tiny CLIP vision tower + text projection, contrastive against the frozen text encoder
   (`minidalle.tiny.clip_training`); the diffusion prior on (caption, CLIP image embedding) pairs
   (`minidalle.tiny.prior_training`); the IP-Adapter head with everything else frozen
   (`minidalle.tiny.ip_training`); saved into the same folder (`image_encoder/`, `feature_extractor/`,
   `diffusion_prior/`, `ip_adapter/`).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from minidalle.errors import InvalidInput
from minidalle.tiny import shapes


@dataclass
class ImageSideConfig:
    seed: int = 0
    n_images: int = 20_000  # CLIP and the prior see ~190 captions: 20k images cover each ~100 times
    clip_steps: int | None = None  # None: each stage's own default (its config class says why)
    prior_steps: int | None = None
    ip_steps: int | None = None
    threads: int | None = None


@dataclass
class BaseTrainConfig:
    out: Path
    seed: int = 0
    resolution: int = 32  # 32 px: the recipe known to fit 60 CPU-minutes; 64 px costs ~4x per step
    n_images: int = 60_000
    # VAE
    vae_steps: int = 1500
    vae_batch: int = 32
    vae_lr: float = 3e-3
    vae_channels: tuple[int, ...] = (16, 32, 64)  # 3 blocks => latents are resolution / 4 (8x8x4 at 32 px)
    vae_norm_groups: int = 4  # few groups: per-channel norms (groups = channels) erase the flat colours
    kl_weight: float = 1e-6  # just enough to keep latents bounded; more blurs the edges the judge needs
    # text encoder + UNet
    unet_steps: int = 3500
    batch_size: int = 64
    lr: float = 5e-4
    warmup_steps: int = 200
    caption_dropout: float = 0.1  # the unconditional branch of classifier-free guidance is learned from these
    ema_decay: float = 0.999
    text_width: int = 64
    text_layers: int = 3
    unet_channels: tuple[int, ...] = (64, 128)
    unet_norm_groups: int = 8  # 8-16 channels per group, about SD's ratio (320 / 32)
    checkpoint_every: int = 1000  # save the EMA weights to `out` every N steps: a usable model before the end
    minutes_budget: float | None = None  # hard wall-clock cap on the UNet stage (stops early, still saves)
    threads: int | None = None
    # then the image side (train_image_side) on the saved base, with this config's seed and threads; None: not
    image_side: ImageSideConfig | None = field(default_factory=ImageSideConfig)

    def __post_init__(self):
        positive = ("n_images", "vae_steps", "vae_batch", "unet_steps", "batch_size", "text_width", "text_layers")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InvalidInput(name, f"must be a positive int, got {value!r}")
        if self.resolution not in (32, 64):
            raise InvalidInput("resolution", f"must be 32 or 64, got {self.resolution!r}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise InvalidInput("caption_dropout", f"must be in [0, 1), got {self.caption_dropout!r}")
        if not 0.0 < self.ema_decay < 1.0:
            raise InvalidInput("ema_decay", f"must be in (0, 1), got {self.ema_decay!r}")
        if self.minutes_budget is not None and self.minutes_budget <= 0:
            raise InvalidInput("minutes_budget", f"must be > 0, got {self.minutes_budget!r}")


def build_tokenizer() -> CLIPTokenizer:
    from minidalle.tiny.build import TINY_WORDS
    from minidalle.tiny.tokenizer import build_tokenizer as _build

    return _build(list(dict.fromkeys([*TINY_WORDS, *shapes.WORDS])))


def build_components(cfg: BaseTrainConfig) -> dict:
    """Randomly initialised tiny components (seeded)."""
    torch.manual_seed(cfg.seed)
    tokenizer = build_tokenizer()
    w = cfg.text_width
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=w, intermediate_size=4 * w, num_hidden_layers=cfg.text_layers,
        num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length, projection_dim=w,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    n = len(cfg.vae_channels)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=cfg.resolution,
        block_out_channels=cfg.vae_channels, layers_per_block=1, norm_num_groups=cfg.vae_norm_groups,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
    )
    with torch.no_grad():  # start with a near-deterministic posterior (std ~0.05): a std of 1 drowns the signal
        vae.quant_conv.bias[vae.config.latent_channels :] = -6.0  # and reconstructions stay noise for hundreds of steps
    unet = UNet2DConditionModel(
        sample_size=cfg.resolution // 2 ** (n - 1), in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=cfg.unet_channels, norm_num_groups=cfg.unet_norm_groups, cross_attention_dim=w,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * len(cfg.unet_channels),
        up_block_types=("CrossAttnUpBlock2D",) * len(cfg.unet_channels),
    )
    from minidalle.tiny.build import sd15_scheduler_config

    scheduler = DDIMScheduler(**sd15_scheduler_config())
    return dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, unet=unet, scheduler=scheduler)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, R, R, 3) -> float (N, 3, R, R) in [-1, 1], the range diffusers' VAEs use."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:  # linear warm-up, then cosine to 10 %
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    return f


def train_vae(vae: AutoencoderKL, images: np.ndarray, cfg: BaseTrainConfig) -> list[float]:
    g = torch.Generator().manual_seed(cfg.seed + 1)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(min(50, cfg.vae_steps // 10 + 1), cfg.vae_steps))
    vae.train()
    losses = []
    bar = tqdm(range(cfg.vae_steps), desc="vae", dynamic_ncols=True)
    for _ in bar:
        idx = torch.randint(0, len(images), (cfg.vae_batch,), generator=g).numpy()
        x = to_tensor(images[idx])  # (B, 3, R, R)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        loss = F.mse_loss(rec, x) + cfg.kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.5f}")
    vae.eval()
    return losses


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: np.ndarray, batch: int = 512) -> torch.Tensor:
    """Posterior means of every image, unscaled. (N, 4, R/4, R/4)"""
    out = [vae.encode(to_tensor(images[i : i + batch])).latent_dist.mean
           for i in tqdm(range(0, len(images), batch), desc="encode", dynamic_ncols=True)]
    return torch.cat(out)


def tokenize(tokenizer: CLIPTokenizer, texts: list[str]) -> torch.Tensor:
    return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def train_unet_and_text(
    unet: UNet2DConditionModel, text_encoder: CLIPTextModel, latents: torch.Tensor, ids: torch.Tensor,
    empty_ids: torch.Tensor, cfg: BaseTrainConfig, checkpoint=None,
) -> tuple[list[float], int]:
    """Joint ε-prediction training; afterwards both modules hold their EMA weights. Returns (losses, steps run)."""
    from minidalle.tiny.build import sd15_scheduler_config

    noise_sched = DDPMScheduler(**{k: v for k, v in sd15_scheduler_config().items() if k != "set_alpha_to_one"})
    g = torch.Generator().manual_seed(cfg.seed + 2)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.warmup_steps, cfg.unet_steps))
    ema = EMAModel(params, decay=cfg.ema_decay)
    unet.train()
    text_encoder.train()
    deadline = None if cfg.minutes_budget is None else time.monotonic() + 60 * cfg.minutes_budget
    losses, step = [], 0
    bar = tqdm(range(cfg.unet_steps), desc="unet+text", dynamic_ncols=True)
    for step in bar:
        idx = torch.randint(0, len(latents), (cfg.batch_size,), generator=g)
        x0 = latents[idx]  # (B, 4, 8, 8), already scaled
        tok = ids[idx].clone()
        drop = torch.rand(cfg.batch_size, generator=g) < cfg.caption_dropout
        tok[drop] = empty_ids
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (cfg.batch_size,), generator=g)
        cond = text_encoder(tok).last_hidden_state  # (B, 77, D)
        pred = unet(noise_sched.add_noise(x0, noise, t), t, cond).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema.step(params)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        if checkpoint is not None and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
            ema.store(params)
            ema.copy_to(params)
            checkpoint(step + 1)
            ema.restore(params)
        if deadline is not None and time.monotonic() > deadline:
            tqdm.write(f"minutes budget reached after {step + 1} steps: stopping early")
            break
    ema.copy_to(params)
    unet.eval()
    text_encoder.eval()
    return losses, step + 1


def save_model(components: dict, out: Path) -> Path:
    """Write the SD 1.5 folder layout plus `prior/` (identity: the base model has no trained prior)."""
    from minidalle.pipeline import MiniDallePipeline

    return MiniDallePipeline(**components, prior=None, model_id="tiny-shapes").save_pretrained(out)


def train_image_side(model_dir: Path, cfg: ImageSideConfig) -> dict:
    """Train the image side of the model in `model_dir` (its base stays as it is) and save it there."""
    from minidalle.diffusion_prior import new_tiny
    from minidalle.pipeline import MiniDallePipeline
    from minidalle.tiny.clip_training import ClipTrainConfig, image_embeddings, train_clip
    from minidalle.tiny.prior_training import PriorTrainConfig, train_diffusion_prior

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0, c0 = time.monotonic(), time.process_time()
    timings: dict[str, float] = {}
    pipe = MiniDallePipeline.from_pretrained(model_dir, device="cpu")
    pipe.set_image_tokens(False)
    images, combos = shapes.make_dataset(cfg.n_images, seed=cfg.seed + 10, split="train",
                                         resolution=pipe.default_height, progress=True)
    captions = [c.caption for c in combos]
    steps = lambda n: {} if n is None else {"steps": n}  # noqa: E731
    # 5a. CLIP: the vision tower and the text projection
    t = time.monotonic()
    vision, processor, text_projection, clip_stats = train_clip(
        pipe.text_encoder, pipe.tokenizer, images, captions, ClipTrainConfig(seed=cfg.seed, **steps(cfg.clip_steps)))
    embeds = image_embeddings(vision, processor, images)  # (N, P)
    timings["clip_s"] = time.monotonic() - t
    # 5b. the diffusion prior on (caption, image embedding) pairs
    t = time.monotonic()
    distinct = sorted(set(captions))
    index = {c: i for i, c in enumerate(distinct)}
    with torch.random.fork_rng(devices=[]):  # its init from the seed, not from whatever this process drew before:
        torch.manual_seed(cfg.seed)  # `--stages image` alone and after the base make the same prior
        prior = new_tiny(embeds.shape[1], text_projection=text_projection.weight.detach())
    prior_stats = train_diffusion_prior(prior, pipe.text_encoder, pipe.tokenizer, distinct,
                                        torch.tensor([index[c] for c in captions]), embeds,
                                        PriorTrainConfig(seed=cfg.seed, **steps(cfg.prior_steps)))
    timings["prior_s"] = time.monotonic() - t
    # 5c. the IP-Adapter head, the UNet, VAE and text encoder frozen
    from minidalle.tiny.ip_training import IpTrainConfig, train_ip_adapter

    t = time.monotonic()
    latents = encode_latents(pipe.vae, images) * pipe.vae.config.scaling_factor
    ids = tokenize(pipe.tokenizer, captions)
    empty_ids = tokenize(pipe.tokenizer, [""])[0]
    ip_state, ip_stats = train_ip_adapter(pipe.unet, pipe.text_encoder, latents, ids, empty_ids, embeds,
                                          IpTrainConfig(seed=cfg.seed, **steps(cfg.ip_steps)))
    timings["ip_s"] = time.monotonic() - t
    # 6. save: the base as it was, plus the image side. Loaded afresh: training attached the IP-Adapter to `pipe`'s
    # UNet behind the pipeline's back, and `load_ip_adapter` must see the plain processors to switch back to
    base = MiniDallePipeline.from_pretrained(model_dir, device="cpu")
    full = MiniDallePipeline(**base.components, image_encoder=vision, feature_extractor=processor,
                             diffusion_prior=prior.eval(), model_id=base.model_id)
    full.load_ip_adapter(ip_state)
    full.save_pretrained(model_dir)
    timings["total_s"] = time.monotonic() - t0
    timings["cpu_s"] = time.process_time() - c0  # every thread's CPU time: the budget is in CPU-minutes
    drop = ("losses", "config")
    return dict(out=str(model_dir), timings=timings, n_images=cfg.n_images, threads=torch.get_num_threads(),
                clip={k: v for k, v in clip_stats.items() if k not in drop},
                prior={k: v for k, v in prior_stats.items() if k not in drop},
                ip={k: v for k, v in ip_stats.items() if k not in drop}, config=asdict(cfg))


def train_base(cfg: BaseTrainConfig) -> dict:
    """Run every stage; returns timings, losses summary and the output folder."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0, c0 = time.monotonic(), time.process_time()
    timings = {}
    # 1. data
    images, combos = shapes.make_dataset(cfg.n_images, seed=cfg.seed, split="train", resolution=cfg.resolution,
                                         progress=True)
    timings["data_s"] = time.monotonic() - t0
    comp = build_components(cfg)
    # 2. VAE
    t = time.monotonic()
    vae_losses = train_vae(comp["vae"], images, cfg)
    comp["vae"].requires_grad_(False)
    latents = encode_latents(comp["vae"], images)
    scaling = float(1.0 / latents.std())  # SD's convention: unit-variance latents for the UNet
    comp["vae"].register_to_config(scaling_factor=scaling)
    latents = latents * scaling
    timings["vae_s"] = time.monotonic() - t
    tqdm.write(f"vae: {timings['vae_s']:.0f}s, final loss {np.mean(vae_losses[-50:]):.5f}, scaling {scaling:.3f}")
    # 3. text encoder + UNet
    t = time.monotonic()
    tok = comp["tokenizer"]
    captions = sorted({c.caption for c in combos})
    cap_ids = tokenize(tok, captions)
    index = {c: i for i, c in enumerate(captions)}
    ids = cap_ids[torch.tensor([index[c.caption] for c in combos])]  # (N, 77)
    empty_ids = tokenize(tok, [""])[0]
    def checkpoint(step: int) -> None:
        save_model(comp, cfg.out)  # the pipeline freezes what it is given: hand the modules back to training
        comp["unet"].requires_grad_(True).train()
        comp["text_encoder"].requires_grad_(True).train()
        tqdm.write(f"checkpoint: step {step} saved to {cfg.out} ({(time.monotonic() - t0) / 60:.1f} min)")

    unet_losses, steps = train_unet_and_text(comp["unet"], comp["text_encoder"], latents, ids, empty_ids, cfg,
                                             checkpoint=checkpoint)
    timings["unet_s"] = time.monotonic() - t
    tqdm.write(f"unet+text: {timings['unet_s']:.0f}s for {steps} steps, final loss {np.mean(unet_losses[-100:]):.4f}")
    # 4. save
    comp["text_encoder"].requires_grad_(False)
    save_model(comp, cfg.out)
    tqdm.write(f"saved {cfg.out} in {(time.monotonic() - t0) / 60:.1f} min total")
    result = dict(out=str(cfg.out), steps=steps, timings=timings, vae_loss=float(np.mean(vae_losses[-50:])),
                  unet_loss=float(np.mean(unet_losses[-100:])), threads=torch.get_num_threads(),
                  config={k: str(v) for k, v in asdict(cfg).items()})
    if cfg.image_side is not None:
        side = replace(cfg.image_side, seed=cfg.seed, threads=cfg.threads)
        result["image_side"] = train_image_side(Path(cfg.out), side)
    timings["total_s"] = time.monotonic() - t0  # the whole run, the image side included
    timings["cpu_s"] = time.process_time() - c0
    write_provenance(Path(cfg.out), result)
    return result


def write_provenance(model_dir: Path, result: dict) -> None:
    """training.json: how the folder was made (loaders ignore it). Not where: the folder may be shipped."""
    def public(d):
        return {k: public(v) if isinstance(v, dict) else v for k, v in d.items() if k != "out"}

    (model_dir / "training.json").write_text(json.dumps(public(result), indent=2, default=str))
