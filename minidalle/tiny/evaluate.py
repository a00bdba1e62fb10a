"""Quality evaluation of a model on the shapes task: does the image obey the prompt?

`evaluate(model)` generates every held-out prompt (combinations never trained on) with fixed seeds and lets the
deterministic judge (`minidalle.tiny.judge`) read shape colour, background colour and shape from each image.
`judge_dataset_accuracy()` checks the judge on real dataset images and `vae_ceiling(model)` on the model's VAE
reconstructions of them — the best any generation through that VAE could score.

With an image side (`minidalle.image_conditioning`, `minidalle.diffusion_prior`) the same evaluation runs with the
diffusion prior (`prior="diffusion"`), and three more measures exist: `diversity` (how many distinct (position,
size) outcomes the judge sees over seeds of one prompt), `evaluate_variations` (does a variation of a held-out
dataset image keep its shape, colour and background?) and `clip_score` (the tiny CLIP's text-image similarity).

`minidalle eval [--model M] [--json] [--seeds 0,1,2,3] [--steps 25] [--guidance 3] [--prior mlp|diffusion]
[--diversity] [--variations N]` prints a table or one JSON line.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from minidalle.errors import InvalidInput
from minidalle.tiny import shapes
from minidalle.tiny.judge import judge, shape_mask

DEFAULT_SEEDS = (0, 1, 2, 3)
DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 3.0  # strong enough to bind colours to words; higher over-saturates the tiny model
_FIELDS = ("shape_color", "background_color", "shape")


def _load(pipe_or_model):
    """A pipeline as given (anything called like MiniDallePipeline), or loaded from a folder / hub id."""
    from minidalle.pipeline import MiniDallePipeline

    if pipe_or_model is None or isinstance(pipe_or_model, str) or hasattr(pipe_or_model, "__fspath__"):
        return MiniDallePipeline.from_pretrained(None if pipe_or_model is None else str(pipe_or_model),
                                                 device="cpu")
    if not callable(pipe_or_model):
        raise InvalidInput("model", f"expected a pipeline or a model folder / hub id, got {type(pipe_or_model)}")
    return pipe_or_model


def _score(images, expected: Sequence[tuple[str, str, str]]) -> dict:
    """Judge images against expected (shape_color, shape, background_color) triples."""
    right = dict.fromkeys(_FIELDS, 0)
    all_right = 0
    verdicts = []
    for img, (color, shape, bg) in zip(images, expected, strict=True):
        v = judge(img)
        hits = dict(shape_color=v.shape_color == color, background_color=v.background_color == bg,
                    shape=v.shape == shape)
        for k in _FIELDS:
            right[k] += hits[k]
        all_right += all(hits.values())
        verdicts.append(v)
    n = len(expected)
    out = {f"{k}_accuracy": right[k] / n for k in _FIELDS}
    out["all_accuracy"] = all_right / n
    out.update({f"{k}_correct": right[k] for k in _FIELDS}, n_images=n)
    out["mean_iou"] = float(np.mean([v.iou for v in verdicts])) if verdicts else 0.0
    return out


def generate_grid(pipe, prompts: Sequence[str], *, seeds: Sequence[int], steps: int, guidance: float,
                  adapters: Sequence[tuple[str, float]] = (), batch: int = 64, progress: bool = True,
                  **prior: object) -> list:
    """Images for every (seed, prompt), seed-major; image (seed, prompt) depends on nothing else. `prior`: the
    pipeline's prior keywords (`prior="diffusion"`, `prior_num_inference_steps`, …)."""
    jobs = [(s, p) for s in seeds for p in prompts]
    images = []
    for i in tqdm(range(0, len(jobs), batch), desc="eval", disable=not progress, dynamic_ncols=True):
        chunk = jobs[i : i + batch]
        gens = [torch.Generator("cpu").manual_seed(s) for s, _ in chunk]
        out = pipe([p for _, p in chunk], negative_prompt=[""] * len(chunk), num_inference_steps=steps,
                   guidance_scale=guidance, generator=gens, adapters=adapters, **prior)
        images.extend(out.images)
    return images


def evaluate(pipe_or_model_path=None, *, seeds: Sequence[int] = DEFAULT_SEEDS,
             prompts: Sequence[shapes.Combo] | None = None, steps: int = DEFAULT_STEPS,
             guidance: float = DEFAULT_GUIDANCE, adapters: Sequence[tuple[str, float]] = (),
             progress: bool = True, **prior: object) -> dict:
    """Accuracy of shape colour / background colour / shape on `prompts` (default: every held-out combination).
    `prior`: the pipeline's prior keywords (default: the MLP prior)."""
    if not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise InvalidInput("seeds", f"must be a non-empty list of non-negative ints, got {seeds!r}")
    if not isinstance(steps, int) or steps < 1:
        raise InvalidInput("steps", f"must be a positive int, got {steps!r}")
    combos = list(shapes.heldout_combos() if prompts is None else prompts)
    if not combos or not all(isinstance(c, shapes.Combo) for c in combos):
        raise InvalidInput("prompts", "must be a non-empty list of shapes.Combo")
    pipe = _load(pipe_or_model_path)
    t = time.monotonic()
    images = generate_grid(pipe, [c.caption for c in combos], seeds=seeds, steps=steps, guidance=guidance,
                           adapters=adapters, progress=progress, **prior)
    expected = [(c.shape_color, c.shape, c.background_color) for _ in seeds for c in combos]
    result = _score([np.asarray(im.convert("RGB")) for im in images], expected)
    result.update(n_prompts=len(combos), seeds=list(seeds), steps=steps, guidance=guidance,
                  seconds=round(time.monotonic() - t, 1), model=getattr(pipe, "model_id", "custom"),
                  prior=prior.get("prior", "mlp"))
    if getattr(pipe, "diffusion_prior", None) is not None and getattr(pipe, "image_encoder", None) is not None:
        result["clip_score"] = clip_score(pipe, images, [c.caption for _ in seeds for c in combos])
    return result


def outcome(image) -> tuple[int, int, int] | None:
    """Where and how big the judge sees the shape: (row, column) of its centroid in 4-px cells and the side of its
    area in 2-px steps; None when nothing stands out. Two images with the same outcome look alike to the judge."""
    mask, _ = shape_mask(np.asarray(image.convert("RGB")) if hasattr(image, "convert") else image)
    if not mask.any():
        return None
    ys, xs = np.nonzero(mask)
    return int(ys.mean() // 4), int(xs.mean() // 4), int(round(np.sqrt(mask.sum()) / 2))


def diversity(pipe_or_model_path=None, prompt: str = "a red circle on a blue background", *, n_seeds: int = 16,
              steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE, progress: bool = True,
              **prior: object) -> dict:
    """How many distinct (position, size) outcomes the judge sees over `n_seeds` seeds of one prompt."""
    pipe = _load(pipe_or_model_path)
    images = generate_grid(pipe, [prompt], seeds=range(n_seeds), steps=steps, guidance=guidance, progress=progress,
                           **prior)
    outcomes = [outcome(im) for im in images]
    return dict(prompt=prompt, n_seeds=n_seeds, distinct_outcomes=len(set(outcomes)),
                prior=prior.get("prior", "mlp"))


@torch.no_grad()
def clip_score(pipe, images: Sequence, captions: Sequence[str]) -> float:
    """Mean cosine similarity between each image's CLIP image embedding and its caption's CLIP text embedding
    (the model's own tiny CLIP: its image encoder, and the text encoder's pooled output through the text
    projection the diffusion prior carries)."""
    import torch.nn.functional as F

    dp = pipe.diffusion_prior
    sims = []
    for i in range(0, len(images), 256):
        img = pipe.encode_image([im.convert("RGB") for im in images[i : i + 256]])  # (B, P)
        text = dp.encode_prompt(list(captions[i : i + 256]), text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer).text_embeds  # (B, P)
        sims.append(F.cosine_similarity(img.float(), text.float(), dim=-1))
    return float(torch.cat(sims).mean())


def evaluate_variations(pipe_or_model_path=None, n: int = 64, *, seed: int = 4321, steps: int = DEFAULT_STEPS,
                        guidance: float = DEFAULT_GUIDANCE, progress: bool = True, **kwargs: object) -> dict:
    """Variations of `n` held-out dataset images (one each, prompt ""): how often the judge finds the input's
    shape colour, background and shape in them."""
    from PIL import Image

    pipe = _load(pipe_or_model_path)
    images, combos = shapes.make_dataset(n, seed=seed, split="heldout", resolution=pipe.default_height)
    made = []
    for i in tqdm(range(n), desc="variations", disable=not progress, dynamic_ncols=True):
        out = pipe("", image=Image.fromarray(images[i]), seed=seed + i, num_inference_steps=steps,
                   guidance_scale=guidance, **kwargs)
        made.append(np.asarray(out.images[0].convert("RGB")))
    result = _score(made, [(c.shape_color, c.shape, c.background_color) for c in combos])
    result.update(n_images=n, steps=steps, guidance=guidance)
    return result


def judge_dataset_accuracy(n: int = 500, *, seed: int = 1234, split: str = "heldout", resolution: int = 32) -> dict:
    """The judge on real dataset images: how often it reads back exactly what was drawn."""
    images, combos = shapes.make_dataset(n, seed=seed, split=split, resolution=resolution)
    return _score(images, [(c.shape_color, c.shape, c.background_color) for c in combos])


@torch.no_grad()
def vae_ceiling(pipe_or_model_path=None, n: int = 500, *, seed: int = 1234, split: str = "heldout") -> dict:
    """The judge on the model's VAE reconstructions of real images: the ceiling for generated images."""
    pipe = _load(pipe_or_model_path)
    res = pipe.default_height
    images, combos = shapes.make_dataset(n, seed=seed, split=split, resolution=res)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).to(pipe.device, pipe.dtype)
    rec = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample  # (N, 3, R, R) in ~[-1, 1]
    rec = ((rec.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return _score(list(rec), [(c.shape_color, c.shape, c.background_color) for c in combos])


def evaluate_concept(pipe_or_model_path=None, concept: shapes.Concept = shapes.Concept(), *,
                     seeds: Sequence[int] = DEFAULT_SEEDS, steps: int = DEFAULT_STEPS,
                     guidance: float = DEFAULT_GUIDANCE, adapters: Sequence[tuple[str, float]] = (),
                     progress: bool = True, **prior: object) -> dict:
    """How often prompts using the invented word ("a zorb on a blue background") draw the concept. `prior`: the
    pipeline's prior keywords (default: the MLP prior)."""
    pipe = _load(pipe_or_model_path)
    backgrounds = [b for b in shapes.BACKGROUNDS if b != concept.shape_color]
    images = generate_grid(pipe, [concept.caption(b) for b in backgrounds], seeds=seeds, steps=steps,
                           guidance=guidance, adapters=adapters, progress=progress, **prior)
    expected = [(concept.shape_color, concept.shape, b) for _ in seeds for b in backgrounds]
    r = _score([np.asarray(im.convert("RGB")) for im in images], expected)
    # the concept is "found" when both its colour and its shape are drawn (background is scored separately)
    hits = 0
    for im, (color, shape, _) in zip(images, expected, strict=True):
        v = judge(np.asarray(im.convert("RGB")))
        hits += v.shape_color == color and v.shape == shape
    r["concept_accuracy"] = hits / len(expected)
    return r


def lora_teach(model: str, work_dir, *, concept: shapes.Concept = shapes.Concept(), n_images: int = 12,
               n_regular: int = 0,
               train_prior: bool = True, seeds: Sequence[int] = DEFAULT_SEEDS, steps: int = DEFAULT_STEPS,
               guidance: float = DEFAULT_GUIDANCE, progress: bool = True, train_steps: int | None = None,
               **train_overrides) -> dict:
    """Fine-tune LoRA (default settings unless overridden) on `n_images` of the concept; score before and after.

    `steps` / `guidance` / `seeds` are for generation; `train_steps` and `train_overrides` go to TrainConfig.

    Returns concept accuracy and held-out base accuracy without and with the adapter, plus the training time; on a
    model with a diffusion prior also the concept accuracy with `prior="diffusion"` (`…_diffusion_prior`).
    """
    from pathlib import Path

    from minidalle.pipeline import MiniDallePipeline
    from minidalle.training import TrainConfig, train

    if not 8 <= n_images <= 64:
        raise InvalidInput("n_images", f"must be in [8, 64], got {n_images!r}")
    work = Path(work_dir)
    pipe = MiniDallePipeline.from_pretrained(model, device="cpu")
    data = shapes.write_concept_imagefolder(work / "data", n_images, seed=0, concept=concept,
                                            resolution=pipe.default_height, n_regular=n_regular)
    if train_steps is not None:
        train_overrides["steps"] = train_steps
    cfg = TrainConfig(dataset_dir=str(data), output_dir=str(work / "adapter"), model=model,
                      train_prior=train_prior, checkpoint_every=0, resume=False, **train_overrides)
    t = time.process_time()
    result = train(cfg)
    cpu_s = time.process_time() - t
    kw = dict(seeds=seeds, steps=steps, guidance=guidance, progress=progress)
    ad = [(str(result.adapter_dir), 1.0)]
    out = dict(train_prior=train_prior, n_images=n_images, n_regular=n_regular,
               train_steps=result.steps, train_cpu_seconds=round(cpu_s, 1),
               train_wall_seconds=round(result.seconds, 1), final_loss=result.loss)
    for tag, adapters in (("before", ()), ("after", ad)):
        c = evaluate_concept(pipe, concept, adapters=adapters, **kw)
        h = evaluate(pipe, adapters=adapters, **kw)
        out[f"concept_accuracy_{tag}"] = c["concept_accuracy"]
        out[f"heldout_{tag}"] = {k: h[k] for k in ("shape_color_accuracy", "background_color_accuracy",
                                                    "shape_accuracy", "all_accuracy")}
        if pipe.diffusion_prior is not None and pipe.has_ip_adapter:
            c = evaluate_concept(pipe, concept, adapters=adapters, prior="diffusion", **kw)
            out[f"concept_accuracy_{tag}_diffusion_prior"] = c["concept_accuracy"]
    out["heldout_drop_points"] = {k: round(100 * (out["heldout_before"][k] - out["heldout_after"][k]), 1)
                                  for k in out["heldout_before"]}
    return out


def make_grid(pipe_or_model_path, prompts: Sequence[str], *, seeds: Sequence[int] = DEFAULT_SEEDS,
              steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE,
              adapters: Sequence[tuple[str, float]] = (), upscale: int = 4):
    """One PIL image: a row per prompt, a column per seed, each cell upscaled (nearest) `upscale` times."""
    from PIL import Image

    pipe = _load(pipe_or_model_path)
    images = generate_grid(pipe, list(prompts), seeds=seeds, steps=steps, guidance=guidance, adapters=adapters,
                           progress=False)  # seed-major
    w, h = images[0].size
    cw, ch = w * upscale, h * upscale
    grid = Image.new("RGB", (cw * len(seeds) + 2 * (len(seeds) - 1), ch * len(prompts) + 2 * (len(prompts) - 1)),
                     "white")
    for si in range(len(seeds)):
        for pi in range(len(prompts)):
            cell = images[si * len(prompts) + pi].resize((cw, ch), Image.NEAREST)
            grid.paste(cell, (si * (cw + 2), pi * (ch + 2)))
    return grid


def format_table(rows: dict[str, dict]) -> str:
    """Rows of accuracies as a fixed-width text table."""
    cols = ("shape_color_accuracy", "background_color_accuracy", "shape_accuracy", "all_accuracy", "n_images")
    heads = ("", "shape colour", "background", "shape", "all three", "images")
    width = max(len(k) for k in rows) + 2
    lines = [f"{heads[0]:<{width}}" + "".join(f"{h:>14}" for h in heads[1:])]
    for name, r in rows.items():
        cells = [f"{100 * r[c]:13.1f}%" if c != "n_images" else f"{r[c]:>14d}" for c in cols]
        lines.append(f"{name:<{width}}" + "".join(cells))
    return "\n".join(lines)
