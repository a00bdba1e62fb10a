"""Named peft LoRA adapters on any torch module: put one on (fresh or from a state dict), switch the active ones
with their scales, read one back, take one off.

The UNet and the diffusion prior's `PriorTransformer` carry their adapters the same way, under the adapter's name,
so one `<lora:name:0.8>` switches both. diffusers' own `set_adapters` walks every module of the model on each call
and knows only its pipelines' model classes; a request only needs the LoRA layers, which `LoraLayers` lists once
per set of loaded adapters.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn

from minidalle.errors import InvalidInput


def check_lora_fits(model: nn.Module, name: str, lora: dict, field: str = "adapters") -> None:
    """Every LoRA matrix must sit on a Linear of `model` with matching width (else: an adapter for another model)."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for key, t in lora.items():
        module, _, kind = key.rpartition(".lora_")
        target = linears.get(module) or linears.get(f"{module}.base_layer")
        if target is None or t.ndim != 2:
            raise InvalidInput(field, f"{name!r} has LoRA weights for a module this model lacks: {module!r}")
        want = t.shape[1] == target.in_features if kind.startswith("A") else t.shape[0] == target.out_features
        if not want:
            raise InvalidInput(field, f"{name!r} does not fit this model ({key}: {tuple(t.shape)} vs "
                             f"{target.in_features}->{target.out_features})")


def add_lora(model: nn.Module, name: str, config, state: dict[str, torch.Tensor] | None = None, *,
             field: str = "adapters") -> list[nn.Parameter]:
    """Put LoRA `name` on `model`: filled from `state` (peft keys, adapter name stripped; layers are made on the
    meta device, no random init, no copy), or freshly initialised for training when `state` is None. Returns its
    parameters. A state that does not fit is refused before `model` is touched."""
    from peft import inject_adapter_in_model
    from peft.utils import set_peft_model_state_dict

    if state is not None:
        check_lora_fits(model, name, state, field)
        param = next(model.parameters())
        state = {k: v.to(device=param.device, dtype=param.dtype) for k, v in state.items()}
    config.base_model_name_or_path = None
    model._hf_peft_config_loaded = True  # what diffusers' add_adapter records
    with warnings.catch_warnings():  # peft warns on every adapter after the first: several is the point here
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        inject_adapter_in_model(config, model, adapter_name=name, low_cpu_mem_usage=state is not None)
    try:
        if state is not None:
            set_peft_model_state_dict(model, state, adapter_name=name, low_cpu_mem_usage=True)
            left = [n for n, p in model.named_parameters() if p.is_meta]
            if left:
                raise InvalidInput(field, f"{name!r} lacks LoRA weights for {left[:3]}")
    except BaseException:
        delete_lora(model, name)
        raise
    return lora_parameters(model, name)


def lora_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if f".{name}." in n]


def lora_state(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """LoRA `name` as peft keys (adapter name stripped), fp32 on the CPU: what `add_lora(state=…)` takes."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().float().cpu() for k, v in get_peft_model_state_dict(model, adapter_name=name).items()}


def delete_lora(model: nn.Module, name: str) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    with warnings.catch_warnings():  # peft warns when the deleted adapter was active: the next request sets its own
        warnings.filterwarnings("ignore", message=".*was active which is now deleted")
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.delete_adapter(name)
    config = getattr(model, "peft_config", None)
    if config is not None:
        config.pop(name, None)
        if not config:
            del model.peft_config
            model._hf_peft_config_loaded = False


class LoraLayers:
    """The LoRA layers of one model, listed once per set of loaded adapters, and switched together."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._layers: tuple[tuple, list] | None = None

    def layers(self) -> list:
        from peft.tuners.tuners_utils import BaseTunerLayer

        key = tuple(getattr(self.model, "peft_config", None) or {})  # changes when an adapter comes or goes
        if self._layers is None or self._layers[0] != key:
            self._layers = (key, [m for m in self.model.modules() if isinstance(m, BaseTunerLayer)])
        return self._layers[1]

    def set_active(self, active: Sequence[tuple[str, float]]) -> None:
        """Exactly these adapters on, at these scales (none: the base output, whatever is loaded). A name this
        model does not carry is skipped by peft: an adapter may have LoRA on the UNet but not on the prior."""
        names = [n for n, _ in active]
        for layer in self.layers():
            layer.enable_adapters(bool(active))
            if active:
                layer.set_adapter(names)
                for name, scale in active:
                    layer.set_scale(name, scale)
