"""The GPU figures in one command: SD 1.5's real architecture with random weights (no download), measured side by side.

    python bench/gpu.py                                  # on a CUDA machine: 512², 25 steps, guidance 7.5, fp16
    python bench/gpu.py --size 64 --steps 2 --batches 1,2 --train-steps 2 --service-model embedded   # a CPU check

Prints, then one JSON line at the end:
- s/image at each batch size for stock diffusers' StableDiffusionPipeline (eager, plain) and MiniDallePipeline
  with the fast path the workers use (eager; and compiled with `--compile`), the same weights, interleaved
  repeats; the pixels are compared (bit-identical with the fast path off);
- peak memory (CUDA: max allocated; CPU: the process's peak RSS);
- LoRA (+ prior) fine-tune samples/s with cached latents (the project's Trainer on a synthetic dataset);
- the HTTP service end to end: POST /generate?wait= through uvicorn, Redis and one Celery worker, s/image.

`--fast-path auto|on|off`: channels-last, fused q/k/v, VAE slicing and tiling for our pipeline (auto: on for
CUDA, as the workers do); `--compile`: also torch.compile our UNet (its own leg; the service's worker too).
Goals on an H200: batch 1 <= 0.25 s/image, batched <= 0.12 s/image, LoRA training >= 60 samples/s at 512².
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests"))  # the process helpers the tests use

from pipeline_vs_diffusers import sd15_random_components  # noqa: E402

GOALS = {"batch1_s_per_image": 0.25, "batched_s_per_image": 0.12, "train_samples_per_s": 60.0}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def build(args, device, dtype):
    import copy

    from diffusers import StableDiffusionPipeline

    from minidalle.pipeline import MiniDallePipeline

    mini = MiniDallePipeline(**sd15_random_components(device, dtype), model_id="sd15-random")
    c = {k: copy.deepcopy(v) if k in ("unet", "vae", "text_encoder") else v for k, v in mini.components.items()}
    stock = StableDiffusionPipeline(vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"],
                                    unet=c["unet"], scheduler=c["scheduler"], safety_checker=None,
                                    feature_extractor=None, requires_safety_checker=False)  # plain: its own modules
    stock.set_progress_bar_config(disable=True)
    on = args.fast_path == "on" or (args.fast_path == "auto" and device.type == "cuda")
    knobs = mini.enable_fast_path(channels_last=on, fuse_qkv=on, vae_slicing=on, vae_tiling=on)
    return mini, stock, knobs


def time_generation(args, mini, stock, device, *, leg: str = "minidalle", with_stock: bool = True) -> dict:
    """s/image per batch size, ours (as `leg`) vs stock, interleaved; the largest pixel difference between the two."""
    prompt, seed = "a red circle on a white background", 1234
    out: dict = {}
    for batch in args.batches:
        req = dict(num_inference_steps=args.steps, guidance_scale=7.5, height=args.size, width=args.size)

        def ours(batch=batch, req=req):
            return mini([prompt] * batch, seed=seed, output_type="np", **req).images

        def theirs(batch=batch, req=req):
            gens = [torch.Generator("cpu").manual_seed(seed + i) for i in range(batch)]
            return stock([prompt] * batch, generator=gens, output_type="np", **req).images

        legs = [(ours, [])] + ([(theirs, [])] if with_stock else [])
        for fn, _ in legs:
            fn()  # warm-up (and compilation)
        for _ in range(args.repeats):
            for fn, times in legs:
                sync(device)
                t0 = time.perf_counter()
                images = fn()
                sync(device)
                times.append(time.perf_counter() - t0)
        row = {f"{leg}_s_per_image": round(statistics.median(legs[0][1]) / batch, 4), "images": len(images)}
        if with_stock:
            diff = float(np.abs(np.asarray(ours(), dtype=np.float32) - np.asarray(theirs(), dtype=np.float32)).max())
            row.update(diffusers_s_per_image=round(statistics.median(legs[1][1]) / batch, 4),
                       max_pixel_diff_255=round(diff * 255, 3))
        out[batch] = row
        print(f"batch {batch:>2}: " + ", ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    return out


def time_training(args, mini, tmp: Path) -> dict:
    from PIL import Image

    from minidalle.training import TrainConfig, Trainer

    data = tmp / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (args.size, args.size, 3), dtype=np.uint8)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"a zorb number {i}")
    config = TrainConfig(dataset_dir=str(data), output_dir=str(tmp / "adapter"), steps=args.train_steps + 1,
                         batch_size=args.train_batch, resolution=args.size, checkpoint_every=0, resume=False)
    times: list[float] = []
    last = [time.perf_counter()]

    def on_progress(event: dict) -> None:
        if event.get("type") == "progress":
            sync(mini.device)
            now = time.perf_counter()
            times.append(now - last[0])
            last[0] = now

    trainer = Trainer(config, pipeline=mini, on_progress=on_progress)
    try:
        trainer.setup()  # caches the frozen encoders' outputs: not part of the steady state
        last[0] = time.perf_counter()
        trainer.train()
    finally:
        trainer.teardown()
    step_s = statistics.median(times[1:]) if len(times) > 1 else times[0]
    result = {"batch": args.train_batch, "step_s": round(step_s, 4),
              "samples_per_s": round(args.train_batch / step_s, 2)}
    print(f"training: {result['samples_per_s']} samples/s (batch {args.train_batch}, {result['step_s']} s/step)",
          flush=True)
    return result


def time_service(args, stock, tmp: Path) -> dict:
    """POST /generate?wait= through the real service (uvicorn, Redis, one worker) on the same model."""
    from _support.servers import Stack

    model = ""  # the embedded model
    if args.service_model == "same":
        stock.save_pretrained(tmp / "model", safe_serialization=True)  # the plain modules: a stock SD 1.5 folder
        model = str(tmp / "model")
    body = {"prompt": "a red circle on a white background", "num_inference_steps": args.steps, "seed": 1,
            "guidance_scale": 7.5}
    if args.service_model == "same":
        body.update(width=args.size, height=args.size)
    stack = Stack(tmp / "stack", workers={"w1": "generate"}, MINIDALLE_MODEL=model,
                  MINIDALLE_COMPILE_UNET=str(args.compile).lower(),
                  MINIDALLE_GENERATE_TIME_LIMIT_S="3600", MINIDALLE_MAX_STEPS="1000",
                  MINIDALLE_DEFAULT_STEP_S="0.01", MINIDALLE_MAX_WAIT_S="600")
    try:
        times = []
        for i in range(args.repeats + 1):
            t0 = time.perf_counter()
            r = stack.http.post("/generate", params={"wait": 600}, json={**body, "seed": i}, timeout=700)
            assert r.status_code == 200 and r.json()["job"]["state"] == "succeeded", r.text[:300]
            png = stack.http.get(r.json()["job"]["result"]["images"][0]["url"])
            assert png.status_code == 200
            times.append(time.perf_counter() - t0)
    finally:
        stack.stop()
    result = {"model": args.service_model, "s_per_image": round(statistics.median(times[1:]), 4)}
    print(f"service end to end ({args.service_model} model): {result['s_per_image']} s/image", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--batches", type=lambda t: [int(x) for x in t.split(",")], default=[1, 4, 8, 16])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"], help="default: fp16 on CUDA")
    ap.add_argument("--train-steps", type=int, default=20)
    ap.add_argument("--train-batch", type=int, default=4)
    ap.add_argument("--service-model", choices=["same", "embedded"], default="same",
                    help="the service leg on the same SD 1.5 model (saved to a temp folder), or the embedded one")
    ap.add_argument("--fast-path", choices=["auto", "on", "off"], default="auto",
                    help="channels-last, fused q/k/v, VAE slicing + tiling for our pipeline (auto: on for CUDA)")
    ap.add_argument("--compile", action="store_true", help="also torch.compile our UNet (a leg of its own)")
    args = ap.parse_args(argv)
    from minidalle.cli.commands import quiet_libraries
    from minidalle.devices import resolve_device, resolve_dtype

    quiet_libraries()
    device = resolve_device(None)
    dtype = resolve_dtype(args.dtype, device)
    t0 = time.perf_counter()
    mini, stock, knobs = build(args, device, dtype)
    knobs["compile_unet"] = args.compile
    print(f"built SD 1.5 (random weights) on {device} ({dtype}) in {time.perf_counter() - t0:.1f} s", flush=True)
    result: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "dtype": str(dtype).removeprefix("torch."), "size": args.size, "steps": args.steps,
                    "knobs": knobs}
    result["generation"] = time_generation(args, mini, stock, device)
    if args.compile:
        mini.enable_fast_path(**{k: v for k, v in knobs.items() if k != "compile_unet"}, compile_unet=True)
        for batch, row in time_generation(args, mini, stock, device, leg="compiled", with_stock=False).items():
            result["generation"][batch]["compiled_s_per_image"] = row["compiled_s_per_image"]
    with tempfile.TemporaryDirectory() as tmp:
        result["training"] = time_training(args, mini, Path(tmp))
        result["peak_memory_gib"] = round(peak_memory_gib(device), 2)
        result["service"] = time_service(args, stock, Path(tmp))
    gen = result["generation"]

    def best(row: dict) -> float:  # ours: compiled when measured
        return row.get("compiled_s_per_image") or row["minidalle_s_per_image"]

    batched = [best(v) for b, v in gen.items() if b > 1]
    result["goals"] = {
        "batch1_s_per_image": [best(gen[1]), GOALS["batch1_s_per_image"]] if 1 in gen else None,
        "batched_s_per_image": [min(batched), GOALS["batched_s_per_image"]] if batched else None,
        "train_samples_per_s": [result["training"]["samples_per_s"], GOALS["train_samples_per_s"]],
    }
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
