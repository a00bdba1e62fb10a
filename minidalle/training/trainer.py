"""LoRA (+ prior) fine-tuning: tokenize → CLIP → prior → VAE latents → noise → LoRA-UNet → MSE → backprop.

The text encoder, VAE and UNet base weights are frozen; only the LoRA matrices and (optionally) a copy of the prior
MLP train. Because the frozen parts are deterministic, their outputs are cached once per dataset.

With `train_prior` on a model that has a diffusion prior and a CLIP image encoder, a LoRA (the same settings) on the
diffusion prior's PriorTransformer learns the dataset's (caption → CLIP image embedding of its image) pairs by the
prior's own objective, next to the UNet's: a new word then means its images for `prior="diffusion"` too.

Every random draw of micro-step m (sample order, latent sample, noise, timesteps, caption dropout, LoRA dropout) comes
from seeds derived from (config.seed, m), so N steps straight and N/2 + resume + N/2 give identical weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import ImageOps
from safetensors.torch import load_file, save_file

from minidalle.adapters import save_adapter
from minidalle.data import Example, dataset_hash, load_image, read_image, scan_dataset
from minidalle.devices import resolve_dtype
from minidalle.errors import Cancelled, InvalidInput
from minidalle.lora_layers import LoraLayers, add_lora, delete_lora, lora_state
from minidalle.training.checkpoint import flatten_optimizer, jsonable, latest_checkpoint, step_of, unflatten_optimizer
from minidalle.training.config import TrainConfig

log = logging.getLogger(__name__)
LOCAL_FIELDS = ("dataset_dir", "output_dir", "work_dir", "model")  # paths: not written into adapter.json
TRAIN_ADAPTER = "minidalle-train"  # name of the LoRA being trained on a (possibly resident) UNet
VALIDATION_ADAPTER = "minidalle-validation"
ProgressCallback = Callable[[dict[str, Any]], None]


@dataclass
class TrainResult:
    adapter_dir: Path
    steps: int
    loss: float
    checkpoints: list[Path]
    validation_images: list[Path]
    seconds: float
    resolution: int  # the training resolution used (the model's native size unless asked)


def _seed(base: int, m: int, salt: int = 0) -> int:
    # distinct, reproducible seeds per (run seed, micro-step, purpose)
    return (base * 1_000_003 + m * 97 + salt) % (2**63 - 1)


class Trainer:
    """Fine-tunes LoRA (+ prior) on a resident or freshly loaded MiniDallePipeline."""

    def __init__(self, config: TrainConfig, *, pipeline=None, on_progress: ProgressCallback | None = None):
        config.check()
        self.config, self.pipe, self.on_progress = config, pipeline, on_progress or (lambda event: None)
        self.step = 0
        self.checkpoints: list[Path] = []
        self.validation_images: list[Path] = []
        self._injected = False

    # ------------------------------------------------------------------------------------------------------------
    # setup
    def setup(self) -> None:
        cfg = self.config
        # 1. data (validated before any model work)
        self.examples: list[Example] = scan_dataset(cfg.dataset_dir)
        self.data_hash = dataset_hash(self.examples)
        # 2. model
        if self.pipe is None:
            from minidalle.devices import resolve_device, training_dtype
            from minidalle.pipeline import MiniDallePipeline

            dev = resolve_device(None)
            self.pipe = MiniDallePipeline.from_pretrained(cfg.model, torch_dtype=training_dtype(cfg.mixed_precision,
                                                                                                dev), device=dev)
        pipe = self.pipe
        self.device, self.dtype = pipe.device, pipe.dtype
        self.amp_dtype = self._amp_dtype()
        self.resolution = cfg.resolution or pipe.default_height
        if self.resolution % pipe.vae_scale_factor:
            raise InvalidInput("resolution", f"must be a multiple of {pipe.vae_scale_factor} for this model")
        self.noise_scheduler = _training_scheduler(pipe.scheduler.config)
        # 3. trainable parts: LoRA on the UNet, a copy of the prior MLP
        torch.manual_seed(cfg.seed)
        with warnings.catch_warnings():  # peft warns when the UNet already carries (served) adapters: expected
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            pipe.unet.add_adapter(cfg.lora.peft_config(), adapter_name=TRAIN_ADAPTER)
        self._injected = True
        pipe.unet.enable_lora()
        pipe.unet.set_adapters([TRAIN_ADAPTER])
        pipe.prior.set_active([])  # adapters a served request left active must not shape this training
        pipe.set_image_tokens(False)  # the LoRA trains on the text-conditioned UNet (no IP-Adapter processors)
        pipe.select_unet(lora_active=True)  # the separate to_q/to_k/to_v the LoRA sits on (not a fused fast path)
        self.lora_params = [p for n, p in pipe.unet.named_parameters() if f".{TRAIN_ADAPTER}." in n]
        for p in pipe.unet.parameters():
            p.requires_grad_(False)
        for p in self.lora_params:
            p.data = p.data.float()  # trainable weights in fp32 even over a half-precision base
            p.requires_grad_(True)
        self.prior_mlp = pipe.prior.new_adapter_mlp().float() if cfg.train_prior else None
        self.diffusion_prior = pipe.diffusion_prior if cfg.train_prior and pipe.diffusion_prior is not None \
            and pipe.image_encoder is not None else None
        self.prior_lora_params: list[torch.nn.Parameter] = []
        if self.diffusion_prior is not None:
            net = self.diffusion_prior.net
            self.prior_lora_params = add_lora(net, TRAIN_ADAPTER, cfg.lora.peft_config())
            self._prior_loras = LoraLayers(net)
            self._prior_loras.set_active([(TRAIN_ADAPTER, 1.0)])
            for p in net.parameters():
                p.requires_grad_(False)
            for p in self.prior_lora_params:
                p.data = p.data.float()
                p.requires_grad_(True)
        if cfg.gradient_checkpointing:
            pipe.unet.enable_gradient_checkpointing()
        groups = [{"params": self.lora_params, "lr": cfg.learning_rate}]
        if self.prior_mlp is not None:
            groups.append({"params": list(self.prior_mlp.parameters()),
                           "lr": cfg.prior_learning_rate or cfg.learning_rate})
        if self.prior_lora_params:
            groups.append({"params": self.prior_lora_params, "lr": cfg.prior_learning_rate or cfg.learning_rate})
        self.optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
        self.lr_scheduler = _lr_scheduler(cfg, self.optimizer)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        # 4. caches of the frozen parts
        self._text_cache: dict[str, torch.Tensor] = {}
        self._latent_cache: dict[tuple[int, bool], tuple[torch.Tensor, torch.Tensor]] = {}
        self._prior_text_cache: dict[str, Any] = {}  # caption -> PriorCondition (1 row)
        self._embed_cache: dict[tuple[int, bool], torch.Tensor] = {}  # (image, flip) -> CLIP image embedding (P,)
        if cfg.cache:
            self._fill_caches()
        # 5. resume
        if cfg.resume and (ckpt := latest_checkpoint(cfg.work_path)) is not None:
            self.load_checkpoint(ckpt)

    def _amp_dtype(self) -> torch.dtype | None:
        mp = self.config.mixed_precision
        if mp == "auto":
            return self.dtype if self.device.type == "cuda" and self.dtype != torch.float32 else None
        if mp == "no":
            return None
        if mp == "fp16" and self.device.type != "cuda":
            raise InvalidInput("mixed_precision", "fp16 needs a CUDA device (use 'no' or 'bf16' on CPU)")
        return resolve_dtype(mp, self.device)

    @torch.no_grad()
    def _fill_caches(self) -> None:
        """Encode every caption and image once; reports `caching` events (long on a big dataset and model)."""
        captions = sorted({ex.caption for ex in self.examples} | {""})
        flips = (False, True) if self.config.random_flip else (False,)
        total, done = len(captions) + len(self.examples) * len(flips), 0
        for caption in captions:
            self._text_cache[caption] = self._encode_text([caption])[0]
            if self.diffusion_prior is not None:
                self._prior_text_cache[caption] = self._prior_condition([caption])
            done += 1
        self.on_progress(dict(type="caching", done=done, total=total))
        for i in range(len(self.examples)):
            for flip in flips:
                mean, std = self._encode_image([i], [flip])
                self._latent_cache[(i, flip)] = (mean[0], std[0])
                if self.diffusion_prior is not None:
                    self._embed_cache[(i, flip)] = self._image_embeds([i], [flip])[0]
                done += 1
            self.on_progress(dict(type="caching", done=done, total=total))

    @torch.no_grad()
    def _encode_text(self, captions: list[str]) -> torch.Tensor:  # (B, 77, D)
        tok = self.pipe.tokenizer(captions, padding="max_length", max_length=self.pipe.tokenizer.model_max_length,
                                  truncation=True, return_tensors="pt")
        return self.pipe.text_encoder(tok.input_ids.to(self.device))[0]

    @torch.no_grad()
    def _encode_image(self, idx: list[int], flips: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
        px = torch.stack([load_image(self.examples[i].path, self.resolution, f) for i, f in zip(idx, flips,
                                                                                                 strict=True)])
        dist = self.pipe.vae.encode(px.to(self.device, self.dtype)).latent_dist  # (B, 4, R/f, R/f)
        return dist.mean, dist.std

    @torch.no_grad()
    def _prior_condition(self, captions: list[str]):  # PriorCondition (B rows)
        return self.diffusion_prior.encode_prompt(captions, text_encoder=self.pipe.text_encoder,
                                                  tokenizer=self.pipe.tokenizer)

    @torch.no_grad()
    def _image_embeds(self, idx: list[int], flips: list[bool]) -> torch.Tensor:  # (B, P)
        images = [read_image(self.examples[i].path) for i in idx]  # oriented as the latents' images are
        return self.pipe.encode_image([ImageOps.mirror(im) if f else im for im, f in zip(images, flips, strict=True)])

    # ------------------------------------------------------------------------------------------------------------
    # one step
    def _batch_indices(self, m: int) -> list[int]:
        n, b = len(self.examples), self.config.batch_size
        out = []
        for pos in range(m * b, (m + 1) * b):
            epoch, k = divmod(pos, n)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(_seed(self.config.seed, epoch, 1)))
            out.append(int(perm[k]))
        return out

    def _micro_step(self, m: int) -> torch.Tensor:
        cfg, pipe = self.config, self.pipe
        g = torch.Generator().manual_seed(_seed(cfg.seed, m, 2))
        idx = self._batch_indices(m)
        b = len(idx)
        flips = (torch.rand(b, generator=g) < 0.5).tolist() if cfg.random_flip else [False] * b
        drop = (torch.rand(b, generator=g) < cfg.caption_dropout).tolist()
        captions = ["" if d else self.examples[i].caption for i, d in zip(idx, drop, strict=True)]
        # latents: cached distribution, sampled with this step's generator
        if cfg.cache:
            mean = torch.stack([self._latent_cache[(i, f)][0] for i, f in zip(idx, flips, strict=True)])
            std = torch.stack([self._latent_cache[(i, f)][1] for i, f in zip(idx, flips, strict=True)])
            hidden = torch.stack([self._text_cache[c] for c in captions])  # (B, 77, D)
        else:
            mean, std = self._encode_image(idx, flips)
            hidden = self._encode_text(captions)
        eps = torch.randn(mean.shape, generator=g).to(self.device, mean.dtype)
        latents = mean + std * eps
        vcfg = pipe.vae.config
        latents = (latents - (getattr(vcfg, "shift_factor", None) or 0.0)) * vcfg.scaling_factor
        noise = torch.randn(latents.shape, generator=g).to(self.device, latents.dtype)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (b,), generator=g).to(self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, t)
        else:
            target = noise
        torch.manual_seed(_seed(cfg.seed, m, 3))  # LoRA dropout draws from the global generator
        amp = torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()
        with amp:
            cond = self._condition(hidden)  # (B, 77, D_cross)
            pred = pipe.unet(noisy.to(self.dtype), t, encoder_hidden_states=cond.to(self.dtype)).sample
        loss = F.mse_loss(pred.float(), target.float())
        if self.diffusion_prior is None:
            return loss, None
        with amp:
            prior_loss = self._prior_loss(idx, flips, m).float()
        return loss, prior_loss

    def _prior_loss(self, idx: list[int], flips: list[bool], m: int) -> torch.Tensor:
        """The diffusion prior's own objective on this batch's (caption, CLIP image embedding) pairs. The prior
        drops captions for its guidance itself (its cond_drop_prob), so it gets the real ones."""
        from minidalle.diffusion_prior import PriorCondition

        captions = [self.examples[i].caption for i in idx]
        if self.config.cache:
            embeds = torch.stack([self._embed_cache[(i, f)] for i, f in zip(idx, flips, strict=True)])
            cond = PriorCondition.cat([self._prior_text_cache[c] for c in captions])
            uncond = self._prior_text_cache[""]
        else:
            embeds = self._image_embeds(idx, flips)
            both = self._prior_condition([*captions, ""])
            cond, uncond = both[: len(captions)], both[len(captions):]
        g = torch.Generator().manual_seed(_seed(self.config.seed, m, 4))
        return self.diffusion_prior.loss(embeds, cond, uncond, generator=g)

    def _condition(self, hidden: torch.Tensor) -> torch.Tensor:
        prior = self.pipe.prior
        if self.prior_mlp is None:
            with torch.no_grad():
                return prior(hidden)
        h = hidden.float()
        return _apply_proj(prior, h) + self.prior_mlp(h)  # what the adapter's prior computes at scale 1

    def _optimizer_step(self) -> float:
        cfg = self.config
        total, prior_total = 0.0, 0.0
        for k in range(cfg.grad_accum):
            loss, prior_loss = self._micro_step(self.step * cfg.grad_accum + k)
            both = loss if prior_loss is None else loss + prior_loss  # separate weights: the sum trains each on its own
            self.scaler.scale(both / cfg.grad_accum).backward()
            total += float(loss.detach()) / cfg.grad_accum
            if prior_loss is not None:
                prior_total += float(prior_loss.detach()) / cfg.grad_accum
        self.scaler.unscale_(self.optimizer)
        params = self.lora_params + (list(self.prior_mlp.parameters()) if self.prior_mlp is not None else [])
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        if self.prior_lora_params:  # its own norm: the prior's loss is on another scale than the UNet's
            torch.nn.utils.clip_grad_norm_(self.prior_lora_params, cfg.max_grad_norm)
            self.diffusion_prior_loss = prior_total
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return total

    # ------------------------------------------------------------------------------------------------------------
    # the loop
    def train(self) -> TrainResult:
        cfg = self.config
        start = time.perf_counter()
        self.pipe.unet.train()
        if self.diffusion_prior is not None:
            self.diffusion_prior.train()
        loss, step_times = float("nan"), []
        try:
            while self.step < cfg.steps:
                t0 = time.perf_counter()
                loss = self._optimizer_step()
                step_times.append(time.perf_counter() - t0)
                recent = step_times[-20:]
                per_step = sum(recent) / len(recent)
                event = dict(type="progress", step=self.step, total=cfg.steps, loss=loss,
                             lr=self.lr_scheduler.get_last_lr()[0],
                             samples_per_s=cfg.batch_size * cfg.grad_accum / max(per_step, 1e-9),
                             eta_s=per_step * (cfg.steps - self.step))
                if self.diffusion_prior is not None:
                    event["diffusion_prior_loss"] = self.diffusion_prior_loss
                every = cfg.checkpoint_interval
                if every and self.step % every == 0 and self.step < cfg.steps:
                    self._checkpoint_and_validate()
                self.on_progress(event)
        except Cancelled:
            if not self.checkpoints or step_of(self.checkpoints[-1]) != self.step:
                if self.step > 0:
                    self.save_checkpoint()
            raise
        self.pipe.unet.eval()
        if self.diffusion_prior is not None:
            self.diffusion_prior.eval()
        adapter_dir = self.export(Path(cfg.output_dir), loss=loss)
        if cfg.validation_prompts:
            self._validate(adapter_dir, tag="final")
        return TrainResult(adapter_dir=adapter_dir, steps=self.step, loss=loss, checkpoints=list(self.checkpoints),
                           validation_images=list(self.validation_images), seconds=time.perf_counter() - start,
                           resolution=self.resolution)

    def _checkpoint_and_validate(self) -> None:
        path = self.save_checkpoint()
        self.on_progress(dict(type="checkpoint", step=self.step, total=self.config.steps, path=str(path)))
        if self.config.validation_prompts:
            self._validate(path / "adapter", tag=f"step-{self.step:06d}")

    # ------------------------------------------------------------------------------------------------------------
    # artifacts
    def _lora_state(self) -> dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict

        return {k: v.detach().float().cpu() for k, v in
                get_peft_model_state_dict(self.pipe.unet, adapter_name=TRAIN_ADAPTER).items()}

    def export(self, out_dir: Path, loss: float | None = None) -> Path:
        """Write the adapter folder (adapter.safetensors, adapter.json, pytorch_lora_weights.safetensors)."""
        cfg = self.config
        # the recipe, not where it ran: folders are this machine's business (and a service's secret)
        training = {k: v for k, v in jsonable(dataclasses.asdict(cfg)).items() if k not in LOCAL_FIELDS}
        meta = dict(base_model=self.pipe.model_id, base_model_hash=self.pipe.model_hash,
                    training=training, steps=self.step, dataset_hash=self.data_hash,
                    num_images=len(self.examples), final_loss=loss, resolution=self.resolution,
                    created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    # which prior each generation path uses with this adapter: its own MLP (trained here) or the
                    # base model's; its LoRA on the diffusion prior (trained here) or the base model's diffusion
                    # prior as it is (the IP-Adapter head is the base model's either way)
                    priors=dict(mlp="adapter" if self.prior_mlp is not None else "base",
                                diffusion="adapter" if self.diffusion_prior is not None
                                else "base" if self.pipe.diffusion_prior is not None else None))
        prior = {k: v.detach().float().cpu() for k, v in self.prior_mlp.state_dict().items()} \
            if self.prior_mlp is not None else None
        diffusion_prior = lora_state(self.diffusion_prior.net, TRAIN_ADAPTER) \
            if self.diffusion_prior is not None else None
        return save_adapter(out_dir, lora=self._lora_state(), prior=prior, settings=cfg.lora, meta=meta,
                            diffusion_prior=diffusion_prior)

    def save_checkpoint(self) -> Path:
        """checkpoints/step-N/: adapter/ + optimizer.safetensors + trainer_state.json, renamed into place."""
        root = self.config.work_path / "checkpoints"
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"step-{self.step:06d}"
        tmp = root / f".step-{self.step:06d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        self.export(tmp / "adapter")
        opt_tensors, opt_meta = flatten_optimizer(self.optimizer.state_dict())
        opt_tensors["rng.torch"] = torch.get_rng_state()
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        state = dict(step=self.step, optimizer=opt_meta, lr_scheduler=jsonable(self.lr_scheduler.state_dict()),
                     scaler=jsonable(self.scaler.state_dict()), dataset_hash=self.data_hash,
                     config=jsonable(dataclasses.asdict(self.config)))
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        self.checkpoints.append(final)
        for old in sorted(p for p in root.glob("step-*") if p.is_dir())[: -self.config.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        self.checkpoints = [c for c in self.checkpoints if c.exists()]
        return final

    def load_checkpoint(self, path: Path) -> None:
        from peft.utils import set_peft_model_state_dict

        from minidalle.adapters import load_adapter_files

        state = json.loads((path / "trainer_state.json").read_text())
        if state.get("dataset_hash") != self.data_hash:
            raise InvalidInput("resume", f"checkpoint {path} was made from a different dataset")
        adapter = load_adapter_files(path / "adapter")
        lora = {k: v.to(self.device, torch.float32) for k, v in adapter.lora.items()}
        set_peft_model_state_dict(self.pipe.unet, lora, adapter_name=TRAIN_ADAPTER)
        if self.prior_mlp is not None:
            if adapter.prior is None:
                raise InvalidInput("resume", f"checkpoint {path} has no prior weights but train_prior is on")
            self.prior_mlp.load_state_dict({k: v.float() for k, v in adapter.prior.items()})
        if self.diffusion_prior is not None:
            if adapter.diffusion_prior is None:
                raise InvalidInput("resume", f"checkpoint {path} has no diffusion prior LoRA but train_prior is on")
            set_peft_model_state_dict(self.diffusion_prior.net, {k: v.to(self.device, torch.float32) for k, v in
                                                                 adapter.diffusion_prior.items()},
                                      adapter_name=TRAIN_ADAPTER)
        try:
            tensors = load_file(path / "optimizer.safetensors")
        except Exception as e:  # a truncated or foreign file: say which
            raise InvalidInput("resume", f"{path}/optimizer.safetensors is not readable ({e})") from e
        torch.set_rng_state(tensors.pop("rng.torch"))
        self.optimizer.load_state_dict(unflatten_optimizer(tensors, state["optimizer"], self.device))
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.scaler.load_state_dict(state["scaler"]) if state.get("scaler") else None
        self.step = int(state["step"])
        self.checkpoints.append(path)
        log.info("resumed from %s at step %d", path, self.step)

    @torch.no_grad()
    def _validate(self, adapter_dir: Path, tag: str) -> list[Path]:
        from minidalle.png import save_png

        cfg, pipe = self.config, self.pipe
        was_training = pipe.unet.training
        pipe.unet.eval()
        out_dir = cfg.work_path / "validation" / tag
        paths = []
        try:
            name = pipe.load_adapter(adapter_dir, name=VALIDATION_ADAPTER)
            for i, prompt in enumerate(cfg.validation_prompts):
                out = pipe(prompt, num_inference_steps=cfg.validation_steps, seed=cfg.validation_seed,
                           guidance_scale=cfg.validation_guidance_scale, adapters=[(name, 1.0)])
                paths.append(save_png(out.images[0], out_dir / f"{i}.png", out.metadata[0]))
        finally:
            if VALIDATION_ADAPTER in pipe.loaded_adapters:
                pipe.unload_adapter(VALIDATION_ADAPTER)
            pipe.unet.enable_lora()
            pipe.unet.set_adapters([TRAIN_ADAPTER])
            for p in self.lora_params:
                p.requires_grad_(True)
            pipe.unet.train(was_training)
            if self.diffusion_prior is not None:
                self._prior_loras.set_active([(TRAIN_ADAPTER, 1.0)])
                for p in self.prior_lora_params:
                    p.requires_grad_(True)
                self.diffusion_prior.train(was_training)
        self.validation_images.extend(paths)
        self.on_progress(dict(type="validation", step=self.step, total=cfg.steps, images=[str(p) for p in paths]))
        return paths

    def teardown(self) -> None:
        """Leave a resident pipeline as it was: training adapter removed, eval mode."""
        if self.pipe is not None and self._injected:
            delete_lora(self.pipe.unet, TRAIN_ADAPTER)
            if self.config.gradient_checkpointing:
                self.pipe.unet.disable_gradient_checkpointing()
            self.pipe.unet.requires_grad_(False).eval()
            if self.diffusion_prior is not None:
                delete_lora(self.diffusion_prior.net, TRAIN_ADAPTER)
                self.diffusion_prior.requires_grad_(False).eval()
            self._injected = False


def train(config: TrainConfig, on_progress: ProgressCallback | None = None, pipeline=None) -> TrainResult:
    """Fine-tune and write the adapter to config.output_dir. Raises Cancelled if on_progress raised it."""
    trainer = Trainer(config, pipeline=pipeline, on_progress=on_progress)
    try:
        trainer.setup()
        return trainer.train()
    finally:
        trainer.teardown()


# ----------------------------------------------------------------------------------------------------------------
# helpers

def _training_scheduler(config):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(config)  # add_noise / get_velocity with the model's own noise schedule


def _lr_scheduler(cfg: TrainConfig, optimizer):
    from diffusers.optimization import get_scheduler

    name = cfg.lr_scheduler
    if name == "constant" and cfg.lr_warmup_steps:
        name = "constant_with_warmup"
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=cfg.steps)


def _apply_proj(prior, h: torch.Tensor) -> torch.Tensor:
    proj = prior.proj
    if isinstance(proj, torch.nn.Identity):
        return h
    return F.linear(h, proj.weight.float())
