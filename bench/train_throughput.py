"""Trainer throughput vs a plain diffusers-style LoRA loop (same model, data, batch, LoRA settings).

The plain loop follows diffusers' examples/text_to_image/train_text_to_image_lora.py: every step loads and
transforms images, runs the VAE encoder and the text encoder, then the LoRA-UNet. Our trainer caches the frozen
parts' outputs once. Runs alternate (plain, ours, plain, ours, ...) so machine noise hits both; the ratio of medians
is printed. Goal: ≥ 1.3×.

    python bench/train_throughput.py [--model DIR_OR_HUB_ID] [--steps 30] [--repeats 3] [--images 32]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from minidalle import MiniDallePipeline
from minidalle.adapters import LoraSettings
from minidalle.data import load_image, scan_dataset
from minidalle.training import TrainConfig, train


def make_dataset(root: Path, n: int, size: int) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"a picture of thing number {i}")
    return root


def plain_loop(pipe: MiniDallePipeline, dataset: Path, steps: int, batch: int, resolution: int) -> float:
    """Seconds per step of the diffusers-example loop (after one warm-up step)."""
    from diffusers import DDPMScheduler

    examples = scan_dataset(dataset)
    unet, vae, te, tok = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    unet.add_adapter(LoraSettings().peft_config(), adapter_name="plain")
    unet.set_adapters(["plain"])
    params = [p for n, p in unet.named_parameters() if ".plain." in n]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-4)
    unet.train()
    times = []
    try:
        for step in range(steps + 1):
            t0 = time.perf_counter()
            idx = [(step * batch + j) % len(examples) for j in range(batch)]
            pixels = torch.stack([load_image(examples[i].path, resolution) for i in idx]).to(pipe.device, pipe.dtype)
            ids = tok([examples[i].caption for i in idx], padding="max_length", max_length=tok.model_max_length,
                      truncation=True, return_tensors="pt").input_ids.to(pipe.device)
            with torch.no_grad():
                latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
                hidden = te(ids)[0]
            noise = torch.randn_like(latents)
            t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,), device=pipe.device)
            noisy = noise_scheduler.add_noise(latents, noise, t)
            pred = unet(noisy, t, encoder_hidden_states=hidden).sample
            loss = F.mse_loss(pred.float(), noise.float())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad()
            if pipe.device.type == "cuda":
                torch.cuda.synchronize()
            if step:  # the first step warms up
                times.append(time.perf_counter() - t0)
    finally:
        unet.delete_adapters("plain")
        unet.requires_grad_(False).eval()
    return sum(times) / len(times)


def ours(pipe: MiniDallePipeline, dataset: Path, out: Path, steps: int, batch: int,
         resolution: int) -> tuple[float, float]:
    """(seconds per step in the loop, seconds per step including setup and caching)."""
    stamps: list[float] = []
    cfg = TrainConfig(dataset_dir=str(dataset), output_dir=str(out), steps=steps + 1, batch_size=batch,
                      resolution=resolution, checkpoint_every=0, resume=False, train_prior=True, caption_dropout=0.0)
    t0 = time.perf_counter()

    def on_progress(event):
        if event["type"] == "progress":
            stamps.append(time.perf_counter())

    train(cfg, pipeline=pipe, on_progress=on_progress)
    total = time.perf_counter() - t0
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1), total / (steps + 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args()
    pipe = MiniDallePipeline.from_pretrained(args.model)
    res = pipe.default_height
    with tempfile.TemporaryDirectory() as tmp:
        ds = make_dataset(Path(tmp) / "ds", args.images, res)
        plain, mine, mine_total = [], [], []
        for r in range(args.repeats):
            plain.append(plain_loop(pipe, ds, args.steps, args.batch, res))
            loop, total = ours(pipe, ds, Path(tmp) / f"out{r}", args.steps, args.batch, res)
            mine.append(loop)
            mine_total.append(total)
    p, m, mt = statistics.median(plain), statistics.median(mine), statistics.median(mine_total)
    print(f"model={pipe.model_id} device={pipe.device} batch={args.batch} steps={args.steps} repeats={args.repeats}")
    print(f"plain diffusers-style loop : {1 / p:8.2f} steps/s")
    print(f"minidalle trainer (cached) : {1 / m:8.2f} steps/s   ({1 / mt:.2f} steps/s counting setup + caching)")
    print(f"speed-up: {p / m:.2f}x in the loop, {p / mt:.2f}x end to end   (goal >= 1.3x)")


if __name__ == "__main__":
    main()
