"""The tiny-shapes rig's subcommands: `minidalle shapes | train-base | eval | build-tiny`.

Each parses its own arguments (with the CLI's one-line errors) and calls `minidalle.tiny`, which holds the work.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from minidalle.cli.parsing import Parser, float_in, int_in
from minidalle.errors import InvalidInput
from minidalle.params import PRIORS, Generate


def shapes_main(argv: list[str] | None = None) -> int:
    """`minidalle shapes --out DIR [--n N] [--seed S] [--split train|heldout|concept] [--resolution R]`"""
    from minidalle.tiny.shapes import write_concept_imagefolder, write_imagefolder

    ap = Parser(prog="minidalle shapes", description="Write the shapes dataset as an imagefolder.")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n", type=int_in(1, 10**7), default=1000, help="number of images")
    ap.add_argument("--seed", type=int_in(0, 2**32 - 1), default=0)
    ap.add_argument("--split", choices=("train", "heldout", "concept"), default="train",
                    help="concept: images of the invented word 'zorb' (an orange cross) for LoRA fine-tuning")
    ap.add_argument("--resolution", type=int_in(16, 1024), default=32)
    args = ap.parse_args(argv)
    if args.split == "concept":
        out = write_concept_imagefolder(args.out, args.n, seed=args.seed, resolution=args.resolution)
    else:
        out = write_imagefolder(args.out, args.n, seed=args.seed, split=args.split, resolution=args.resolution)
    print(f"wrote {args.n} images + metadata.jsonl to {out}")
    return 0


def _parse_seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if not seeds or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative ints, got {text!r}")
    return seeds


def _parse_adapter(text: str) -> tuple[str, float]:
    ref, sep, scale = text.rpartition(":")
    if not sep:
        return text, 1.0
    try:
        return ref, float(scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"scale must be a number, got {text!r}") from None


def eval_main(argv: list[str] | None = None) -> int:
    """`minidalle eval`: held-out prompt accuracy of a model, plus the judge's and the VAE's ceilings."""
    from minidalle.tiny import evaluate as ev

    ap = Parser(prog="minidalle eval", description=eval_main.__doc__)
    ap.add_argument("--model", default=None, help="model folder or hub id (default: the embedded model)")
    ap.add_argument("--adapter", action="append", default=[], type=_parse_adapter, metavar="DIR_OR_NAME[:SCALE]",
                    help="evaluate with this LoRA adapter active (repeatable)")
    ap.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    ap.add_argument("--seeds", type=_parse_seeds, default=ev.DEFAULT_SEEDS, help="comma-separated, e.g. 0,1,2,3")
    ap.add_argument("--steps", type=int_in(1, 1000), default=ev.DEFAULT_STEPS)
    ap.add_argument("--guidance", type=float_in(0, 50), default=ev.DEFAULT_GUIDANCE)
    ap.add_argument("--prior", choices=PRIORS, default="mlp", help="the prior that makes the conditioning")
    ap.add_argument("--prior-steps", type=int_in(1, 1000), default=Generate.prior_num_inference_steps.default)
    ap.add_argument("--prior-guidance", type=float_in(1, 50), default=Generate.prior_guidance_scale.default)
    ap.add_argument("--diversity", action="store_true", help="also count distinct (position, size) outcomes over "
                    "16 seeds of one prompt")
    ap.add_argument("--variations", type=int_in(0, 10_000), default=0, metavar="N",
                    help="also judge variations of N held-out dataset images")
    args = ap.parse_args(argv)
    pipe = ev._load(args.model)
    prior = dict(prior=args.prior)
    if args.prior == "diffusion":
        prior.update(prior_num_inference_steps=args.prior_steps, prior_guidance_scale=args.prior_guidance)
    kw = dict(steps=args.steps, guidance=args.guidance, progress=not args.json)
    result = ev.evaluate(pipe, seeds=args.seeds, adapters=args.adapter, **kw, **prior)
    if args.adapter:
        result["adapters"] = [list(a) for a in args.adapter]
    tables = {"generated (held-out)": result}
    if args.diversity:
        result["diversity"] = ev.diversity(pipe, **kw, **prior)
    if args.variations:
        result["variations"] = tables["variations (held-out images)"] = ev.evaluate_variations(
            pipe, args.variations, **kw)
    judge_real = ev.judge_dataset_accuracy()
    ceiling = ev.vae_ceiling(pipe)
    if args.json:
        result.update(judge_real_accuracy=judge_real["all_accuracy"], vae_ceiling=ceiling)
        print(json.dumps(result, sort_keys=True))
    else:
        print(f"model {result['model']}: {result['n_prompts']} held-out prompts x {len(args.seeds)} seeds, "
              f"{args.steps} steps, guidance {args.guidance}, prior {args.prior} ({result['seconds']} s)")
        print(ev.format_table({**tables, "VAE reconstructions": ceiling, "real images": judge_real}))
        if "clip_score" in result:
            print(f"CLIP score (tiny CLIP, text-image cosine): {result['clip_score']:.3f}")
        if args.diversity:
            d = result["diversity"]
            print(f"diversity: {d['distinct_outcomes']} distinct (position, size) outcomes over {d['n_seeds']} seeds "
                  f"of {d['prompt']!r}")
    return 0


def train_base_main(argv: list[str] | None = None) -> int:
    """`minidalle train-base --out DIR [--seed N] [--steps N] [--vae-steps N] [--images N] [--minutes-budget M]`"""
    from minidalle.tiny.base_training import BaseTrainConfig, train_base

    ap = Parser(prog="minidalle train-base", description="Train the embedded tiny-shapes model from a seed, on CPU.")
    ap.add_argument("--out", type=Path, required=True, help="model folder to write")
    ap.add_argument("--seed", type=int_in(0, 2**32 - 1), default=0)
    ap.add_argument("--steps", type=int_in(1, None), default=BaseTrainConfig.unet_steps,
                    help="text encoder + UNet steps")
    ap.add_argument("--vae-steps", type=int_in(1, None), default=BaseTrainConfig.vae_steps)
    ap.add_argument("--images", type=int_in(1, None), default=BaseTrainConfig.n_images,
                    help="training images to draw")
    ap.add_argument("--batch-size", type=int_in(1, None), default=BaseTrainConfig.batch_size)
    ap.add_argument("--minutes-budget", type=float_in(0, 10**6, open_low=True), default=None,
                    help="wall-clock cap on the UNet stage; stops early (not reproducible) when hit")
    ap.add_argument("--threads", type=int_in(1, 1024), default=None,
                    help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--stages", choices=["all", "base", "image"], default="all",
                    help="all: the base then the image side; base: VAE, text encoder and UNet only; image: the "
                    "image side (CLIP vision tower, diffusion prior, IP-Adapter) added to the model already in --out")
    args = ap.parse_args(argv)
    if args.stages == "image":
        from minidalle.tiny.base_training import ImageSideConfig, train_image_side, write_provenance

        if not (args.out / "model_index.json").is_file():
            raise InvalidInput("out", f"{args.out} holds no model to add the image side to")
        side = train_image_side(args.out, ImageSideConfig(seed=args.seed, threads=args.threads))
        known = args.out / "training.json"
        write_provenance(args.out, {**(json.loads(known.read_text()) if known.is_file() else {}), "image_side": side})
        print(f"train-base --stages image: {side['out']}{_image_side_costs(side['timings'])}{_total(side['timings'])}")
        return 0
    cfg = BaseTrainConfig(out=args.out, seed=args.seed, unet_steps=args.steps, vae_steps=args.vae_steps,
                          n_images=args.images, batch_size=args.batch_size, minutes_budget=args.minutes_budget,
                          threads=args.threads)
    if args.stages == "base":
        cfg.image_side = None
    result = train_base(cfg)
    t = result["timings"]
    image = _image_side_costs(result["image_side"]["timings"]) if "image_side" in result else ""
    print(f"train-base: {result['out']}  data {t['data_s']:.0f}s  vae {t['vae_s']:.0f}s  "
          f"unet+text {t['unet_s']:.0f}s{image}{_total(t)}")
    return 0


def _image_side_costs(t: dict) -> str:
    return f"  clip {t['clip_s']:.0f}s  prior {t['prior_s']:.0f}s  ip-adapter {t['ip_s']:.0f}s"


def _total(t: dict) -> str:
    return f"  total {t['total_s'] / 60:.1f} min ({t['cpu_s'] / 60:.1f} CPU-min)"


def build_tiny_main(argv: list[str] | None = None) -> int:
    """`minidalle build-tiny [--out DIR] [--seed N]`: rebuild the random-weight embedded model (bit for bit)."""
    from minidalle.embedded import TINY_RANDOM
    from minidalle.tiny.build import write_tiny_random

    ap = Parser(prog="minidalle build-tiny", description="Rebuild the random-weight embedded tiny model.")
    ap.add_argument("--out", type=Path, default=TINY_RANDOM, help="folder to write (default: the packaged one)")
    ap.add_argument("--seed", type=int_in(0, 2**32 - 1), default=0)
    args = ap.parse_args(argv)
    print(write_tiny_random(args.out, args.seed))
    return 0
