"""Switching adapters on a resident pipeline vs reloading the pipeline for each adapter.

Both sides end in the same state: a pipeline ready to generate with adapter i. The switch loads adapter i's folder
onto the resident base (LoRA into the UNet, prior MLP) and unloads the previous one; the reload builds the pipeline
from disk and then loads adapter i. Repeats alternate between several adapters and interleave the two sides; the
ratio is median(reload) / median(switch). Goal: ≥ 20×. Two switches are timed: cold (the adapter's folder is read
and injected) and warm (adapters already resident in the LRU cache, only the active set changes: what a request
naming a cached adapter costs). The reload reads from the OS page cache after the warm-up, i.e. its best case.

    python bench/adapter_switch.py                         # the embedded tiny model
    python bench/adapter_switch.py --model path/or/hub-id  # any model in the diffusers layout
    python bench/adapter_switch.py --sd15-random           # SD 1.5's architecture, random weights, saved to a
                                                           # temporary folder first (~2 GB fp16 / 4 GB fp32)
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

GOAL = 20.0


def make_adapter(out_dir: Path, pipe, seed: int, rank: int) -> Path:
    """A synthetic adapter (random non-zero LoRA + prior MLP) shaped for `pipe`, written in the artifact format."""
    from diffusers import UNet2DConditionModel
    from peft.utils import get_peft_model_state_dict

    from minidalle.adapters import LoraSettings, save_adapter
    from minidalle.prior import PriorMLP

    gen = torch.Generator().manual_seed(seed)
    settings = LoraSettings(rank=rank, alpha=2.0 * rank)
    with torch.device("meta"):  # only the LoRA shapes are needed, not a second base model in memory
        unet = UNet2DConditionModel.from_config(pipe.unet.config)
    unet.add_adapter(settings.peft_config())
    shapes = {k: v.shape for k, v in get_peft_model_state_dict(unet).items()}
    lora = {k: torch.randn(s, generator=gen) * 0.05 for k, s in shapes.items()}
    cfg = pipe.prior.config
    mlp_shapes = {k: v.shape for k, v in PriorMLP(cfg.in_dim, cfg.hidden_dim, cfg.out_dim).state_dict().items()}
    prior = {k: torch.randn(s, generator=gen) * 0.05 for k, s in mlp_shapes.items()}
    return save_adapter(out_dir, lora=lora, prior=prior, settings=settings,
                        meta={"base_model": pipe.model_id, "base_model_hash": pipe.model_hash, "steps": 0})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder or hub id (default: the embedded model)")
    ap.add_argument("--sd15-random", action="store_true", help="SD 1.5 architecture with random weights")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--adapters", type=int, default=3, help="distinct adapters to cycle through")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from minidalle.cli.commands import quiet_libraries

    quiet_libraries()
    from minidalle.pipeline import MiniDallePipeline, resolve_device, resolve_dtype

    tmp = Path(tempfile.mkdtemp(prefix="adapter-switch-"))
    model = args.model
    if args.sd15_random:
        from pipeline_vs_diffusers import sd15_random_components  # a sibling script (bench/ is on sys.path)

        device = resolve_device(args.device)
        built = MiniDallePipeline(**sd15_random_components(device, resolve_dtype(args.dtype, device)),
                                  model_id="sd15-random")
        model = str(built.save_pretrained(tmp / "sd15-random"))
        del built

    def load():
        return MiniDallePipeline.from_pretrained(model, torch_dtype=args.dtype, device=args.device)

    def sync(pipe):
        if pipe.device.type == "cuda":
            torch.cuda.synchronize(pipe.device)

    pipe = load()
    folders = [make_adapter(tmp / f"adapter{i}", pipe, seed=i, rank=args.rank) for i in range(args.adapters)]
    current: str | None = None

    def switch(folder: Path) -> None:
        nonlocal current
        name = pipe.load_adapter(folder, name=f"{folder.name}-live")
        if current is not None and current != name:
            pipe.unload_adapter(current)
        current = name
        sync(pipe)

    def reload(folder: Path) -> None:
        fresh = load()
        fresh.load_adapter(folder)
        sync(fresh)

    switch(folders[-1])  # warm-up both paths (file cache, allocator)
    reload(folders[-1])
    times = {"switch": [], "reload": []}
    for r in range(args.repeats):
        folder = folders[r % len(folders)]
        sides = [("switch", switch), ("reload", reload)]
        for name, fn in (sides if r % 2 == 0 else sides[::-1]):
            t0 = time.perf_counter()
            fn(folder)
            times[name].append(time.perf_counter() - t0)

    # warm switch: every adapter resident (the worker's LRU cache), a request names a different one. This is the
    # step a generate request runs before denoising (`_activate`: set_adapters on the UNet + the prior's active set)
    for i, folder in enumerate(folders):
        pipe.load_adapter(folder, name=f"warm{i}")
    warm = []
    for r in range(max(args.repeats, 9)):
        t0 = time.perf_counter()
        pipe._activate([(f"warm{r % len(folders)}", 1.0)])
        sync(pipe)
        warm.append(time.perf_counter() - t0)

    med = {k: statistics.median(v) for k, v in times.items()}
    med["warm"] = statistics.median(warm)
    ratios = {k: med["reload"] / med[k] for k in ("switch", "warm")}
    shutil.rmtree(tmp, ignore_errors=True)
    label = "sd15-random" if args.sd15_random else pipe.model_id
    print(f"model {label}  device {pipe.device} {pipe.dtype}  adapters {args.adapters} (rank {args.rank})  "
          f"repeats {args.repeats}")
    print(f"  reload (pipeline from disk + adapter)                             median {med['reload'] * 1000:8.1f} ms")
    print(f"  cold switch (load adapter folder onto resident base, unload prev) median {med['switch'] * 1000:8.1f} "
          "ms")
    print(f"  warm switch (adapters resident, activate another one)             median {med['warm'] * 1000:8.1f} ms")
    for k, label in (("warm", "warm switch"), ("switch", "cold switch")):
        verdict = "PASS" if ratios[k] >= GOAL else "FAIL"
        print(f"ratio reload/{label} = {ratios[k]:.1f}x   goal >= {GOAL:.0f}x   {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
