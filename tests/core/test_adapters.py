"""Adapters on a resident pipeline: load / switch / unload without reloading the base, several at once, LRU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from peft.tuners.lora import LoraLayer

from minidalle.adapters import DIFFUSERS_FILE
from minidalle.tiny.build import build_tiny_components

KW = dict(num_inference_steps=3, guidance_scale=5.0, seed=21)
PROMPT = "a green triangle"


def _base_weights(unet) -> dict[str, torch.Tensor]:
    """The UNet's base weights under their original names (peft wraps layers as `….base_layer.weight`)."""
    return {k.replace(".base_layer", ""): v.detach().clone() for k, v in unet.state_dict().items()
            if "lora_" not in k}


@pytest.fixture
def pipe(fresh_pipe):
    return fresh_pipe()


def test_load_switch_unload_keeps_the_base(pipe, make_adapter, as_array):
    a, b = make_adapter("a", seed=1), make_adapter("b", seed=2)
    unet_id, base = id(pipe.unet), _base_weights(pipe.unet)
    plain = as_array(pipe(PROMPT, **KW).images)

    with_a = as_array(pipe(PROMPT, adapters=[(str(a), 1.0)], **KW).images)
    with_b = as_array(pipe(PROMPT, adapters=[(str(b), 1.0)], **KW).images)  # switch
    assert pipe.loaded_adapters == ["a", "b"]
    assert not np.array_equal(with_a, plain) and not np.array_equal(with_b, plain)
    assert not np.array_equal(with_a, with_b)
    # back to a by name (already resident), then no adapter at all
    assert np.array_equal(as_array(pipe(PROMPT, adapters=[("a", 1.0)], **KW).images), with_a)
    assert np.array_equal(as_array(pipe(PROMPT, **KW).images), plain)

    pipe.unload_adapter("a")
    pipe.unload_adapter("b")
    assert pipe.loaded_adapters == [] and pipe.prior.adapter_names == []
    assert id(pipe.unet) == unet_id
    after = _base_weights(pipe.unet)
    assert after.keys() == base.keys()
    assert all(torch.equal(after[k], v) for k, v in base.items())
    assert np.array_equal(as_array(pipe(PROMPT, **KW).images), plain)
    with pytest.raises(ValueError, match="adapters"):
        pipe.unload_adapter("a")


def test_two_adapters_with_scales(pipe, make_adapter, as_array):
    a, b = make_adapter("a", seed=1), make_adapter("b", seed=2)
    pipe.load_adapter(a)
    pipe.load_adapter(b)
    only_a = as_array(pipe(PROMPT, adapters=[("a", 0.7)], **KW).images)
    both = as_array(pipe(PROMPT, adapters=[("a", 0.7), ("b", 0.5)], **KW).images)
    assert not np.array_equal(both, only_a)
    # b at scale 0 contributes nothing, exactly
    assert np.array_equal(as_array(pipe(PROMPT, adapters=[("a", 0.7), ("b", 0.0)], **KW).images), only_a)
    # the scale matters
    assert not np.array_equal(as_array(pipe(PROMPT, adapters=[("a", 0.3)], **KW).images), only_a)


def test_scale_zero_is_no_adapter(pipe, make_adapter, as_array):
    a = make_adapter("a", seed=3)
    plain = as_array(pipe(PROMPT, **KW).images)
    assert np.array_equal(as_array(pipe(PROMPT, adapters=[(str(a), 0.0)], **KW).images), plain)
    assert pipe.loaded_adapters == ["a"]


def test_lru_eviction(fresh_pipe, make_adapter, as_array):
    pipe = fresh_pipe(max_loaded_adapters=2)
    folders = {n: make_adapter(n, seed=i) for i, n in enumerate("abc")}
    pipe.load_adapter(folders["a"])
    pipe.load_adapter(folders["b"])
    pipe(PROMPT, adapters=[("a", 1.0)], **KW)  # a becomes the most recently used
    pipe.load_adapter(folders["c"])  # evicts b, the least recently used
    assert pipe.loaded_adapters == ["a", "c"]
    assert set(pipe.prior.adapter_names) == {"a", "c"}
    peft_names = {n for m in pipe.unet.modules() if isinstance(m, LoraLayer) for n in m.lora_A}
    assert peft_names == {"a", "c"}
    # an evicted adapter comes back from its folder and gives the same image as a fresh load
    again = as_array(pipe(PROMPT, adapters=[(str(folders["b"]), 1.0)], **KW).images)
    fresh = fresh_pipe()
    assert np.array_equal(again, as_array(fresh(PROMPT, adapters=[(str(folders["b"]), 1.0)], **KW).images))
    assert "b" in pipe.loaded_adapters and len(pipe.loaded_adapters) == 2


def test_lora_only_adapter_matches_stock_diffusers(pipe, make_adapter, tiny_model_dir, as_array):
    folder = make_adapter("loraonly", seed=5, train_prior=False)
    assert (folder / DIFFUSERS_FILE).is_file()
    stock = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None,
                                                    requires_safety_checker=False)
    stock.set_progress_bar_config(disable=True)
    stock.load_lora_weights(folder, weight_name=DIFFUSERS_FILE, adapter_name="loraonly")
    theirs = as_array(stock(PROMPT, num_inference_steps=3, guidance_scale=5.0,
                            generator=torch.Generator().manual_seed(KW["seed"])).images)
    ours = as_array(pipe(PROMPT, adapters=[(str(folder), 1.0)], **KW).images)
    assert np.array_equal(ours, theirs)
    assert not np.array_equal(ours, as_array(pipe(PROMPT, **KW).images))  # the LoRA did something


def test_adapter_for_another_model_raises(pipe, make_adapter, as_array):
    other = build_tiny_components(seed=0, text_width=48)  # cross-attention width 48, not 32
    folder = make_adapter("other", seed=1, unet_config=other["unet"].config, prior_config=dict(other["prior"].config))
    plain = as_array(pipe(PROMPT, **KW).images)
    with pytest.raises(ValueError, match="adapters"):
        pipe.load_adapter(folder)
    assert pipe.loaded_adapters == []
    assert np.array_equal(as_array(pipe(PROMPT, **KW).images), plain)  # the failed load left no trace


def test_not_an_adapter_folder_raises(pipe, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="adapter"):
        pipe.load_adapter(tmp_path / "empty")
