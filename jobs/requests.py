"""The request bodies of `POST /generate` and `POST /finetune`: validated by the API, stored in the job record, read
back by the worker. Torch-free.

Each field's default, bounds and description come from `minidalle.params` (the library's one definition); the API's
spelling of a field is its `api` name there (`num_images` for the library's `num_images_per_prompt`). The worker
turns a request into library arguments with `pipeline_kwargs` / `train_kwargs`: the one place the two vocabularies
meet. Operator caps (`max_steps`, `max_train_steps`, ...) are the API's settings, checked in its routes.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator
from pydantic.json_schema import SkipJsonSchema

from jobs.volume import ID_PATTERN
from minidalle.a1111 import split_lora_tags
from minidalle.params import ADAPTER_NAME_PATTERN, FINETUNE, GENERATE, Finetune, Generate, Param

MAX_PROMPT_CHARS = 4000  # far above any text encoder's token limit; the tokenizer's count is checked too


def _unicode(v: str) -> str:
    """Text that can be written anywhere (PNG chunks, logs, JSON answers): no lone surrogates."""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (it holds a lone surrogate such as \\ud800)") from None
    return v


Text = Annotated[str, AfterValidator(_unicode)]


def _webhook_url() -> Any:
    return Field(None, max_length=2048, description="POSTed (signed, Standard Webhooks) when the job ends; private "
                 "and loopback addresses are refused unless the operator allows them.")


def _webhook_progress() -> Any:
    return Field(False, description="Also POST `job.progress` events while the job runs (best effort).")


def field(p: Param, **overrides: Any) -> Any:
    """A pydantic Field with the parameter's default, bounds and help."""
    spec: dict[str, Any] = dict(default=p.default if p.max_items is None else list(p.default), description=p.help,
                                ge=p.ge, gt=p.gt, le=p.le, lt=p.lt, multiple_of=p.multiple_of)
    if p.max_items is not None:
        spec.update(default_factory=lambda: list(p.default), max_length=p.max_items)
        del spec["default"]
    spec.update(overrides)
    return Field(**{k: v for k, v in spec.items() if v is not None or k == "default"})


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def _choice(p: Param, value: str | None) -> str | None:
    if value is not None and value not in (p.choices or ()):
        raise ValueError(f"unknown {p.name} {value!r}; choose one of {', '.join(p.choices or ())}")
    return value


class AdapterRef(_Body):
    name: str = Field(pattern=ADAPTER_NAME_PATTERN, description="An adapter listed by GET /adapters.")
    scale: float = field(Generate.adapter_scale, strict=True)


class GenerateRequest(_Body):
    model_config = ConfigDict(
        extra="forbid",
        allow_inf_nan=False,
        json_schema_extra={
            "examples": [
                {"prompt": "a red circle on a blue background", "negative_prompt": "blurry", "num_images": 2,
                 "num_inference_steps": 20, "guidance_scale": 7.5, "seed": 42, "scheduler": "dpmpp_2m",
                 "adapters": []}
            ]
        },
    )

    # numbers are strict: `true` or "2" for an image count is a mistake to report, not to guess at
    prompt: Text = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    negative_prompt: Text | None = Field(None, max_length=MAX_PROMPT_CHARS)
    num_images: int = field(Generate.num_images_per_prompt, strict=True)
    num_inference_steps: int = field(Generate.num_inference_steps, strict=True)
    guidance_scale: float = field(Generate.guidance_scale, strict=True)
    seed: int | None = field(Generate.seed, strict=True)
    width: int | None = field(Generate.width, strict=True)
    height: int | None = field(Generate.height, strict=True)
    scheduler: Text | None = field(Generate.scheduler)
    adapters: list[AdapterRef] = Field(default_factory=list, max_length=Generate.max_adapters)
    prior: Text = field(Generate.prior)
    prior_guidance_scale: float = field(Generate.prior_guidance_scale, strict=True)
    prior_num_inference_steps: int = field(Generate.prior_num_inference_steps, strict=True)
    ip_adapter_scale: float = field(Generate.ip_adapter_scale, strict=True)
    webhook_url: Text | None = _webhook_url()
    webhook_progress: bool = _webhook_progress()

    @field_validator("prior")
    @classmethod
    def _known_prior(cls, v: str) -> str:
        return _choice(Generate.prior, v) or v

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        text, _ = split_lora_tags(v)  # a malformed <lora:…> tag is this field's error
        if not text.strip():
            raise ValueError("must not be blank" if not v.strip() else "must say more than <lora:…> tags")
        return v

    @field_validator("negative_prompt")
    @classmethod
    def _no_lora_tags(cls, v: str | None) -> str | None:
        if v is not None and split_lora_tags(v, field="negative_prompt")[1]:
            raise ValueError("<lora:…> tags select adapters in the prompt; a negative prompt can't take them")
        return v

    image_id: SkipJsonSchema[None] = None  # a variation's image (VariationRequest); never in a POST /generate body

    def prompt_text(self) -> str:
        """The prompt without its `<lora:name:weight>` tags: what the text encoder reads."""
        return split_lora_tags(self.prompt)[0]

    def prompt_adapters(self) -> list[AdapterRef]:
        """The adapters the prompt's `<lora:name:weight>` tags select (A1111's syntax), in order."""
        return [AdapterRef(name=name, scale=weight) for name, weight in split_lora_tags(self.prompt)[1]]

    def all_adapters(self) -> list[AdapterRef]:
        """`adapters`, then those the prompt's tags add: what the job runs with."""
        return [*self.adapters, *self.prompt_adapters()]

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, v: str | None) -> str | None:
        return _choice(Generate.scheduler, v)

    def pipeline_kwargs(self) -> dict[str, Any]:
        """`MiniDallePipeline.__call__` keywords (adapters as (name, scale) pairs; the caller resolves names)."""
        out: dict[str, Any] = {"prompt": self.prompt_text(), "negative_prompt": self.negative_prompt}
        for name, p in GENERATE.items():
            if p.api_name in type(self).model_fields:
                out[name] = getattr(self, p.api_name)
        out["adapters"] = [(a.name, a.scale) for a in self.all_adapters()]
        return out

    def batch_key(self) -> str:
        """Requests with equal keys can share one denoising loop (`MiniDallePipeline.generate_many`): the same
        steps, guidance, size, scheduler, adapters with their scales (in order) and prior settings; variations
        only with variations. Prompts, negative prompts, seeds, image counts and a variation's image stay each
        request's own. A size left out is not merged with the same size given."""
        shared = {"steps": self.num_inference_steps, "guidance": self.guidance_scale, "width": self.width,
                  "height": self.height, "scheduler": self.scheduler,
                  "adapters": [[a.name, a.scale] for a in self.all_adapters()], "prior": self.prior,
                  "prior_guidance": self.prior_guidance_scale, "prior_steps": self.prior_num_inference_steps,
                  "ip_scale": self.ip_adapter_scale, "variation": self.image_id is not None}
        return hashlib.sha256(json.dumps(shared, sort_keys=True).encode()).hexdigest()[:20]


class VariationRequest(GenerateRequest):
    """A `POST /variations` job: images like an uploaded image (its CLIP image embedding as the UNet's image tokens),
    with an optional prompt. Written by the API from the form; a generate job like any other (queue, caps, batching
    with other variations of the same settings)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prompt: Text = Field("", max_length=MAX_PROMPT_CHARS, description="Optional text to steer the variations.")
    image_id: str = Field(pattern=ID_PATTERN, description="Where the API put the image: uploads/{image_id}/.")  # type: ignore[assignment]

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        split_lora_tags(v)  # a malformed <lora:…> tag is this field's error; a blank prompt is fine
        return v

    @field_validator("prior")
    @classmethod
    def _known_prior(cls, v: str) -> str:
        if v != "mlp":
            raise ValueError("a variation's image embedding is its image's: leave prior as 'mlp'")
        return v


def generate_request(data: dict[str, Any]) -> GenerateRequest:
    """A stored generate job's request: a variation when it names an image."""
    return (VariationRequest if data.get("image_id") else GenerateRequest).model_validate(data)


class FinetuneRequest(_Body):
    model_config = ConfigDict(
        extra="forbid",
        allow_inf_nan=False,
        json_schema_extra={
            "examples": [
                {"name": "my-style", "dataset_id": "0f8b5c2e9d7a4b1c8e3f6a5d4c3b2a19", "steps": 500,
                 "learning_rate": 1e-4, "rank": 8, "alpha": 16, "validation_prompts": ["a red circle"],
                 "checkpoint_every": 100}
            ]
        },
    )

    name: str = Field(pattern=ADAPTER_NAME_PATTERN, description="Name of the adapter this job publishes.")
    dataset_id: str | None = Field(None, pattern=ID_PATTERN, description="From POST /datasets.")
    steps: int = field(Finetune.steps)
    learning_rate: float = field(Finetune.learning_rate)
    lr_scheduler: Text = field(Finetune.lr_scheduler)
    lr_warmup_steps: int = field(Finetune.lr_warmup_steps)
    rank: int = field(Finetune.rank)
    alpha: float = field(Finetune.alpha)
    dropout: float = field(Finetune.dropout)
    batch_size: int = field(Finetune.batch_size)
    grad_accum: int = field(Finetune.grad_accum)
    resolution: int | None = field(Finetune.resolution)
    train_prior: bool = field(Finetune.train_prior)
    caption_dropout: float = field(Finetune.caption_dropout)
    random_flip: bool = field(Finetune.random_flip)
    checkpoint_every: int | None = field(Finetune.checkpoint_every)
    validation_prompts: list[Text] = field(Finetune.validation_prompts)
    seed: int = field(Finetune.seed)
    webhook_url: Text | None = _webhook_url()
    webhook_progress: bool = _webhook_progress()

    @field_validator("lr_scheduler")
    @classmethod
    def _known_lr_scheduler(cls, v: str) -> str:
        return _choice(Finetune.lr_scheduler, v) or v

    def train_kwargs(self) -> dict[str, Any]:
        """`TrainConfig` keywords for the training fields (paths, model and resume are the worker's)."""
        return {name: getattr(self, p.api_name) for name, p in FINETUNE.items() if p.api_name}


def api_name(library_field: str) -> str:
    """The API's name for a library field (an InvalidInput's `field`), e.g. num_images_per_prompt -> num_images."""
    head, dot, rest = library_field.partition(".")
    p = GENERATE.get(head) or FINETUNE.get(head)
    return (p.api_name or head) + dot + rest if p is not None else library_field


class ImportRequest(_Body):
    """An import job (`POST /adapters`): convert the LoRA file uploaded to the data volume into adapter `name`.
    Written by the API, never by a client: the client sends the file and the name as a form."""

    name: str = Field(pattern=ADAPTER_NAME_PATTERN, description="Name of the adapter this job publishes.")
    upload_id: str = Field(pattern=ID_PATTERN, description="Where the API put the file: uploads/{upload_id}/.")
    filename: Text | None = Field(None, max_length=255, description="The uploaded file's name (for messages).")
