"""`TrainConfig`: what a fine-tune is asked to do.

The user-facing fields take their defaults and bounds from `minidalle.params.Finetune` (which the CLI's flags and the
API's `POST /finetune` body are derived from too); the rest are the library's own knobs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from minidalle.adapters import LoraSettings
from minidalle.errors import InvalidInput
from minidalle.params import FINETUNE, Finetune, checkpoint_interval

P = Finetune


@dataclass
class TrainConfig:
    dataset_dir: str
    output_dir: str  # the final adapter folder
    model: str | None = None  # folder or hub id; None = the embedded default (ignored when a pipeline is passed)
    work_dir: str | None = None  # checkpoints/ and validation/; default: "<output_dir>.work"
    steps: int = P.steps.default  # optimizer steps
    learning_rate: float = P.learning_rate.default
    lr_scheduler: str = P.lr_scheduler.default  # constant | cosine | linear, each after lr_warmup_steps of warmup
    lr_warmup_steps: int = P.lr_warmup_steps.default
    rank: int = P.rank.default
    alpha: float = P.alpha.default  # alpha / rank = 2: the LoRA update's scale
    dropout: float = P.dropout.default
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v"])
    train_prior: bool = P.train_prior.default
    prior_learning_rate: float | None = None  # None: same as learning_rate
    batch_size: int = P.batch_size.default
    grad_accum: int = P.grad_accum.default
    resolution: int | None = P.resolution.default  # None: the model's native size
    random_flip: bool = P.random_flip.default
    caption_dropout: float = P.caption_dropout.default  # empty caption this often: guidance keeps working
    max_grad_norm: float = 1.0
    weight_decay: float = 1e-2
    mixed_precision: str = P.mixed_precision.default  # auto: the pipeline's dtype on CUDA, fp32 on CPU
    gradient_checkpointing: bool = P.gradient_checkpointing.default  # ~30 % slower, much less activation memory
    cache: bool = True  # cache text-encoder states and VAE latent distributions (both frozen)
    checkpoint_every: int | None = P.checkpoint_every.default  # None: about ten per run; 0: only the final state
    keep_checkpoints: int = 2
    resume: bool = True  # continue from the latest checkpoint in work_dir
    validation_prompts: list[str] = field(default_factory=list)
    validation_steps: int = 20
    validation_guidance_scale: float = 7.5
    validation_seed: int = 0
    seed: int = P.seed.default

    def check(self) -> None:
        """InvalidInput naming the first bad field, before any model work."""
        for name, param in FINETUNE.items():
            param.check(getattr(self, name))

        def need(ok: bool, name: str, msg: str) -> None:
            if not ok:
                raise InvalidInput(name, f"{msg}, got {getattr(self, name)!r}")

        need(self.prior_learning_rate is None or 0 < self.prior_learning_rate <= 1, "prior_learning_rate",
             "must be in (0, 1]")
        need(self.max_grad_norm > 0, "max_grad_norm", "must be > 0")
        need(isinstance(self.keep_checkpoints, int) and self.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")
        need(isinstance(self.validation_steps, int) and 1 <= self.validation_steps <= 1000, "validation_steps",
             "must be in [1, 1000]")
        self.lora.check()

    @property
    def checkpoint_interval(self) -> int:
        """Steps between checkpoints (0: none before the final adapter)."""
        return checkpoint_interval(self.steps, self.checkpoint_every)

    @property
    def lora(self) -> LoraSettings:
        return LoraSettings(rank=self.rank, alpha=self.alpha, dropout=self.dropout,
                            target_modules=list(self.target_modules))

    @property
    def work_path(self) -> Path:
        return Path(self.work_dir) if self.work_dir else Path(f"{self.output_dir}.work")
