"""MiniDallePipeline: CLIP text encoder → prior → (LoRA-)UNet ⇄ scheduler → VAE.

Sampling is diffusers' own: the project encodes the prompt (text encoder, then prior; the negative prompt too) and
hands the embeddings to `StableDiffusionPipeline` through `prompt_embeds` / `negative_prompt_embeds`. With the prior at
identity the result is, pixel for pixel, what stock diffusers makes from the same components and seed.

A model may also carry a CLIP image encoder, an IP-Adapter and a diffusion prior (`minidalle.image_conditioning`,
`minidalle.diffusion_prior`). Then `prior="diffusion"` samples a CLIP image embedding from the prompt (one per seed)
and an `image` (a variation) gives its own; either conditions the UNet as image tokens through diffusers' IP-Adapter
path (`ip_adapter_image_embeds`). Without image tokens the UNet runs its plain attention processors, as stock SD.
"""

from __future__ import annotations

import minidalle._quiet  # noqa: F401  (first: quiets diffusers' first import)
import dataclasses
import hashlib
import json
import logging
import os
import secrets
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, SchedulerMixin, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from minidalle.a1111 import addnet_hash
from minidalle.adapters import load_adapter_files
from minidalle.devices import resolve_device, resolve_dtype
from minidalle.diffusion_prior import DiffusionPrior
from minidalle.embedded import default_model
from minidalle.errors import InvalidInput
from minidalle.image_conditioning import (attach_ip_adapter, encode_images, load_image_encoder,
                                          load_ip_adapter_state, save_image_encoder, save_ip_adapter,
                                          ip_adapter_state)
from minidalle.lora_layers import LoraLayers, add_lora, delete_lora
from minidalle.params import GENERATE, Generate, check_adapter_name
from minidalle.prior import Prior
from minidalle.schedulers import SCHEDULERS, make_scheduler, min_inference_steps

log = logging.getLogger(__name__)

StepCallback = Callable[[int, int], None]  # (step, total); raise minidalle.Cancelled to stop


@dataclass
class GenerationOutput:
    images: list  # PIL images
    metadata: list[dict[str, Any]]  # per image: everything needed to reproduce it (seed included)


class MiniDallePipeline:
    """Text-to-image with a diffusion prior and switchable LoRA adapters on a resident base model."""

    def __init__(self, *, tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, prior: Prior | None,
                 unet: UNet2DConditionModel, vae: AutoencoderKL, scheduler: SchedulerMixin,
                 image_encoder=None, feature_extractor=None, diffusion_prior: DiffusionPrior | None = None,
                 model_id: str = "custom", max_loaded_adapters: int = 8):
        if prior is None:  # absent prior = identity
            prior = Prior(in_dim=text_encoder.config.hidden_size, out_dim=unet.config.cross_attention_dim,
                          hidden_dim=unet.config.cross_attention_dim)
            prior.to(device=text_encoder.device, dtype=text_encoder.dtype)
        self.tokenizer, self.text_encoder, self.prior = tokenizer, text_encoder, prior
        self.unet, self.vae, self.scheduler = unet, vae, scheduler
        # the image side (optional): CLIP image encoder + its preprocessing, the diffusion prior, an IP-Adapter
        self.image_encoder, self.feature_extractor = image_encoder, feature_extractor
        self.diffusion_prior = diffusion_prior
        for m in (text_encoder, prior, unet, vae, image_encoder, diffusion_prior):
            if m is not None:
                m.requires_grad_(False).eval()
        self._ip: tuple[Any, dict, dict] | None = None  # (image projection, IP processors, plain processors)
        self._ip_on = False
        self.model_id = model_id
        self.max_loaded_adapters = max_loaded_adapters
        self._adapters: OrderedDict[str, str] = OrderedDict()  # name -> source folder (LRU order)
        self._model_hash: str | None = None
        self._unet_loras = LoraLayers(unet)
        self._prior_loras = LoraLayers(diffusion_prior.net) if diffusion_prior is not None else None
        self._schedulers: dict[str, tuple] = {}  # name -> (base scheduler it was built from, scheduler)
        self._fuse_qkv = False  # fast path (enable_fast_path): fused q/k/v while no LoRA is active
        self._fused_now = False
        self._fused_built = False
        self._compiled_unet: Any = None  # torch.compile'd UNet, used while no LoRA is active
        # diffusers' own pipeline over the very same modules: it runs the denoising loop
        self._sd = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                           scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                           image_encoder=None, requires_safety_checker=False)
        self._sd.set_progress_bar_config(disable=True)
        # diffusers repeats one set of image embeddings over the whole batch (every prompt, the same image); ours
        # are one per image (each seed its own prior sample, each variation its own image), already laid out as
        # [unconditional; conditional]: its preparation step hands them through as they are
        self._sd.prepare_ip_adapter_image_embeds = _image_embeds_as_given

    # ------------------------------------------------------------------------------------------------------------
    # loading / saving
    @classmethod
    def from_pretrained(cls, model: str | os.PathLike | None = None, *, torch_dtype: torch.dtype | str | None = None,
                        device: str | torch.device | None = None, **kwargs) -> MiniDallePipeline:
        """Load a diffusers-layout folder or hub id (plus `prior/`, identity when absent). Safetensors only."""
        model = str(model) if model is not None else default_model()
        dev = resolve_device(device)
        dtype = resolve_dtype(torch_dtype, dev)
        is_local = os.path.isdir(model)
        if not is_local and os.path.sep in model and not model.count("/") == 1:
            raise InvalidInput("model", f"{model!r} is neither a folder nor a hub id")
        load = dict(torch_dtype=dtype, use_safetensors=True)
        try:
            tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
            text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", **load)
            unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", **load)
            vae = AutoencoderKL.from_pretrained(model, subfolder="vae", **load)
            scheduler = _load_scheduler(model)
            prior = _load_prior(model, is_local, dtype)
            image, diffusion_prior, ip_state = None, None, None
            if is_local or _lists_image_side(model):  # a hub repo says in its model_index.json
                image = load_image_encoder(model, torch_dtype=dtype)  # (encoder, preprocessing) or None
                diffusion_prior = DiffusionPrior.from_pretrained(model, torch_dtype=dtype)
                ip_state = _load_ip_state(model, is_local)
        except OSError as e:  # missing folder/files, unknown hub id, no network, no safetensors
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InvalidInput("model", f"cannot load {model!r}: {first}") from e
        kwargs.setdefault("model_id", model)  # what images and adapters record; a service passes a public name
        pipe = cls(tokenizer=tokenizer, text_encoder=text_encoder, prior=prior, unet=unet, vae=vae,
                   scheduler=scheduler, image_encoder=image[0] if image else None,
                   feature_extractor=image[1] if image else None, diffusion_prior=diffusion_prior, **kwargs)
        if ip_state is not None:
            pipe.load_ip_adapter(ip_state)
        return pipe.to(dev)

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write the diffusers folder layout (stock diffusers can load it) plus `prior/`."""
        path = Path(path)
        on = self._ip_on
        self.set_image_tokens(False)  # the UNet is saved as it is without image tokens: stock SD's
        self._sd.save_pretrained(path, safe_serialization=True)
        self.prior.save_pretrained(path / "prior", safe_serialization=True)
        index_file = path / "model_index.json"
        index = json.loads(index_file.read_text())
        index["prior"] = ["minidalle", "Prior"]  # ignored (with a warning) by StableDiffusionPipeline
        if self.image_encoder is not None:
            save_image_encoder(self.image_encoder, self.feature_extractor, path)
            index["image_encoder"] = ["transformers", "CLIPVisionModelWithProjection"]
        if self.diffusion_prior is not None:
            self.diffusion_prior.save_pretrained(path)
            index["diffusion_prior"] = ["minidalle", "DiffusionPrior"]
        if self._ip is not None:
            self.set_image_tokens(True)
            save_ip_adapter(ip_adapter_state(self.unet), path)
        self.set_image_tokens(on)
        index_file.write_text(json.dumps(index, indent=2, sort_keys=True))
        for config_file in path.glob("*/config.json"):  # diffusers records where a model was loaded from: this
            config = json.loads(config_file.read_text())  # machine's business, not the folder's
            if config.pop("_name_or_path", None) is not None:
                config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        return path

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> MiniDallePipeline:
        kwargs = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        for m in (self.text_encoder, self.prior, self.unet, self.vae, self.image_encoder, self.diffusion_prior):
            if m is None:
                continue
            if dtype is not None and m.dtype == dtype:
                m.to(device=device) if device is not None else None  # no re-cast: avoids diffusers' cast warning
            elif kwargs:
                m.to(**kwargs)
        return self

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def components(self) -> dict[str, Any]:
        return dict(tokenizer=self.tokenizer, text_encoder=self.text_encoder, prior=self.prior, unet=self.unet,
                    vae=self.vae, scheduler=self.scheduler)

    @property
    def vae_scale_factor(self) -> int:
        return self._sd.vae_scale_factor

    @property
    def default_height(self) -> int:
        return self.unet.config.sample_size * self.vae_scale_factor

    default_width = default_height

    @property
    def max_prompt_tokens(self) -> int:
        """Tokens a prompt may use, not counting the start/end tokens the encoder adds."""
        return self.tokenizer.model_max_length - 2

    def count_tokens(self, prompt: str) -> int:
        return len(self.tokenizer(prompt, add_special_tokens=False).input_ids)

    @property
    def model_hash(self) -> str:
        """A short fingerprint of the base weights (configs + a few tensors), recorded in adapters and images."""
        if self._model_hash is None:
            h = hashlib.sha256()
            for m in (self.unet, self.vae, self.text_encoder):
                config = m.config.to_dict() if hasattr(m.config, "to_dict") else dict(m.config)
                config = {k: v for k, v in config.items() if not k.startswith("_") and k != "transformers_version"}
                h.update(json.dumps(config, sort_keys=True, default=str).encode())  # where it came from: not hashed
                # base weights only: LoRA layers (loaded or in training) must not change the fingerprint
                sd = {k.replace(".base_layer.", "."): v for k, v in m.state_dict().items() if "lora_" not in k}
                for key in sorted(sd)[:: max(1, len(sd) // 8)]:
                    h.update(key.encode())
                    h.update(sd[key].detach().float().cpu().numpy().tobytes())
            prior_config = {k: v for k, v in dict(self.prior.config).items() if not k.startswith("_")}
            h.update(json.dumps(prior_config, sort_keys=True).encode())
            if self.prior.base_is_identity:  # an identity prior is the same function whatever fc1/fc2 hold
                h.update(b"identity-prior")
            else:
                for v in self.prior.state_dict().values():
                    h.update(v.detach().float().cpu().numpy().tobytes())
            self._model_hash = h.hexdigest()[:16]
        return self._model_hash

    # ------------------------------------------------------------------------------------------------------------
    # speed
    def enable_fast_path(self, *, channels_last: bool = False, fuse_qkv: bool = False, vae_slicing: bool = False,
                         vae_tiling: bool = False, compile_unet: bool = False,
                         compile_mode: str = "max-autotune-no-cudagraphs") -> dict[str, bool]:
        """diffusers' speed switches, each optional; returns what is on. Attention is already PyTorch's SDPA
        (diffusers' default processor).

        - `channels_last`: UNet and VAE in channels-last memory layout (faster convolutions on CUDA).
        - `fuse_qkv`: one q/k/v projection per attention (diffusers' `fuse_qkv_projections`), used only while no
          LoRA is active: LoRA sits on the separate `to_q/to_k/to_v`, so requests with adapters (and training) run
          the plain projections. Not bit-identical to the separate ones (one matmul instead of three).
        - `vae_slicing` / `vae_tiling`: decode a batch one image at a time / big images in tiles (less peak memory;
          tiling applies only to images larger than the VAE's tile).
        - `compile_unet`: `torch.compile` the UNet, used while no LoRA is active (requests with adapters run the
          eager UNet, so adapters stay switchable without recompiling); the first calls compile.
        """
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)
            self.vae.to(memory_format=torch.channels_last)
        if vae_slicing:
            self.vae.enable_slicing()
        if vae_tiling:
            self.vae.enable_tiling()
        self._fuse_qkv = fuse_qkv
        if compile_unet and self._compiled_unet is None:
            self._compiled_unet = torch.compile(self.unet, mode=compile_mode)
        self.select_unet(lora_active=False)
        return dict(channels_last=channels_last, fuse_qkv=fuse_qkv, vae_slicing=vae_slicing, vae_tiling=vae_tiling,
                    compile_unet=self._compiled_unet is not None)

    def select_unet(self, *, lora_active: bool) -> None:
        """The UNet path for what comes next: with LoRA active (a request with adapters, training) the plain
        projections and the eager UNet; without, the fast path's fused projections and compiled UNet (if on)."""
        want_fused = self._fuse_qkv and not lora_active
        if want_fused != self._fused_now:
            if want_fused and not self._fused_built:
                self.unet.fuse_qkv_projections()  # builds to_qkv / to_kv from the base weights, once
                self._fused_built = True
            elif want_fused:
                from diffusers.models.attention_processor import FusedAttnProcessor2_0

                self.unet.set_attn_processor(FusedAttnProcessor2_0())
            else:
                self.unet.unfuse_qkv_projections()  # back to the processors it had
            self._fused_now = want_fused
        unet = self._compiled_unet if self._compiled_unet is not None and not lora_active else self.unet
        if self._sd.unet is not unet:
            object.__setattr__(self._sd, "unet", unet)  # not DiffusionPipeline.__setattr__: its config stays as is

    # ------------------------------------------------------------------------------------------------------------
    # image tokens (IP-Adapter)
    @property
    def has_ip_adapter(self) -> bool:
        return self._ip is not None

    def load_ip_adapter(self, state: dict[str, torch.Tensor]) -> None:
        """Put an IP-Adapter (flat `ip-adapter.safetensors` keys) on the UNet, through diffusers' own loader. It is
        used only by requests with image tokens; the others run the UNet's plain attention processors."""
        self.set_image_tokens(False)
        self.select_unet(lora_active=True)  # the plain projections: fused ones would be replaced by the loader
        plain = self.unet.attn_processors
        attach_ip_adapter(self.unet, state)
        self._ip = (self.unet.encoder_hid_proj, self.unet.attn_processors, plain)
        self._ip_on = True
        self.set_image_tokens(False)

    def set_image_tokens(self, on: bool) -> None:
        """Switch the UNet between its IP-Adapter processors (image tokens) and its plain ones, as diffusers'
        `unload_ip_adapter` does but keeping the weights: a switch costs a few dict assignments."""
        if self._ip is None or on == self._ip_on:
            if on and self._ip is None:
                raise InvalidInput("prior", MISSING["ip_adapter"])
            return
        projection, ip_processors, plain = self._ip
        self.unet.set_attn_processor(dict(ip_processors if on else plain))
        self.unet.encoder_hid_proj = projection if on else None
        self.unet.config.encoder_hid_dim_type = "ip_image_proj" if on else None  # what the UNet's forward reads
        self._ip_on = on

    @torch.no_grad()
    def encode_image(self, images: list) -> torch.Tensor:
        """CLIP image embeddings (B, P) of RGB PIL images: what a variation is made from."""
        if self.image_encoder is None:
            raise InvalidInput("image", MISSING["image_encoder"])
        return encode_images(self.image_encoder, self.feature_extractor, images)

    @torch.no_grad()
    def sample_image_embeds(self, prompts: list[str], generators: list[torch.Generator], *,
                            num_inference_steps: int = 10, guidance_scale: float = 4.0,
                            adapters: Sequence[tuple[str, float]] | None = None) -> torch.Tensor:
        """CLIP image embeddings (B, P) sampled by the diffusion prior, one per prompt and generator. `adapters`
        (name or folder, scale): their LoRAs on the prior, if they have any, are on (None: whatever is active)."""
        dp = self.diffusion_prior
        if dp is None:
            raise InvalidInput("prior", MISSING["diffusion_prior"])
        if adapters is not None:
            self._activate(adapters)
        both = dp.encode_prompt([*prompts, ""], text_encoder=self.text_encoder, tokenizer=self.tokenizer)
        cond, uncond = both[: len(prompts)], both[len(prompts):]  # one text-encoder call; "" guides the prior
        return dp.sample(cond, uncond, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                         generator=generators)

    # ------------------------------------------------------------------------------------------------------------
    # adapters
    @property
    def loaded_adapters(self) -> list[str]:
        return list(self._adapters)

    def load_adapter(self, adapter_dir: str | os.PathLike, name: str | None = None) -> str:
        """Load an adapter folder onto the resident UNet/prior (no base reload). Returns its name."""
        adapter_dir = Path(adapter_dir)
        name = check_adapter_name(name or adapter_dir.name, "adapters")
        src = f"{adapter_dir.resolve()}@{_mtime(adapter_dir)}"
        if self._adapters.get(name) == src:
            self._adapters.move_to_end(name)
            return name
        adapter = load_adapter_files(adapter_dir)
        if name in self._adapters:
            self.unload_adapter(name)
        base = adapter.meta.get("base_model_hash")
        if base and base != self.model_hash:
            log.warning("adapter %s was trained on base %s, this model is %s", name, base, self.model_hash)
        add_lora(self.unet, name, adapter.lora_settings.peft_config(), adapter.lora)
        self.unet.eval()
        if adapter.diffusion_prior is not None:
            if self.diffusion_prior is None:
                log.info("adapter %s carries a diffusion prior LoRA; this model has no diffusion prior", name)
            else:
                # its own targets: an imported adapter names the UNet's modules one by one
                targets = sorted({k.rsplit(".lora_", 1)[0] for k in adapter.diffusion_prior})
                settings = dataclasses.replace(adapter.lora_settings, target_modules=targets)
                try:
                    add_lora(self.diffusion_prior.net, name, settings.peft_config(), adapter.diffusion_prior)
                except BaseException:
                    delete_lora(self.unet, name)
                    raise
                self.diffusion_prior.eval()
        if adapter.prior is not None:
            self.prior.add_adapter(name, adapter.prior)
        self._adapters[name] = src
        self._evict(keep={name})
        return name

    def unload_adapter(self, name: str) -> None:
        if name not in self._adapters:
            raise InvalidInput("adapters", f"{name!r} is not loaded")
        delete_lora(self.unet, name)
        if self.diffusion_prior is not None:
            delete_lora(self.diffusion_prior.net, name)
        self.prior.delete_adapter(name)
        del self._adapters[name]

    def _evict(self, keep: set[str]) -> None:
        while len(self._adapters) > self.max_loaded_adapters:
            victim = next((n for n in self._adapters if n not in keep), None)
            if victim is None:
                return
            self.unload_adapter(victim)

    def _lora_hash(self, name: str) -> str | None:
        """The hash A1111 shows for the adapter's kohya file (`minidalle.a1111.addnet_hash`), if it has one."""
        from minidalle.lora_formats import KOHYA_FILE

        src = self._adapters.get(name)  # "{folder}@{mtime}"
        kohya = Path(src.rsplit("@", 1)[0]) / KOHYA_FILE if src else None
        return addnet_hash(kohya) if kohya is not None and kohya.is_file() else None

    def _activate(self, adapters: Sequence[tuple[str, float]]) -> list[tuple[str, float]]:
        """Make exactly these adapters active (others stay loaded but off)."""
        active: list[tuple[str, float]] = []
        for ref, scale in adapters:
            name = ref if ref in self._adapters else self.load_adapter(ref)
            self._adapters.move_to_end(name)
            active.append((name, float(scale)))
        self._evict(keep={n for n, _ in active})
        self._unet_loras.set_active(active)
        if self._prior_loras is not None:
            self._prior_loras.set_active(active)
        self.prior.set_active(active)
        return active

    def _scheduler_for(self, name: str | None):
        """One scheduler per name, built from the model's config once and reused (diffusers pipelines reuse theirs:
        `set_timesteps` resets the per-run state). Building one costs ~2 ms, noticeable on small models."""
        key = name or ""
        cached = self._schedulers.get(key)
        if cached is None or cached[0] is not self.scheduler:  # rebuilt if the base scheduler was replaced
            made = make_scheduler(name, self.scheduler.config) if name \
                else self.scheduler.__class__.from_config(self.scheduler.config)
            cached = self._schedulers[key] = (self.scheduler, made)
        return cached[1]

    # ------------------------------------------------------------------------------------------------------------
    # generation
    def check_inputs(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None, *,
                     num_inference_steps: int = 25, guidance_scale: float = 7.5, height: int | None = None,
                     width: int | None = None, num_images_per_prompt: int = 1, scheduler: str | None = None,
                     adapters: Sequence[tuple[str, float]] = (), seed: int | None = None, prior: str = "mlp",
                     prior_guidance_scale: float = 4.0, prior_num_inference_steps: int = 10,
                     ip_adapter_scale: float = 1.0, image: Any = None) -> None:
        """Reject bad input before any model work, naming the field."""
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise InvalidInput("prompt", "must be a string or a non-empty list of strings")
        negs = [] if negative_prompt is None else [negative_prompt] if isinstance(negative_prompt, str) \
            else negative_prompt
        if not isinstance(negs, list) or not all(isinstance(p, str) for p in negs):
            raise InvalidInput("negative_prompt", "must be a string or a list of strings")
        if not isinstance(negative_prompt, str) and negs and len(negs) != len(prompts):  # one string fits all
            raise InvalidInput("negative_prompt", f"{len(negs)} given for {len(prompts)} prompts")
        for fname, texts in (("prompt", prompts), ("negative_prompt", negs)):
            for text in texts:
                n = self.count_tokens(text)
                if n > self.max_prompt_tokens:
                    raise InvalidInput(fname, f"{n} tokens, the text encoder takes at most {self.max_prompt_tokens}")
        given = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, height=height,
                     width=width, num_images_per_prompt=num_images_per_prompt, seed=seed, scheduler=scheduler,
                     prior=prior, prior_guidance_scale=prior_guidance_scale,
                     prior_num_inference_steps=prior_num_inference_steps, ip_adapter_scale=ip_adapter_scale)
        for name, value in given.items():
            GENERATE[name].check(value)
        self._check_image_inputs(prior, image)
        fewest = min_inference_steps(self._scheduler_for(scheduler))
        if num_inference_steps < fewest:
            raise InvalidInput("num_inference_steps", f"the {scheduler or _scheduler_name(self.scheduler)} "
                               f"scheduler of this model needs at least {fewest}, got {num_inference_steps}")
        if len(adapters) > Generate.max_adapters:
            raise InvalidInput("adapters", f"at most {Generate.max_adapters} at once, got {len(adapters)}")
        seen = set()
        for i, item in enumerate(adapters):
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise InvalidInput("adapters", f"each entry must be (name or folder, scale), got {item!r}")
            Generate.adapter_scale.check(item[1], f"adapters.{i}.scale")
            key = str(item[0])
            if key in seen:
                raise InvalidInput("adapters", f"{key!r} is listed twice; give it once, with the scale you want")
            seen.add(key)

    def _check_image_inputs(self, prior: str, image: Any) -> None:
        """What image tokens need: the model's diffusion prior, image encoder and IP-Adapter, an RGB image."""
        if prior == "diffusion" and self.diffusion_prior is None:
            raise InvalidInput("prior", MISSING["diffusion_prior"])
        if image is not None:
            from PIL import Image

            if not isinstance(image, Image.Image) or image.mode != "RGB":
                raise InvalidInput("image", f"must be an RGB PIL image, got {getattr(image, 'mode', type(image))!r}")
            if prior == "diffusion":
                raise InvalidInput("prior", "a variation takes its image embedding from its image: use 'mlp'")
            if self.image_encoder is None:
                raise InvalidInput("image", MISSING["image_encoder"])
        if (prior == "diffusion" or image is not None) and self._ip is None:
            raise InvalidInput("prior" if image is None else "image", MISSING["ip_adapter"])

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], negative_prompts: list[str] | None,
                      do_classifier_free_guidance: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text encoder (diffusers' own encode_prompt, unchanged) then the prior, for both branches."""
        pe, npe = self._sd.encode_prompt(prompts, self.device, 1, do_classifier_free_guidance,
                                         negative_prompt=negative_prompts)  # (B, 77, D) each
        if self.prior.is_identity:  # h + 0.0 == h exactly: skip the MLP (stock SD 1.5 costs nothing extra)
            return pe, npe
        pe = self.prior(pe.to(self.prior.dtype))  # (B, 77, D_cross)
        npe = self.prior(npe.to(self.prior.dtype)) if npe is not None else None
        return pe, npe

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None, *,
                 num_inference_steps: int = 25, guidance_scale: float = 7.5, height: int | None = None,
                 width: int | None = None, num_images_per_prompt: int = 1, seed: int | None = None,
                 generator: torch.Generator | list[torch.Generator] | None = None, scheduler: str | None = None,
                 adapters: Sequence[tuple[str, float]] = (), callback: StepCallback | None = None,
                 output_type: str = "pil", eta: float = 0.0, prior: str = "mlp", prior_guidance_scale: float = 4.0,
                 prior_num_inference_steps: int = 10, ip_adapter_scale: float = 1.0,
                 image: Any = None) -> GenerationOutput:
        """Generate images. Image i uses seed `seed + i`, so any one image can be re-made on its own.

        `prior="diffusion"`: the diffusion prior samples a CLIP image embedding per image (from its seed), which
        conditions the UNet as image tokens at `ip_adapter_scale`. `image` (an RGB PIL image): variations of it, its
        CLIP image embedding as the image tokens (the prompt, often "", still conditions the text side)."""
        request = dict(prompt=prompt, negative_prompt=negative_prompt, num_images_per_prompt=num_images_per_prompt,
                       seed=seed, generator=generator, image=image)
        return self.generate_many([request], callback=callback, output_type=output_type,
                                  num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                  height=height, width=width, scheduler=scheduler, adapters=adapters, eta=eta,
                                  prior=prior, prior_guidance_scale=prior_guidance_scale,
                                  prior_num_inference_steps=prior_num_inference_steps,
                                  ip_adapter_scale=ip_adapter_scale)[0]

    @torch.no_grad()
    def generate_many(self, requests: Sequence[dict[str, Any]], *, callback: StepCallback | None = None,
                      output_type: str = "pil", **shared: Any) -> list[GenerationOutput]:
        """Several requests in one denoising loop (one UNet call per step for all their images).

        Each request is a dict of `prompt`, `negative_prompt`, `num_images_per_prompt`, `seed` (and optionally
        `generator`, `image`): what stays its own. What the loop shares (`BATCH_SHARED`: steps, guidance, size,
        scheduler, eta, adapters, the prior and its settings) is given once as keywords, or in the requests, where
        it must then agree. Variations (requests with an `image`) batch only with variations. Every image gets
        the same noise and embeddings it gets when its request runs alone (each request's prompts are encoded on
        their own); only the UNet's batch differs. Returns one GenerationOutput per request, in order.
        """
        if not requests:
            return []
        unknown = set(shared) - set(BATCH_SHARED)
        if unknown:
            raise TypeError(f"unexpected keyword arguments {sorted(unknown)}")
        common = {**_SHARED_DEFAULTS, **shared}
        for i, r in enumerate(requests):
            for key in BATCH_SHARED:
                if key in r and _norm(r[key]) != _norm(common[key]):
                    if i == 0 and key not in shared:
                        common[key] = r[key]
                        continue
                    raise InvalidInput(key, f"request {i} asks for {r[key]!r}, the batch for {common[key]!r}; only "
                                       "requests that agree on it share a batch")
        single = len(requests) == 1
        # 1. check inputs (before any model work)
        for r in requests:
            self.check_inputs(r["prompt"], r.get("negative_prompt"), num_inference_steps=common["num_inference_steps"],
                              guidance_scale=common["guidance_scale"], height=common["height"],
                              width=common["width"], num_images_per_prompt=r.get("num_images_per_prompt", 1),
                              scheduler=common["scheduler"], adapters=common["adapters"], seed=r.get("seed"),
                              prior=common["prior"], prior_guidance_scale=common["prior_guidance_scale"],
                              prior_num_inference_steps=common["prior_num_inference_steps"],
                              ip_adapter_scale=common["ip_adapter_scale"], image=r.get("image"))
            gen = r.get("generator")
            if isinstance(gen, torch.Generator) and not single:
                raise InvalidInput("generator", "in a batch, give a list of generators (one per image) or a seed")
        steps, guidance, scheduler = common["num_inference_steps"], common["guidance_scale"], common["scheduler"]
        height, width = common["height"] or self.default_height, common["width"] or self.default_width
        variations = [r.get("image") is not None for r in requests]
        if any(variations) and not all(variations):
            raise InvalidInput("image", "variations (requests with an image) batch only with variations")
        image_tokens = common["prior"] == "diffusion" or all(variations)
        # 2. adapters (LoRA on the UNet + prior deltas); image tokens on or off (both run the plain projections)
        active = self._activate(common["adapters"])
        if not image_tokens:
            self.set_image_tokens(False)
        self.select_unet(lora_active=bool(active) or image_tokens)
        if image_tokens:
            self.set_image_tokens(True)
        cfg = guidance > 1 and self.unet.config.time_cond_proj_dim is None
        embeds, negative_embeds, generators, plans, image_embeds = [], [], [], [], []
        for r in requests:
            prompt, negative_prompt, n = r["prompt"], r.get("negative_prompt"), r.get("num_images_per_prompt", 1)
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            negs = None if negative_prompt is None else [negative_prompt] * len(prompts) \
                if isinstance(negative_prompt, str) else list(negative_prompt)
            n_images = len(prompts) * n
            # 3. seeds: one CPU generator per image (device-independent noise, individually reproducible)
            generator = r.get("generator")
            if generator is None:
                seed = r.get("seed")
                seed = secrets.randbelow(2**31) if seed is None else seed
                seeds: list[int | None] = [seed + i for i in range(n_images)]
                generators.extend(torch.Generator("cpu").manual_seed(s) for s in seeds)
            else:
                seeds = [None] * n_images
                if isinstance(generator, torch.Generator):  # one request: diffusers draws all noise from it
                    generators = generator
                else:
                    if len(generator) != n_images:
                        raise InvalidInput("generator", f"{len(generator)} generators for {n_images} images")
                    generators.extend(generator)
            # 4. encode: text encoder -> prior (the negative prompt too); one request at a time, as it runs alone
            pe, npe = self.encode_prompt(prompts, negs, cfg)
            embeds.append(pe.repeat_interleave(n, dim=0))  # what diffusers' num_images_per_prompt does
            if npe is not None:
                negative_embeds.append(npe.repeat_interleave(n, dim=0))
            # 4b. image embeddings: the given image's (a variation), or sampled by the diffusion prior per image
            if image_tokens and r.get("image") is not None:
                image_embeds.append(self.encode_image([r["image"]]).expand(n_images, -1))  # (n_images, P)
            elif image_tokens:
                image_embeds.append(self.sample_image_embeds(
                    [p for p in prompts for _ in range(n)], _prior_generators(seeds, r.get("generator")),
                    num_inference_steps=common["prior_num_inference_steps"],
                    guidance_scale=common["prior_guidance_scale"]))  # (n_images, P)
            plans.append((prompts, negs, n, seeds))
        # 5. denoise with diffusers' loop and the chosen scheduler
        sched_name = scheduler or _scheduler_name(self.scheduler)
        self._sd.scheduler = self._scheduler_for(scheduler)

        def on_step_end(sd, i, t, kwargs):
            if callback is not None:
                callback(i + 1, sd.num_timesteps)
            return {}

        ip_embeds = None
        if image_tokens:  # (2B | B, 1, P): the unconditional branch gets zeros, as diffusers' encode_image gives it
            emb = torch.cat(image_embeds).to(device=self.device, dtype=self.unet.dtype)[:, None, :]
            ip_embeds = [torch.cat([torch.zeros_like(emb), emb]) if cfg else emb]
            self._sd.set_ip_adapter_scale(common["ip_adapter_scale"])
        out = self._sd(prompt_embeds=torch.cat(embeds), negative_prompt_embeds=torch.cat(negative_embeds) if cfg
                       else None, num_inference_steps=steps, guidance_scale=guidance, height=height, width=width,
                       num_images_per_prompt=1, generator=generators, eta=common["eta"], output_type=output_type,
                       callback_on_step_end=on_step_end if callback else None, ip_adapter_image_embeds=ip_embeds)
        # 6. per request: its images and their metadata (what it takes to reproduce each image)
        results, first = [], 0
        hashes = {a: h for a, _ in active if (h := self._lora_hash(a))}
        for prompts, negs, n, seeds in plans:
            meta = []
            for i in range(len(seeds)):
                p = i // n
                meta.append(dict(prompt=prompts[p], negative_prompt=negs[p] if negs else "", seed=seeds[i],
                                 steps=steps, guidance_scale=float(guidance), width=width, height=height,
                                 scheduler=sched_name, eta=common["eta"], adapters=[[a, s] for a, s in active],
                                 lora_hashes=hashes, model=self.model_id, model_hash=self.model_hash, index=i))
                if image_tokens:
                    meta[-1].update(prior="variation" if variations[0] else "diffusion",
                                    ip_adapter_scale=float(common["ip_adapter_scale"]))
                    if not variations[0]:
                        meta[-1].update(prior_steps=common["prior_num_inference_steps"],
                                        prior_guidance_scale=float(common["prior_guidance_scale"]))
            results.append(GenerationOutput(images=out.images[first:first + len(seeds)], metadata=meta))
            first += len(seeds)
        return results


# what a request asks of a model without that part of the image side (one message per part, wherever it is checked)
MISSING = {
    "diffusion_prior": "this model has no diffusion prior (no diffusion_prior/ folder); use 'mlp'",
    "image_encoder": "this model has no image encoder (no image_encoder/ folder): it can't make variations",
    "ip_adapter": "this model has no IP-Adapter (no ip_adapter/ folder) to condition its UNet on an image embedding",
}

# What the requests of one `generate_many` batch share, and the defaults `__call__` has for them.
BATCH_SHARED = ("num_inference_steps", "guidance_scale", "height", "width", "scheduler", "adapters", "eta", "prior",
                "prior_guidance_scale", "prior_num_inference_steps", "ip_adapter_scale")
_SHARED_DEFAULTS: dict[str, Any] = dict(num_inference_steps=25, guidance_scale=7.5, height=None, width=None,
                                        scheduler=None, adapters=(), eta=0.0, prior="mlp", prior_guidance_scale=4.0,
                                        prior_num_inference_steps=10, ip_adapter_scale=1.0)


def _image_embeds_as_given(ip_adapter_image, ip_adapter_image_embeds, device, num_images_per_prompt,
                           do_classifier_free_guidance):
    """`StableDiffusionPipeline.prepare_ip_adapter_image_embeds` for embeddings that are already one per image."""
    return [e.to(device) for e in ip_adapter_image_embeds]


def _prior_generators(seeds: list[int | None], generator: Any) -> list[torch.Generator]:
    """One CPU generator per image for the diffusion prior, seeded like the image's noise (a fresh generator: the
    noise drawn for the image stays what it is without the prior). A request given generators seeds from theirs."""
    if all(s is not None for s in seeds):
        return [torch.Generator("cpu").manual_seed(s) for s in seeds]  # type: ignore[arg-type]
    gens = generator if isinstance(generator, list) else [generator] * len(seeds)
    return [torch.Generator("cpu").manual_seed(g.initial_seed() + (0 if isinstance(generator, list) else i))
            for i, g in enumerate(gens)]


def _norm(value: Any) -> Any:
    """Compare adapters given as tuples or lists alike."""
    if isinstance(value, (list, tuple)):
        return tuple(_norm(v) for v in value)
    return value


def _scheduler_name(scheduler) -> str:
    for name, (cls, extra) in SCHEDULERS.items():
        if type(scheduler) is cls and all(scheduler.config.get(k) == v for k, v in extra.items()):
            return name
    return type(scheduler).__name__


def _mtime(adapter_dir: Path) -> int:
    try:
        return (adapter_dir / "adapter.safetensors").stat().st_mtime_ns
    except OSError:
        return 0


def _load_scheduler(model: str) -> SchedulerMixin:
    import diffusers

    config = diffusers.DDIMScheduler.load_config(model, subfolder="scheduler")  # any scheduler class reads it
    cls = getattr(diffusers, config.get("_class_name", "DDIMScheduler"), None)
    if cls is None or not issubclass(cls, SchedulerMixin):
        raise InvalidInput("model", f"unknown scheduler class {config.get('_class_name')!r} in {model}/scheduler")
    return cls.from_config(config)


def _lists_image_side(model: str) -> bool:
    """Whether a hub repo's model_index.json names an image encoder or a diffusion prior (save_pretrained writes
    both; a stock SD repo has `image_encoder: [null, null]`), so that a repo without them is not asked for files
    it lacks (offline, such a question can't be told from a missing cache)."""
    index = StableDiffusionPipeline.load_config(model)
    return any((index.get(part) or [None])[0] for part in ("image_encoder", "diffusion_prior"))


def _load_ip_state(model: str, is_local: bool) -> dict[str, torch.Tensor] | None:
    """`ip_adapter/ip-adapter.safetensors` of a folder or hub repo; None when it has none."""
    if is_local:
        return load_ip_adapter_state(model)
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError
    from safetensors.torch import load_file

    from minidalle.image_conditioning import IP_ADAPTER, IP_ADAPTER_WEIGHTS

    try:
        return load_file(hf_hub_download(model, IP_ADAPTER_WEIGHTS, subfolder=IP_ADAPTER))
    except EntryNotFoundError:
        return None


def _load_prior(model: str, is_local: bool, dtype: torch.dtype) -> Prior | None:
    if is_local:
        if not (Path(model) / "prior" / "config.json").is_file():
            return None  # a plain SD folder: identity prior
        return Prior.from_pretrained(model, subfolder="prior", torch_dtype=dtype, use_safetensors=True)
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Prior.from_pretrained(model, subfolder="prior", torch_dtype=dtype, use_safetensors=True)
    except (EntryNotFoundError, OSError) as e:
        if isinstance(e, EntryNotFoundError) or "does not appear to have" in str(e) or "no file named" in str(e):
            return None  # a stock SD hub repo has no prior/: identity
        raise
