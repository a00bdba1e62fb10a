"""The adapter artifact on disk, and nothing else (no model code here).

    {adapter_dir}/
      adapter.safetensors                 LoRA in peft keys ("unet.<key>") + prior MLP ("prior.<key>") + a LoRA on
                                          the diffusion prior's PriorTransformer ("diffusion_prior.<key>"), if trained
      pytorch_lora_weights.safetensors    the same LoRA in the layout diffusers' `load_lora_weights` reads
      kohya_lora.safetensors              the same LoRA in kohya keys with `.alpha` (A1111, ComfyUI)
      adapter.json                        base model + hash, LoRA config, training config, steps, dataset hash, created

Only safetensors are read; nothing is unpickled. Writes go to a temporary sibling folder that is renamed into place,
so a reader never sees half an adapter and a failed write leaves the previous adapter untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from minidalle._fs import chmod_like_new
from minidalle.errors import InvalidInput
from minidalle.params import FINETUNE, Finetune

ADAPTER_FILE = "adapter.safetensors"
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
META_FILE = "adapter.json"
FORMAT_VERSION = 1
DIFFUSION_PRIOR = "diffusion_prior"  # key prefix of the diffusion prior's LoRA in adapter.safetensors


@dataclass
class LoraSettings:
    """LoRA hyper-parameters; the defaults are the project's (rank 8, alpha 16 ⇒ scale 2, light dropout)."""

    rank: int = Finetune.rank.default
    alpha: float = Finetune.alpha.default
    dropout: float = Finetune.dropout.default
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v"])

    def check(self) -> None:
        for name in ("rank", "alpha", "dropout"):
            FINETUNE[name].check(getattr(self, name))
        if not self.target_modules or not all(isinstance(m, str) and m for m in self.target_modules):
            raise InvalidInput("target_modules", f"must be a non-empty list of module names, got "
                               f"{self.target_modules!r}")

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=list(self.target_modules), init_lora_weights="gaussian")

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout,
                "target_modules": list(self.target_modules)}


@dataclass
class Adapter:
    """An adapter read from disk: metadata plus the two weight groups."""

    path: Path
    meta: dict[str, Any]
    lora: dict[str, torch.Tensor]  # peft keys, adapter name stripped
    prior: dict[str, torch.Tensor] | None  # PriorMLP state dict, None when the prior was not trained
    diffusion_prior: dict[str, torch.Tensor] | None = None  # LoRA on the PriorTransformer (peft keys), if trained

    @property
    def lora_settings(self) -> LoraSettings:
        return _lora_settings(self.meta, self.path)


def _lora_settings(meta: dict[str, Any], where) -> LoraSettings:
    try:
        settings = LoraSettings(**meta["lora"])
    except TypeError as e:
        raise InvalidInput("adapter", f"{where}/{META_FILE} has a bad 'lora' section ({e})") from e
    settings.check()
    return settings


def _diffusers_lora_metadata(settings: LoraSettings) -> dict[str, Any]:
    # what diffusers' load_lora_weights reads to rebuild the LoraConfig (alpha ≠ rank must survive)
    # dropout 0: this file is for inference; with the training dropout, diffusers would build Dropout layers that a
    # pipeline left in training mode applies, and the same seed would make other pixels
    return {"r": settings.rank, "lora_alpha": settings.alpha, "target_modules": list(settings.target_modules),
            "lora_dropout": 0.0, "use_dora": False, "lora_bias": False}


def save_adapter(out_dir: str | os.PathLike, *, lora: dict[str, torch.Tensor], prior: dict[str, torch.Tensor] | None,
                 settings: LoraSettings, meta: dict[str, Any],
                 diffusion_prior: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the adapter folder atomically (temp folder + rename)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    chmod_like_new(tmp, directory=True)
    try:
        tensors = {f"unet.{k}": v.detach().to("cpu").contiguous() for k, v in lora.items()}
        if prior is not None:
            tensors.update({f"prior.{k}": v.detach().to("cpu").contiguous() for k, v in prior.items()})
        if diffusion_prior is not None:
            tensors.update({f"{DIFFUSION_PRIOR}.{k}": v.detach().to("cpu").contiguous()
                            for k, v in diffusion_prior.items()})
        save_file(tensors, tmp / ADAPTER_FILE, metadata={"format": "minidalle-adapter", "version": str(FORMAT_VERSION)})
        unet_layers = convert_state_dict_to_diffusers({k: v.detach().to("cpu") for k, v in lora.items()})
        StableDiffusionPipeline.save_lora_weights(
            tmp, unet_lora_layers=unet_layers, weight_name=DIFFUSERS_FILE, safe_serialization=True,
            unet_lora_adapter_metadata=_diffusers_lora_metadata(settings),
        )
        from minidalle.lora_formats import KOHYA_FILE, kohya_state_dict

        save_file(kohya_state_dict(lora, settings.alpha), tmp / KOHYA_FILE,
                  metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(settings.rank),
                            "ss_network_alpha": str(settings.alpha), "format": "pt"})
        full_meta = {"format_version": FORMAT_VERSION, **meta, "lora": settings.to_dict(),
                     "has_prior": prior is not None, "has_diffusion_prior": diffusion_prior is not None}
        (tmp / META_FILE).write_text(json.dumps(full_meta, indent=2, sort_keys=True))
        for f in tmp.iterdir():  # safetensors writes private (0600) files; served adapters must be readable
            chmod_like_new(f)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def read_meta(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(adapter_dir) / META_FILE
    if not path.is_file():
        raise InvalidInput("adapter", f"{adapter_dir} is not an adapter folder (no {META_FILE})")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InvalidInput("adapter", f"{path} is not valid JSON ({e})") from e
    if not isinstance(meta, dict) or "lora" not in meta:
        raise InvalidInput("adapter", f"{path} has no 'lora' section")
    return meta


def load_adapter_files(adapter_dir: str | os.PathLike) -> Adapter:
    """Read and validate an adapter folder (safetensors only)."""
    adapter_dir = Path(adapter_dir)
    meta = read_meta(adapter_dir)
    weights = adapter_dir / ADAPTER_FILE
    if not weights.is_file():
        raise InvalidInput("adapter", f"{adapter_dir} has no {ADAPTER_FILE}")
    try:
        tensors = load_file(weights)
    except Exception as e:  # SafetensorError and friends: a broken upload or a truncated copy
        raise InvalidInput("adapter", f"{weights} is not a readable safetensors file ({e})") from e
    lora = {k[len("unet."):]: v for k, v in tensors.items() if k.startswith("unet.")}
    prior = {k[len("prior."):]: v for k, v in tensors.items() if k.startswith("prior.")} or None
    diffusion_prior = {k[len(DIFFUSION_PRIOR) + 1:]: v for k, v in tensors.items()
                       if k.startswith(f"{DIFFUSION_PRIOR}.")} or None
    stray = [k for k in tensors if not k.startswith(("unet.", "prior.", f"{DIFFUSION_PRIOR}."))]
    if stray or not lora:
        raise InvalidInput("adapter", f"{weights} has unexpected keys {stray[:3]} or no LoRA weights")
    _lora_settings(meta, adapter_dir)  # validated here, rebuilt by Adapter.lora_settings
    return Adapter(path=adapter_dir, meta=meta, lora=lora, prior=prior, diffusion_prior=diffusion_prior)
