"""The prior: identity at init, reset_to_identity, effect on images, save/load, projection between widths."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from minidalle import MiniDallePipeline, Prior
from minidalle.tiny.build import build_tiny_components


def _perturb(module: nn.Module, seed: int = 0, magnitude: float = 0.5) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * magnitude)


def test_identity_at_init_exactly():
    prior = Prior(in_dim=32, out_dim=32, hidden_dim=48)
    h = torch.randn(3, 77, 32)
    assert torch.equal(prior(h), h)  # bit-exact, not approximately
    assert prior.is_identity


def test_reset_to_identity_after_perturbing():
    prior = Prior(in_dim=32, out_dim=32, hidden_dim=32)
    _perturb(prior)
    h = torch.randn(2, 77, 32)
    assert not torch.allclose(prior(h), h)
    assert not prior.is_identity
    prior.reset_to_identity()
    assert torch.equal(prior(h), h)
    assert prior.is_identity


def test_non_identity_prior_changes_images(as_array):
    pipe = MiniDallePipeline(**build_tiny_components(seed=3))
    kw = dict(seed=5, num_inference_steps=3)
    before = as_array(pipe("a red circle", **kw).images)
    _perturb(pipe.prior.mlp)
    changed = as_array(pipe("a red circle", **kw).images)
    assert not np.array_equal(before, changed)
    pipe.prior.reset_to_identity()
    assert np.array_equal(as_array(pipe("a red circle", **kw).images), before)


def test_save_load_roundtrip(tmp_path):
    prior = Prior(in_dim=32, out_dim=32, hidden_dim=16)
    _perturb(prior, seed=1)
    prior.save_pretrained(tmp_path / "prior", safe_serialization=True)
    assert (tmp_path / "prior" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = Prior.from_pretrained(tmp_path / "prior", use_safetensors=True)
    dims = {k: loaded.config[k] for k in ("in_dim", "out_dim", "hidden_dim")}
    assert dims == {"in_dim": 32, "out_dim": 32, "hidden_dim": 16}
    ref = prior.state_dict()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, ref[k]), k
    h = torch.randn(2, 77, 32)
    assert torch.equal(loaded(h), prior(h))


def test_different_widths_use_a_projection():
    prior = Prior(in_dim=32, out_dim=48, hidden_dim=40)
    assert isinstance(prior.proj, nn.Linear) and tuple(prior.proj.weight.shape) == (48, 32)
    assert not prior.is_identity  # identity cannot hold between widths
    h = torch.randn(2, 77, 32)
    out = prior(h)  # (2, 77, 48)
    assert out.shape == (2, 77, 48)
    # at init the MLP adds nothing: the prior is exactly the projection
    assert torch.equal(out, prior.proj(h))


def test_adapter_deltas_combine_as_documented():
    # h + Σ scale_i · (mlp_i(h) − mlp(h)) over the active adapters, with the base MLP itself non-zero
    prior = Prior(in_dim=16, out_dim=16, hidden_dim=16)
    _perturb(prior.mlp, seed=2)
    a, b = prior.new_adapter_mlp(), prior.new_adapter_mlp()
    _perturb(a, seed=3)
    _perturb(b, seed=4)
    prior.add_adapter("a", a.state_dict())
    prior.add_adapter("b", b.state_dict())
    h = torch.randn(1, 77, 16)
    with torch.no_grad():
        base = h + prior.mlp(h)
        prior.set_active([("a", 0.5), ("b", 2.0)])
        expected = base + 0.5 * (a(h) - prior.mlp(h)) + 2.0 * (b(h) - prior.mlp(h))
        assert torch.allclose(prior(h), expected, atol=1e-6)
        prior.set_active([("a", 1.0)])
        assert torch.allclose(prior(h), h + a(h), atol=1e-6)  # one adapter at 1.0 = what was trained
        prior.set_active([])
        assert torch.equal(prior(h), base)


def test_bad_adapter_prior_weights_raise_value_error():
    prior = Prior(in_dim=16, out_dim=16, hidden_dim=16)
    with pytest.raises(ValueError, match="prior"):
        prior.add_adapter("x", {"fc1.weight": torch.zeros(16, 16)})  # incomplete
