"""The diffusion prior: a small residual MLP from CLIP hidden states to the UNet's conditioning space.

`conditioning = proj(h) + mlp(h)`, applied per token. `mlp`'s last layer starts at zero, so an untrained (or absent)
prior is exactly the identity when the text width equals the UNet's cross-attention width (SD 1.5: 768 = 768) and
the pipeline is then stock Stable Diffusion. Where the widths differ, `proj` is a learned linear map and identity
cannot hold; the prior then starts as that projection.

Adapters carry their own copy of the MLP, trained starting from the base MLP. With active adapters
(name_i, scale_i) the prior computes

    proj(h) + mlp(h) + Σ scale_i · (mlp_i(h) − mlp(h))

i.e. each adapter contributes the change it learned relative to the base prior. For the usual identity base
(mlp = 0) this is `h + Σ scale_i · mlp_i(h)`, and a single adapter at scale 1 reproduces exactly what was trained.
"""

from __future__ import annotations

import minidalle._quiet  # noqa: F401  (first: quiets diffusers' first import)
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from minidalle.errors import InvalidInput


class PriorMLP(nn.Module):
    """Three linear layers with GELU between them; the last one is zero-initialised."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, hidden_dim)
        self.fc3 = nn.Linear(hidden_dim, out_dim)
        self.act = nn.GELU()
        self.zero_last()

    def zero_last(self) -> None:
        # zero output layer => the residual branch adds exactly 0.0 and the prior starts as the identity
        nn.init.zeros_(self.fc3.weight)
        nn.init.zeros_(self.fc3.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, T, D_cross)
        return self.fc3(self.act(self.fc2(self.act(self.fc1(h)))))


class Prior(ModelMixin, ConfigMixin):
    """Residual per-token MLP: CLIP hidden states (B, 77, in_dim) -> UNet conditioning (B, 77, out_dim)."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, in_dim: int = 768, out_dim: int = 768, hidden_dim: int = 768):
        super().__init__()
        # identity skip when the widths agree (SD 1.5); otherwise a learned projection (identity can't hold)
        self.proj = nn.Identity() if in_dim == out_dim else nn.Linear(in_dim, out_dim, bias=False)
        self.mlp = PriorMLP(in_dim, hidden_dim, out_dim)
        # adapter MLPs live outside the module tree so that save_pretrained writes the base prior only
        self._adapters: dict[str, PriorMLP] = {}
        self._active: list[tuple[str, float]] = []

    # -- base -------------------------------------------------------------------------------------------------
    def reset_to_identity(self) -> None:
        """Forget what the base MLP learned: the prior becomes the identity again (when in_dim == out_dim)."""
        self.mlp.zero_last()

    @property
    def base_is_identity(self) -> bool:
        """True when the base prior (adapters aside) maps h to exactly h."""
        zero = not self.mlp.fc3.weight.any() and not self.mlp.fc3.bias.any()
        return isinstance(self.proj, nn.Identity) and zero

    @property
    def is_identity(self) -> bool:
        """True when the base prior adds nothing and no adapter is active."""
        return self.base_is_identity and not self._active

    # -- adapters ---------------------------------------------------------------------------------------------
    def new_adapter_mlp(self) -> PriorMLP:
        """A trainable copy of the base MLP (what a fine-tune starts from)."""
        cfg = self.config
        mlp = PriorMLP(cfg.in_dim, cfg.hidden_dim, cfg.out_dim)
        mlp.load_state_dict(self.mlp.state_dict())
        return mlp.to(device=self.device, dtype=self.dtype)

    def add_adapter(self, name: str, state_dict: dict[str, torch.Tensor]) -> None:
        mlp = self.new_adapter_mlp()
        missing, unexpected = mlp.load_state_dict(state_dict, strict=False)
        if missing or unexpected:
            raise InvalidInput("adapters", f"{name!r}: prior weights do not match this model's prior "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        mlp.requires_grad_(False).eval()
        self._adapters[name] = mlp

    def delete_adapter(self, name: str) -> None:
        self._adapters.pop(name, None)
        self._active = [(n, s) for n, s in self._active if n != name]

    def set_active(self, adapters: list[tuple[str, float]]) -> None:
        """Activate prior adapters (names without prior weights are skipped: their prior delta is zero)."""
        self._active = [(n, float(s)) for n, s in adapters if n in self._adapters]

    @property
    def adapter_names(self) -> list[str]:
        return list(self._adapters)

    def _apply(self, fn, *args, **kwargs):
        # keep adapter MLPs on the same device/dtype as the base when the prior is moved with .to()
        super()._apply(fn, *args, **kwargs)
        for mlp in self._adapters.values():
            mlp._apply(fn, *args, **kwargs)
        return self

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, T, in_dim) -> (B, T, out_dim)
        base_delta = self.mlp(h)
        out = self.proj(h) + base_delta
        for name, scale in self._active:
            out = out + scale * (self._adapters[name](h) - base_delta)
        return out
