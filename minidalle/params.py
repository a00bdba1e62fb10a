"""What a generation and a fine-tune take, each parameter defined once: name, type, default, bounds, help. Torch-free.

Everything else is derived from these definitions:
- the library checks its inputs with them (`MiniDallePipeline.check_inputs`, `TrainConfig.check`);
- the CLI builds its flags from them (`minidalle.cli`), with each surface's own spelling in `flag`;
- the job contract builds the API's request bodies from them (`jobs.requests`), with the API's spelling in `api`.

A surface keeps its own vocabulary (the CLI's `--steps`, the API's `num_images`, the library's
`num_inference_steps`); `flag` and `api` are the one place that maps it. Operator caps (the API's `max_steps`, ...)
are settings of the service, not bounds of the model, and live there.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from minidalle.errors import InvalidInput

# sampler name -> (diffusers scheduler class, config it adds to the model's own); names follow the usual community
# spellings (A1111 / ComfyUI). `minidalle.schedulers` builds them; the API checks names without importing diffusers.
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "kdpm2": ("KDPM2DiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpmpp_2s": ("DPMSolverSinglestepScheduler", {}),
    "deis": ("DEISMultistepScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}
SCHEDULER_NAMES = tuple(sorted(SCHEDULERS))
ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
ADAPTER_NAME_RE = re.compile(ADAPTER_NAME_PATTERN)
PRIORS = ("mlp", "diffusion")  # what makes the UNet's conditioning (see Generate.prior)
MAX_SEED = 2**62  # image i is seeded with seed + i: stay far from int64's edge
# weight dtypes by name (the CLI's --dtype, the worker's MINIDALLE_TORCH_DTYPE): short names and torch's own
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
DTYPE_ALIASES = {**{v: v for v in DTYPES.values()}, **DTYPES}


@dataclass(frozen=True)
class Param:
    """One parameter. `name` is the library's (a pipeline keyword or a TrainConfig field); it is filled in from the
    attribute the Param is assigned to in its group class."""

    type: type
    default: Any
    help: str
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    multiple_of: int | None = None
    choices: tuple[str, ...] | None = None
    max_items: int | None = None  # list parameters: at most this many items
    nullable: bool = False  # None is allowed (and means what `help` says: the model's own, random, ...)
    flag: str | None = ""  # CLI flag; "" = derived from the name (`--learning-rate`), None = not a flag
    api: str | None = ""  # API field; "" = the name itself, None = not in the API
    name: str = ""

    def __set_name__(self, owner: object, name: str) -> None:
        object.__setattr__(self, "name", name)

    @property
    def cli_flag(self) -> str | None:
        return "--" + self.name.replace("_", "-") if self.flag == "" else self.flag

    @property
    def api_name(self) -> str | None:
        return self.name if self.api == "" else self.api

    def bounds(self) -> str:
        """The bounds in words, e.g. `in [1, 1000]`, `a multiple of 8 in [8, 8192]`, `one of: a, b`."""
        if self.choices is not None:
            return "one of: " + ", ".join(self.choices)
        lo = f"[{_num(self.ge)}" if self.ge is not None else f"({_num(self.gt)}" if self.gt is not None else "(-inf"
        hi = f"{_num(self.le)}]" if self.le is not None else f"{_num(self.lt)})" if self.lt is not None else "inf)"
        text = f"in {lo}, {hi}" if (lo, hi) != ("(-inf", "inf)") else ""
        if self.multiple_of:
            text = f"a multiple of {self.multiple_of}" + (f" {text}" if text else "")
        return text

    def check(self, value: Any, field: str | None = None) -> None:
        """InvalidInput naming the field unless `value` is of this parameter's type and within its bounds."""
        field = field or self.name
        if value is None:
            if self.nullable:
                return
            raise InvalidInput(field, "is required")
        if self.max_items is not None:
            if not isinstance(value, list | tuple) or not all(isinstance(v, self.type) for v in value):
                raise InvalidInput(field, f"must be a list of {self.type.__name__}, got {value!r}")
            if len(value) > self.max_items:
                raise InvalidInput(field, f"at most {self.max_items} items, got {len(value)}")
            return
        if not _is_a(value, self.type):
            raise InvalidInput(field, f"must be {_article(self.type)}, got {value!r}")
        if self.choices is not None:
            if value not in self.choices:
                raise InvalidInput(field, f"unknown {self.name} {value!r}; choose {self.bounds()}")
            return
        number = float(value) if self.type in (int, float) else None
        if number is None:
            return
        ok = math.isfinite(number) and all((
            self.ge is None or number >= self.ge, self.gt is None or number > self.gt,
            self.le is None or number <= self.le, self.lt is None or number < self.lt,
            not self.multiple_of or int(number) % self.multiple_of == 0,
        ))
        if not ok:
            raise InvalidInput(field, f"must be {self.bounds()}, got {value!r}")


def _is_a(value: Any, typ: type) -> bool:
    if typ is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if typ is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, typ)


def _article(typ: type) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(typ, typ.__name__)


def _num(x: float | None) -> str:
    if x is None:
        return ""
    if x == MAX_SEED:
        return "2^62"
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def params_of(group: type) -> dict[str, Param]:
    """The Params of a group class, by library name, in definition order."""
    return {p.name: p for p in vars(group).values() if isinstance(p, Param)}


class Generate:
    """`MiniDallePipeline.__call__`'s keywords (diffusers' names), the CLI's `generate` flags, `POST /generate`."""

    num_inference_steps = Param(int, 25, "denoising steps", ge=1, le=1000, flag="--steps")
    guidance_scale = Param(float, 7.5, "classifier-free guidance scale; 1 or less turns it off", ge=0, le=50)
    num_images_per_prompt = Param(int, 1, "images per prompt", ge=1, le=64, flag="--num-images", api="num_images")
    width = Param(int, None, "pixels (default: the model's native size)", ge=8, le=8192, multiple_of=8,
                  nullable=True)
    height = Param(int, None, "pixels (default: the model's native size)", ge=8, le=8192, multiple_of=8,
                   nullable=True)
    seed = Param(int, None, "seed of the first image; image i uses seed + i (default: random)", ge=0, lt=MAX_SEED,
                 nullable=True)
    scheduler = Param(str, None, "sampler (default: the model's own)", choices=SCHEDULER_NAMES, nullable=True)
    adapter_scale = Param(float, 1.0, "LoRA strength; 0 disables, 1 is as trained", ge=-10, le=10, flag=None,
                          api="scale")
    prior = Param(str, "mlp", "mlp: the text embedding through the MLP prior; diffusion: the diffusion prior also "
                  "samples a CLIP image embedding from the prompt, which conditions the UNet as image tokens (a "
                  "different one for each seed)", choices=PRIORS)
    prior_guidance_scale = Param(float, 4.0, "classifier-free guidance of the diffusion prior; 1 turns it off",
                                 ge=1, le=50)
    prior_num_inference_steps = Param(int, 10, "sampling steps of the diffusion prior", ge=1, le=1000,
                                      flag="--prior-steps")
    ip_adapter_scale = Param(float, 1.0, "weight of the image tokens (the diffusion prior's embedding, or the image "
                             "of a variation); 0 ignores them", ge=0, le=10)
    max_adapters = 8  # adapters active in one generation


class Finetune:
    """`TrainConfig`'s user-facing fields, the CLI's `finetune` flags, `POST /finetune` (the same names)."""

    steps = Param(int, 500, "optimizer steps", ge=1, le=1_000_000)
    learning_rate = Param(float, 1e-4, "AdamW learning rate of the LoRA (and the prior)", gt=0, le=1)
    lr_scheduler = Param(str, "constant", "learning-rate schedule after the warmup",
                         choices=("constant", "cosine", "linear"))
    lr_warmup_steps = Param(int, 0, "steps of linear learning-rate warmup", ge=0, le=1_000_000)
    rank = Param(int, 8, "LoRA rank", ge=1, le=512)
    alpha = Param(float, 16.0, "LoRA alpha; alpha / rank scales the update (16 / 8 = 2)", gt=0, le=4096)
    dropout = Param(float, 0.1, "LoRA dropout", ge=0, lt=1)
    batch_size = Param(int, 1, "images per micro-step", ge=1, le=1024)
    grad_accum = Param(int, 1, "micro-steps per optimizer step (gradient accumulation)", ge=1, le=1024)
    resolution = Param(int, None, "training resolution in pixels (default: the model's native size)", ge=8,
                       le=2048, multiple_of=8, nullable=True)
    train_prior = Param(bool, True, "train the priors too: the MLP prior and, on a model with one, a LoRA on the "
                        "diffusion prior (off: plain LoRA, which stock diffusers also loads)")
    caption_dropout = Param(float, 0.05, "train on the empty caption this often, so classifier-free guidance keeps "
                            "working", ge=0, lt=1)
    random_flip = Param(bool, False, "mirror images at random")
    mixed_precision = Param(str, "auto", "auto: the model's dtype on CUDA, fp32 on CPU",
                            choices=("auto", "no", "fp16", "bf16"), api=None)
    gradient_checkpointing = Param(bool, False, "less activation memory on big UNets, ~30 % slower", api=None)
    checkpoint_every = Param(int, None, "save a resumable checkpoint every N steps; 0: only the final adapter "
                             "(default: about ten per run)", ge=0, le=1_000_000, nullable=True)
    validation_prompts = Param(str, (), "prompts rendered with a fixed seed at each checkpoint", max_items=8,
                               flag="--validation-prompt")
    seed = Param(int, 0, "seed of every random draw of the run (same seed, same weights)", ge=0, lt=MAX_SEED)


GENERATE = params_of(Generate)
FINETUNE = params_of(Finetune)


def check_adapter_name(name: Any, field: str = "name") -> str:
    if not isinstance(name, str) or not ADAPTER_NAME_RE.match(name):
        raise InvalidInput(field, f"adapter name {name!r} must be 1-64 characters of letters, digits, '-' or '_', "
                           "starting with a letter or digit")
    return name


def min_inference_steps(scheduler_class: str, config: dict[str, Any]) -> int:
    """Fewest denoising steps a scheduler can run: PNDM with its Runge-Kutta warm-up (`skip_prk_steps` off, as a
    DDIM-style config leaves it) needs 4; SD 1.5's own PNDM config skips it, and the others run with 1."""
    if scheduler_class == "PNDMScheduler" and not config.get("skip_prk_steps", False):
        return 4
    return 1


def min_steps_for(scheduler: str | None, model_scheduler_config: dict[str, Any]) -> int:
    """`min_inference_steps` of sampler `scheduler` (None: the model's own) built from a model's scheduler config."""
    if scheduler is None:
        return min_inference_steps(model_scheduler_config.get("_class_name", ""), model_scheduler_config)
    cls, extra = SCHEDULERS[scheduler]
    return min_inference_steps(cls, {**model_scheduler_config, **extra})


def checkpoint_interval(steps: int, every: int | None) -> int:
    """The checkpoint interval a run uses: `every` when given, else about ten checkpoints per run (a worker that
    dies loses at most a tenth of the work)."""
    return every if every is not None else max(1, steps // 10)
