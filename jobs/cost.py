"""What a job costs, in estimated seconds of one worker, from step times the workers measured. Torch-free.

A denoising step's work grows with the latent tokens P = (height / f) · (width / f) (f: the VAE's downsampling),
linearly for the convolutions and quadratically for self-attention, and with the images in the batch (twice for
classifier-free guidance, whose two halves run together):

    step_seconds(P, batch) = batch · (a · P + b · P²)

Workers append what they measured to a per-model list (`record`): the tokens, the batch factor and the mean seconds
per step of each finished job, plus two one-step runs at start-up (the native size and twice its side), so there are
two sizes to fit `a` and `b` by least squares before the first request. A fine-tune step is fitted the same way from
training steps; until one was measured it is taken as `TRAIN_FACTOR` forward passes. With no measurement at all,
`default_step_s` (a setting) is assumed for one image at the model's native size.

    minidalle:cost:{model}:{generate|finetune}   list of JSON [tokens, batch, seconds_per_step], newest first, capped
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import cast

import redis

PREFIX = "minidalle:cost:"
KEEP = 200  # samples per model and kind: enough to follow a change (new GPU, other dtype), cheap to fit
TRAIN_FACTOR = 3.0  # a training step ≈ forward + backward ≈ 3 forward passes of the same batch
NATIVE_QUADRATIC_SHARE = 0.3  # prior with one size only: attention's share of a step at the native size
DECODE_STEPS = 1.0  # the VAE decode and PNG per image cost about one step (a floor, not fitted)


REFIT_S = 2.0
_FITS: dict[tuple, tuple[StepModel, float]] = {}


def samples_key(model: str, kind: str) -> str:
    return f"{PREFIX}{model}:{kind}"


def tokens(width: int, height: int, vae_factor: int) -> int:
    return max(1, (width // vae_factor) * (height // vae_factor))


@dataclass
class StepModel:
    a: float  # seconds per token per batch item
    b: float  # seconds per token² per batch item
    measured: bool  # False: the default assumption, no worker measured this model yet

    def step_s(self, p: int, batch: float) -> float:
        return batch * (self.a * p + self.b * p * p)


def fit(samples: list[tuple[float, float, float]], native_tokens: int, default_step_s: float) -> StepModel:
    """Least squares for `s / batch = a·P + b·P²` (a, b ≥ 0); one size only: the prior's split at the native size."""
    points = [(p, s / batch) for p, batch, s in samples if p > 0 and batch > 0 and s > 0]
    if not points:
        return _prior(default_step_s, native_tokens, measured=False)
    if len({p for p, _ in points}) < 2:
        p0, y0 = points[0][0], sum(y for _, y in points) / len(points)
        # scale the prior so that it passes through the measured size
        shape = (1 - NATIVE_QUADRATIC_SHARE) * p0 / native_tokens + NATIVE_QUADRATIC_SHARE * (p0 / native_tokens) ** 2
        return _prior(y0 / shape, native_tokens, measured=True)
    s11 = sum(p * p for p, _ in points)
    s12 = sum(p**3 for p, _ in points)
    s22 = sum(p**4 for p, _ in points)
    t1 = sum(p * y for p, y in points)
    t2 = sum(p * p * y for p, y in points)
    det = s11 * s22 - s12 * s12
    a = (t1 * s22 - t2 * s12) / det if det else 0.0
    b = (s11 * t2 - s12 * t1) / det if det else 0.0
    if a < 0 or b < 0:  # noise pushed one below zero: the best fit with that term at zero
        a, b = (max(t1 / s11, 0.0), 0.0) if b < 0 else (0.0, max(t2 / s22, 0.0))
    return StepModel(a, b, measured=True)


def _prior(native_step_s: float, native_tokens: int, *, measured: bool) -> StepModel:
    n = float(native_tokens)
    return StepModel((1 - NATIVE_QUADRATIC_SHARE) * native_step_s / n, NATIVE_QUADRATIC_SHARE * native_step_s / n**2,
                     measured)


class CostModel:
    """Estimates for one model, read from (and fed into) Redis."""

    def __init__(self, client: redis.Redis, model: str, *, native_size: int, vae_factor: int, default_step_s: float):
        self.r, self.model = client, model
        self.vae_factor = vae_factor
        self.native_tokens = tokens(native_size, native_size, vae_factor)
        self.default_step_s = default_step_s

    def _model(self, kind: str) -> StepModel:
        """The fit of the recorded samples, refitted at most every `REFIT_S` per process (a flood of requests
        must not each read and fit 200 samples)."""
        key = (samples_key(self.model, kind), self.native_tokens, self.default_step_s)
        hit = _FITS.get(key)
        if hit is not None and time.monotonic() - hit[1] < REFIT_S:
            return hit[0]
        raw = cast(list[str], self.r.lrange(samples_key(self.model, kind), 0, KEEP - 1))
        model = fit([tuple(json.loads(x)) for x in raw], self.native_tokens, self.default_step_s)
        _FITS[key] = (model, time.monotonic())
        return model

    def generate_s(self, *, width: int, height: int, steps: int, images: int, guidance_scale: float) -> float:
        """Estimated seconds of a generate job on one worker."""
        m = self._model("generate")
        step = m.step_s(tokens(width, height, self.vae_factor), images * (2 if guidance_scale > 1 else 1))
        return step * (steps + DECODE_STEPS)

    def generate_step_s(self, *, width: int, height: int, images: int, guidance_scale: float) -> float:
        m = self._model("generate")
        return m.step_s(tokens(width, height, self.vae_factor), images * (2 if guidance_scale > 1 else 1))

    def finetune_s(self, *, resolution: int, steps: int, batch_size: int, grad_accum: int,
                   validation_prompts: int, checkpoints: int) -> float:
        """Estimated seconds of a fine-tune: its steps, plus the validation images rendered at each checkpoint."""
        p = tokens(resolution, resolution, self.vae_factor)
        m = self._model("finetune")
        if m.measured:
            step = m.step_s(p, batch_size * grad_accum)
        else:
            step = TRAIN_FACTOR * self._model("generate").step_s(p, batch_size * grad_accum)
        validation = validation_prompts * (checkpoints + 1) * self.generate_s(
            width=resolution, height=resolution, steps=20, images=1, guidance_scale=7.5)
        return step * steps + validation


def record_commands(model: str, kind: str, *, tokens: int, batch: float, step_s: float) -> list[tuple]:
    """The Redis commands that add one measurement (a worker sends them with a job's last events)."""
    key = samples_key(model, kind)
    return [("LPUSH", key, json.dumps([tokens, batch, round(step_s, 6)])), ("LTRIM", key, 0, KEEP - 1)]


def record(client: redis.Redis, model: str, kind: str, *, tokens: int, batch: float, step_s: float) -> None:
    """A worker measured `step_s` seconds per step for `tokens` latent tokens and batch factor `batch`."""
    p = client.pipeline(transaction=False)
    for command in record_commands(model, kind, tokens=tokens, batch=batch, step_s=step_s):
        p.execute_command(*command)
    p.execute()
