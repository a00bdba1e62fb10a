"""from_pretrained / save_pretrained: one folder layout, readable by stock diffusers; safetensors only."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from minidalle import MiniDallePipeline

KW = dict(num_inference_steps=3, guidance_scale=6.0)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_model_dir):
    pipe = MiniDallePipeline.from_pretrained(tiny_model_dir, device="cpu")
    with torch.no_grad():  # a non-identity prior, so the roundtrip has something to carry
        for p in pipe.prior.mlp.parameters():
            p.add_(0.2 * torch.randn_like(p))
    folder = pipe.save_pretrained(tmp_path_factory.mktemp("saved") / "model")
    return pipe, folder


def test_roundtrip_gives_the_same_pixels(saved, as_array):
    pipe, folder = saved
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "prior"):
        assert (folder / sub).is_dir(), sub
    loaded = MiniDallePipeline.from_pretrained(folder, device="cpu")
    assert not loaded.prior.is_identity
    for k, v in pipe.prior.state_dict().items():
        assert torch.equal(loaded.prior.state_dict()[k], v), k
    a = as_array(pipe("a red circle", seed=4, **KW).images)
    b = as_array(loaded("a red circle", seed=4, **KW).images)
    assert np.array_equal(a, b)


def test_stock_diffusers_loads_the_folder_and_matches_the_identity_prior(saved, tiny_model_dir, as_array):
    _, folder = saved
    stock = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    stock.set_progress_bar_config(disable=True)
    ours = MiniDallePipeline.from_pretrained(folder, device="cpu")
    ours.prior.reset_to_identity()  # stock SD has no prior: compare against the identity
    a = as_array(ours("a blue square", seed=9, **KW).images)
    b = as_array(stock("a blue square", generator=torch.Generator().manual_seed(9), **KW).images)
    assert np.array_equal(a, b)


def test_folder_without_prior_means_identity(saved, tmp_path, as_array):
    _, folder = saved
    plain = tmp_path / "plain"
    shutil.copytree(folder, plain)
    shutil.rmtree(plain / "prior")
    pipe = MiniDallePipeline.from_pretrained(plain, device="cpu")
    assert pipe.prior.is_identity
    h = torch.randn(1, 77, pipe.text_encoder.config.hidden_size)
    assert torch.equal(pipe.prior(h), h)


def test_bin_only_weights_are_refused(saved, tmp_path):
    _, folder = saved
    binonly = tmp_path / "binonly"
    shutil.copytree(folder, binonly)
    unet_dir = binonly / "unet"
    (unet_dir / "diffusion_pytorch_model.safetensors").unlink()
    pipe_unet = MiniDallePipeline.from_pretrained(folder, device="cpu").unet
    torch.save(pipe_unet.state_dict(), unet_dir / "diffusion_pytorch_model.bin")
    with pytest.raises((OSError, ValueError), match=r"(?i)safetensors"):
        MiniDallePipeline.from_pretrained(binonly, device="cpu")


def test_save_writes_safetensors_only(saved):
    _, folder = saved
    assert not list(folder.rglob("*.bin")) and not list(folder.rglob("*.pt"))
    assert len(list(folder.rglob("*.safetensors"))) == 4  # unet, vae, text_encoder, prior


def test_missing_folder_raises(tmp_path):
    with pytest.raises((OSError, ValueError)):
        MiniDallePipeline.from_pretrained(tmp_path / "nope" / "deeper" / "model", device="cpu")
