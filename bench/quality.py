"""Quality of the embedded shapes model: does the image obey the prompt, and does LoRA teach a new word?

1. the judge on real dataset images (must be >= 99 %) and on the model's VAE reconstructions (the ceiling);
2. every held-out prompt (combinations never trained on) x 4 seeds, DDIM 25 steps, guidance 3, for the model and
   for the random-weight baseline. Goals: shape colour >= 97 %, background >= 97 %, shape >= 90 %;
3. with --lora: LoRA fine-tunes on 12 images of "a zorb" (an orange cross), default LoRA settings (rank 8,
   lr 1e-4, batch 1) for 1500 steps (~1 CPU-minute), with and without training the prior.
   Goals: concept found in >= 90 % of images, held-out accuracy drops <= 5 points.
4. with --priors (a model with an image side): the MLP prior and the diffusion prior side by side on the same
   held-out prompts and seeds (accuracy, CLIP score), diversity (distinct (position, size) outcomes over 16 seeds
   of one prompt) and variations of held-out dataset images (goal: the input's shape, colour and background in
   >= 90 % of them).

    python bench/quality.py [--model DIR] [--baseline DIR] [--seeds 0,1,2,3] [--lora] [--priors] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from minidalle.embedded import MODELS_DIR, TINY_RANDOM
from minidalle.tiny.evaluate import (
    DEFAULT_GUIDANCE,
    DEFAULT_SEEDS,
    DEFAULT_STEPS,
    diversity,
    evaluate,
    evaluate_variations,
    format_table,
    judge_dataset_accuracy,
    lora_teach,
    make_grid,
    vae_ceiling,
)

# three held-out combinations (never trained on) and the invented word (meaningless to the base model)
GRID_PROMPTS = ("a red circle on an orange background", "a yellow triangle on a black background",
                "a green cross on a blue background", "a zorb on a green background",
                "a zorb on a white background")
GOALS = dict(shape_color_accuracy=0.97, background_color_accuracy=0.97, shape_accuracy=0.90)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(MODELS_DIR / "tiny-shapes"))
    ap.add_argument("--baseline", default=str(TINY_RANDOM), help="random-weight model for comparison ('' skips)")
    ap.add_argument("--seeds", default=",".join(map(str, DEFAULT_SEEDS)))
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    ap.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    ap.add_argument("--lora", action="store_true", help="also run the LoRA-teaching benchmark")
    ap.add_argument("--lora-steps", type=int, default=1500,
                    help="fine-tune steps (the trainer's default is 500: 71 %% found; 1500 = ~60 CPU-s: 93 %%)")
    ap.add_argument("--grid", type=Path, default=None,
                    help="write grid PNGs here: base.png, and with --lora lora.png (prompts x seeds)")
    ap.add_argument("--priors", action="store_true", help="also compare the MLP and the diffusion prior")
    ap.add_argument("--prior-guidance", default="1,4", help="diffusion prior guidance scales to compare")
    ap.add_argument("--variations", type=int, default=64, help="held-out images to make variations of")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # shared CPUs: a second torch thread mostly spins
    seeds = tuple(int(s) for s in args.seeds.split(","))
    kw = dict(seeds=seeds, steps=args.steps, guidance=args.guidance, progress=not args.json)

    rows = {"real images (judge)": judge_dataset_accuracy(), "VAE reconstructions": vae_ceiling(args.model)}
    rows["generated, held-out"] = evaluate(args.model, **kw)
    if args.baseline:
        rows["random weights, held-out"] = evaluate(args.baseline, **kw)
    report: dict = {"rows": rows}
    if not args.json:
        print(f"held-out: {rows['generated, held-out']['n_prompts']} prompts x {len(seeds)} seeds, "
              f"{args.steps} steps, guidance {args.guidance}")
        print(format_table(rows))
        gen = rows["generated, held-out"]
        print("goals: " + ", ".join(f"{k} {100 * gen[k]:.1f}% (>= {100 * v:.0f}%: {'ok' if gen[k] >= v else 'MISS'})"
                                    for k, v in GOALS.items()))
    if args.priors:
        report["priors"] = compare_priors(args.model, [float(g) for g in args.prior_guidance.split(",")],
                                          args.variations, kw, quiet=args.json)
    if args.grid:
        args.grid.mkdir(parents=True, exist_ok=True)
        make_grid(args.model, GRID_PROMPTS, seeds=seeds, steps=args.steps, guidance=args.guidance).save(
            args.grid / "base.png")
    if args.lora:
        report["lora"] = []
        for train_prior in (True, False):
            with tempfile.TemporaryDirectory() as tmp:
                r = lora_teach(args.model, tmp, train_prior=train_prior, train_steps=args.lora_steps, **kw)
                if args.grid and train_prior:
                    make_grid(args.model, GRID_PROMPTS, seeds=seeds, steps=args.steps, guidance=args.guidance,
                              adapters=[(str(Path(tmp) / "adapter"), 1.0)]).save(args.grid / "lora.png")
            report["lora"].append(r)
            if not args.json:
                print(f"LoRA (train_prior={train_prior}): {r['train_steps']} steps, {r['train_cpu_seconds']} CPU-s; "
                      f"concept found {100 * r['concept_accuracy_before']:.0f}% -> "
                      f"{100 * r['concept_accuracy_after']:.0f}% (goal >= 90%); held-out drop (points) "
                      + ", ".join(f"{k.split('_acc')[0]} {v:+.1f}" for k, v in r["heldout_drop_points"].items())
                      + " (goal <= 5)")
                if "concept_accuracy_after_diffusion_prior" in r:
                    before, after = (r[f"concept_accuracy_{t}_diffusion_prior"] for t in ("before", "after"))
                    print(f"  with prior=diffusion: concept found {100 * before:.0f}% -> {100 * after:.0f}%")
    if args.json:
        print(json.dumps(report, sort_keys=True, default=str))
    return 0


def compare_priors(model: str, guidances: list[float], n_variations: int, kw: dict, *, quiet: bool) -> dict:
    """The MLP prior and the diffusion prior (at each guidance) on the same prompts and seeds, side by side."""
    from minidalle.tiny.evaluate import _load

    pipe = _load(model)
    settings = {"mlp": dict(prior="mlp")}
    settings.update({f"diffusion, guidance {g:g}": dict(prior="diffusion", prior_guidance_scale=g) for g in guidances})
    out: dict = {}
    for name, prior in settings.items():
        r = evaluate(pipe, **kw, **prior)
        r["diversity"] = diversity(pipe, steps=kw["steps"], guidance=kw["guidance"], progress=kw["progress"],
                                   **prior)["distinct_outcomes"]
        out[name] = r
    variations = evaluate_variations(pipe, n_variations, steps=kw["steps"], guidance=kw["guidance"],
                                     progress=kw["progress"])
    if not quiet:
        print("\nprior                      colour  background  shape   all    CLIP score  diversity (of 16)")
        for name, r in out.items():
            print(f"{name:<26} {100 * r['shape_color_accuracy']:5.1f}%  {100 * r['background_color_accuracy']:6.1f}%"
                  f"    {100 * r['shape_accuracy']:5.1f}%  {100 * r['all_accuracy']:5.1f}%  {r['clip_score']:.3f}"
                  f"       {r['diversity']}")
        print(f"variations of {n_variations} held-out images: colour {100 * variations['shape_color_accuracy']:.1f}%"
              f", background {100 * variations['background_color_accuracy']:.1f}%, shape "
              f"{100 * variations['shape_accuracy']:.1f}%, all three {100 * variations['all_accuracy']:.1f}% "
              "(goal >= 90%)")
    return {"priors": out, "variations": variations}


if __name__ == "__main__":
    sys.exit(main())
