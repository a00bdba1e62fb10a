"""LoRA files in the formats other tools use, in and out; the conversions are diffusers' own.

In (`import_adapter`): a kohya / A1111 file (`lora_unet_*` keys with `.alpha` tensors), a diffusers file
(`pytorch_lora_weights.safetensors`: `unet.*.lora.down/up` or `unet.*.lora_A/B` keys), a peft folder
(`adapter_model.safetensors` + `adapter_config.json`) or one of our adapter folders. Safetensors only: nothing is
unpickled. Before anything is written the LoRA is checked against the base model: every key must map to a module of
its UNet with fitting shapes, one rank and one alpha for all modules, linear layers only. Text-encoder LoRA keys,
convolution (LoCon) keys and LyCORIS families (LoHa, LoKr, OFT, DoRA) are refused by name.

Out (`kohya_state_dict`): our LoRA as kohya keys with the `.alpha` tensors A1111 and ComfyUI read (diffusers'
`convert_state_dict_to_kohya` writes alpha = rank; ours is set to the adapter's alpha, so strength is kept).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from minidalle.adapters import ADAPTER_FILE, DIFFUSERS_FILE, META_FILE, LoraSettings, load_adapter_files, save_adapter
from minidalle.errors import InvalidInput

KOHYA_FILE = "kohya_lora.safetensors"  # in every adapter folder we write: for A1111 / ComfyUI users
PEFT_FILE = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
LYCORIS_MARKS = ("hada_", "lokr_", "oft_", "dora_scale", "lora_mid", ".diff", "magnitude_vector")


@dataclass
class ForeignLora:
    """A LoRA read from another tool's file, in peft keys (no adapter name)."""

    lora: dict[str, torch.Tensor]
    rank: int
    alpha: float
    source: str  # kohya | diffusers | peft | minidalle
    prior: dict[str, torch.Tensor] | None = None
    meta: dict[str, Any] | None = None
    diffusion_prior: dict[str, torch.Tensor] | None = None  # our own folders: the diffusion prior's LoRA


def kohya_state_dict(lora: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """peft-keyed UNet LoRA → kohya keys (`lora_unet_…lora_down.weight`, `.lora_up.weight`, `.alpha`)."""
    from diffusers.utils import convert_state_dict_to_kohya

    out = convert_state_dict_to_kohya({f"unet.{k}": v.detach().to("cpu").contiguous() for k, v in lora.items()})
    return {k: torch.tensor(float(alpha)) if k.endswith(".alpha") else v.contiguous() for k, v in out.items()}


def _refuse(field: str, what: str, keys: list[str]) -> InvalidInput:
    shown = ", ".join(keys[:3]) + (f" (and {len(keys) - 3} more)" if len(keys) > 3 else "")
    return InvalidInput(field, f"{what}: {shown}")


def _safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if path.suffix != ".safetensors":
        raise InvalidInput("file", f"{path.name}: only .safetensors LoRA files are read (nothing is unpickled)")
    try:
        tensors = load_file(path)
        with safe_open(path, "pt") as f:
            metadata = f.metadata() or {}
    except Exception as e:  # SafetensorError, OSError: a broken or truncated upload
        raise InvalidInput("file", f"{path.name} is not a readable safetensors file ({type(e).__name__})") from e
    return tensors, metadata


def _locate(src: Path) -> tuple[str, Path]:
    """What kind of thing `src` is, and the weights file to read."""
    if src.is_dir():
        if (src / META_FILE).is_file() and (src / ADAPTER_FILE).is_file():
            return "minidalle", src
        for name, kind in ((PEFT_FILE, "peft"), (DIFFUSERS_FILE, "file")):
            if (src / name).is_file():
                return kind, src / name
        files = sorted(src.glob("*.safetensors"))
        if len(files) == 1:
            return "file", files[0]
        raise InvalidInput("file", f"{src.name}: no LoRA file found (expected one .safetensors file, a diffusers "
                           f"{DIFFUSERS_FILE} or a peft {PEFT_FILE})")
    if not src.is_file():
        raise InvalidInput("file", f"{src} does not exist")
    return "file", src


def read_lora(src: str | os.PathLike) -> ForeignLora:
    """Read a LoRA in any supported format (see the module's docstring) into peft keys; typed errors otherwise."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft

    kind, path = _locate(Path(src))
    if kind == "minidalle":
        adapter = load_adapter_files(path)
        s = adapter.lora_settings
        return ForeignLora(adapter.lora, s.rank, s.alpha, "minidalle", adapter.prior, adapter.meta,
                           adapter.diffusion_prior)
    tensors, metadata = _safetensors(path)
    if not tensors:
        raise InvalidInput("file", f"{path.name} holds no tensors")
    keys = sorted(tensors)
    lycoris = [k for k in keys if any(m in k for m in LYCORIS_MARKS)]
    if lycoris:
        raise _refuse("file", "LyCORIS / DoRA weights (LoHa, LoKr, OFT, DoRA) are not supported", lycoris)
    text = [k for k in keys if k.startswith(("lora_te", "text_encoder", "te_"))]
    if text:
        raise _refuse("file", "text-encoder LoRA keys are not supported (this service adapts the UNet only)", text)
    alpha: float | None = None
    if kind == "peft":
        unet = {k.removeprefix("base_model.model."): v for k, v in tensors.items()}
        config = json.loads((path.parent / PEFT_CONFIG).read_text()) if (path.parent / PEFT_CONFIG).is_file() else {}
        alpha, source = config.get("lora_alpha"), "peft"
    elif all(k.startswith("lora_unet_") for k in keys):
        alphas = {float(tensors[k]) for k in keys if k.endswith(".alpha")}
        if len(alphas) > 1:
            raise InvalidInput("file", f"alphas differ across modules ({sorted(alphas)[:4]}): not supported")
        alpha = alphas.pop() if alphas else None
        converted, _ = StableDiffusionPipeline.lora_state_dict({k: v for k, v in tensors.items()})
        unet, source = _unet_part(converted), "kohya"
    elif all(k.startswith("unet.") for k in keys):
        try:
            meta = json.loads(metadata.get("lora_adapter_metadata") or "{}")
        except ValueError:
            meta = {}
        alpha, source = meta.get("unet.lora_alpha"), "diffusers"
        unet = _unet_part(tensors)
    else:
        odd = [k for k in keys if not k.startswith(("lora_unet_", "unet.", "base_model.model."))]
        raise _refuse("file", "unknown LoRA key format (expected kohya lora_unet_*, diffusers unet.* or peft)", odd)
    lora = convert_unet_state_dict_to_peft(unet) if not any(".lora_A." in k for k in unet) else unet
    bad = [k for k in lora if not (k.endswith(".lora_A.weight") or k.endswith(".lora_B.weight"))]
    if bad:
        raise _refuse("file", "keys that are not LoRA down/up matrices", bad)
    conv = [k for k, v in lora.items() if v.ndim != 2]
    if conv:
        raise _refuse("file", "convolution LoRA (LoCon) keys are not supported", conv)
    ranks = sorted({v.shape[0] for k, v in lora.items() if k.endswith(".lora_A.weight")})
    if len(ranks) != 1:
        raise InvalidInput("file", f"ranks differ across modules ({ranks[:4]}): not supported")
    rank = ranks[0]
    return ForeignLora(lora, rank, float(alpha) if alpha is not None else float(rank), source)


def _unet_part(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    others = [k for k in state if not k.startswith("unet.")]
    if others:
        raise _refuse("file", "keys outside the UNet are not supported", sorted(others))
    return {k.removeprefix("unet."): v for k, v in state.items()}


def import_adapter(src: str | os.PathLike, out_dir: str | os.PathLike, *, pipeline, name: str | None = None,
                   max_rank: int = 256) -> Path:
    """Convert a LoRA file or folder into an adapter folder of ours for `pipeline`'s base model, checked first."""
    from minidalle.lora_layers import check_lora_fits

    found = read_lora(src)
    if found.rank > max_rank:
        raise InvalidInput("file", f"rank {found.rank} is above this service's cap of {max_rank}")
    label = name or Path(out_dir).name
    check_lora_fits(pipeline.unet, label, found.lora, field="file")
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in found.lora})
    pairs = [m for m in modules if f"{m}.lora_A.weight" not in found.lora or f"{m}.lora_B.weight" not in found.lora]
    if pairs:
        raise _refuse("file", "modules with only one of the LoRA down/up matrices", pairs)
    settings = LoraSettings(rank=found.rank, alpha=found.alpha, dropout=0.0, target_modules=modules)
    settings.check()
    meta = dict(found.meta or {})
    meta.update(base_model=pipeline.model_id, base_model_hash=pipeline.model_hash, imported_from=found.source,
                steps=meta.get("steps"))
    diffusion_prior = found.diffusion_prior
    if diffusion_prior is not None:
        if pipeline.diffusion_prior is None:  # nothing here to put it on: the adapter says so
            diffusion_prior = None
            meta["priors"] = {**meta.get("priors", {}), "diffusion": None}
        else:
            check_lora_fits(pipeline.diffusion_prior.net, label, diffusion_prior, field="file")
    return save_adapter(out_dir, lora=found.lora, prior=found.prior, settings=settings, meta=meta,
                        diffusion_prior=diffusion_prior)
