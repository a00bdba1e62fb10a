"""MiniDallePipeline vs diffusers' StableDiffusionPipeline: same components, same request, time per image.

Both pipelines share the very same modules; repeats are interleaved (A B, B A, …) so drift in machine load hits
both sides alike; the ratio is the median over repeats of time(minidalle) / time(diffusers). Goal: ≤ 1.02× (the
prior and the bookkeeping around diffusers' loop cost next to nothing). The pixels of both sides are compared too.

    python bench/pipeline_vs_diffusers.py                      # the embedded tiny model, CPU or GPU
    python bench/pipeline_vs_diffusers.py --sd15-random        # SD 1.5's real architecture, random weights (GPU)
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

GOAL = 1.02

# SD 1.5's component configs (runwayml/stable-diffusion-v1-5), written out so no download is needed
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, act_fn="silu", center_input_sample=False,
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=1, norm_eps=1e-5,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=512, layers_per_block=2, norm_num_groups=32,
    block_out_channels=(128, 256, 512, 512), act_fn="silu",
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)
SD15_TEXT = dict(  # CLIP ViT-L/14's text tower
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
)


def sd15_random_components(device: torch.device, dtype: torch.dtype) -> dict:
    """SD 1.5's architecture with random weights, built directly on the device (no download, no checkpoint)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from minidalle.tiny.build import TINY_WORDS, sd15_scheduler_config
    from minidalle.tiny.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(TINY_WORDS)  # ids stay < 49408; the text encoder's cost does not depend on them
    torch.manual_seed(0)
    with torch.device(device):
        text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT, bos_token_id=tokenizer.bos_token_id,
                                                    eos_token_id=tokenizer.eos_token_id,
                                                    pad_token_id=tokenizer.pad_token_id))
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(**SD15_VAE)
    for m in (text_encoder, unet, vae):
        m.to(dtype=dtype).eval()
    return dict(tokenizer=tokenizer, text_encoder=text_encoder, prior=None, unet=unet, vae=vae,
                scheduler=DDIMScheduler(**sd15_scheduler_config()))


def build(args):
    from diffusers import StableDiffusionPipeline

    from minidalle.pipeline import MiniDallePipeline, resolve_device, resolve_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.sd15_random:
        mini = MiniDallePipeline(**sd15_random_components(device, dtype), model_id="sd15-random")
    else:
        mini = MiniDallePipeline.from_pretrained(args.model, torch_dtype=dtype, device=device)
    c = mini.components
    stock = StableDiffusionPipeline(vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"],
                                    unet=c["unet"], scheduler=c["scheduler"], safety_checker=None,
                                    feature_extractor=None, requires_safety_checker=False)
    stock.set_progress_bar_config(disable=True)
    return mini, stock, device


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder or hub id (default: the embedded model)")
    ap.add_argument("--sd15-random", action="store_true", help="SD 1.5 architecture with random weights")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default 20 tiny, 25 sd15)")
    ap.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's)")
    ap.add_argument("--batch", type=int, default=1, help="images per request")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from minidalle.cli.commands import quiet_libraries

    quiet_libraries()
    mini, stock, device = build(args)
    steps = args.steps or (25 if args.sd15_random else 20)
    size = args.size or mini.default_height
    prompt, negative, seed = "a red circle on a white background", "blurry", 1234
    request = dict(num_inference_steps=steps, guidance_scale=7.5, height=size, width=size,
                   num_images_per_prompt=args.batch)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def run_mini():
        return mini(prompt, negative, seed=seed, **request).images

    def run_stock():
        gens = [torch.Generator("cpu").manual_seed(seed + i) for i in range(args.batch)]
        return stock(prompt, negative_prompt=negative, generator=gens, **request).images

    def timed(fn):
        sync()
        t0 = time.perf_counter()
        images = fn()
        sync()
        return time.perf_counter() - t0, images

    for fn in (run_mini, run_stock):  # warm-up: kernels, allocator, the model hash
        fn()
    times = {"minidalle": [], "diffusers": []}
    identical = True
    for r in range(args.repeats):
        order = [("minidalle", run_mini), ("diffusers", run_stock)]
        results = {}
        for name, fn in (order if r % 2 == 0 else order[::-1]):
            dt, results[name] = timed(fn)
            times[name].append(dt)
        a = np.stack([np.asarray(im) for im in results["minidalle"]])
        b = np.stack([np.asarray(im) for im in results["diffusers"]])
        identical &= bool(np.array_equal(a, b))
    med = {k: statistics.median(v) for k, v in times.items()}
    # each repeat's pair ran back to back under the same load: the median of the pair ratios is the steadiest figure
    ratio = statistics.median(m / d for m, d in zip(times["minidalle"], times["diffusers"], strict=True))
    model = "sd15-random" if args.sd15_random else mini.model_id
    print(f"model {model}  device {device} {mini.dtype}  {size}x{size}  steps {steps}  batch {args.batch}  "
          f"repeats {args.repeats}")
    for k, v in med.items():
        print(f"  {k:<10} median {v * 1000:9.1f} ms   (min {min(times[k]) * 1000:.1f}, max {max(times[k]) * 1000:.1f})")
    print(f"  ratio of medians: {med['minidalle'] / med['diffusers']:.3f}x")
    print(f"  pixels identical: {identical}")
    verdict = "PASS" if ratio <= GOAL else "FAIL"
    print(f"ratio minidalle/diffusers (median of paired runs) = {ratio:.3f}x   goal <= {GOAL:.2f}x   {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
