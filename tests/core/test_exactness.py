"""With the identity prior, MiniDallePipeline is stock Stable Diffusion: same components + seed ⇒ same pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
)

from minidalle import MiniDallePipeline
from minidalle.tiny.build import build_tiny_components

# the reference side names diffusers classes directly, not through minidalle.schedulers
REFERENCE_SCHEDULERS = {
    "ddim": DDIMScheduler,
    "pndm": PNDMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_ancestral": EulerAncestralDiscreteScheduler,  # stochastic: the generators drive every step
    "dpmpp_2m": DPMSolverMultistepScheduler,
}


@pytest.fixture(scope="module")
def pair():
    c = build_tiny_components(seed=7)
    mini = MiniDallePipeline(**c)
    stock = StableDiffusionPipeline(vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"],
                                    unet=c["unet"], scheduler=c["scheduler"], safety_checker=None,
                                    feature_extractor=None, requires_safety_checker=False)
    stock.set_progress_bar_config(disable=True)
    assert mini.prior.is_identity
    return mini, stock


def _stock(stock, name, prompt, seed, n, **kw):
    stock.scheduler = REFERENCE_SCHEDULERS[name].from_config(stock.scheduler.config)
    gens = [torch.Generator("cpu").manual_seed(seed + i) for i in range(n)]
    return stock(prompt, num_images_per_prompt=n, generator=gens, **kw).images


@pytest.mark.parametrize("scheduler", list(REFERENCE_SCHEDULERS))
@pytest.mark.parametrize("guidance_scale, negative_prompt", [(7.5, None), (1.0, None), (5.0, "blue square")])
def test_identity_prior_gives_stock_pixels(pair, as_array, scheduler, guidance_scale, negative_prompt):
    mini, stock = pair
    kw = dict(num_inference_steps=4, guidance_scale=guidance_scale, negative_prompt=negative_prompt)
    ours = mini("a red circle on a white background", seed=11, num_images_per_prompt=2, scheduler=scheduler, **kw)
    theirs = _stock(stock, scheduler, "a red circle on a white background", 11, 2, **kw)
    a, b = as_array(ours.images), as_array(theirs)
    assert a.shape == b.shape == (2, 32, 32, 3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a[0], a[1])  # the two images really have different seeds
    assert [m["seed"] for m in ours.metadata] == [11, 12]


def test_a_different_seed_gives_different_pixels(pair, as_array):
    # guards the test above: pixels differ when they should, so equality there means something
    mini, stock = pair
    ours = mini("a cat", seed=1, num_inference_steps=3)
    theirs = _stock(stock, "ddim", "a cat", 2, 1, num_inference_steps=3)
    assert not np.array_equal(as_array(ours.images), as_array(theirs))


def test_both_branches_go_through_a_trained_prior(as_array):
    # a non-identity prior: ours must equal stock diffusers fed prior(text states) for the prompt AND the negative
    c = build_tiny_components(seed=8)
    mini = MiniDallePipeline(**c)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in mini.prior.mlp.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    stock = StableDiffusionPipeline(vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"],
                                    unet=c["unet"], scheduler=c["scheduler"], safety_checker=None,
                                    feature_extractor=None, requires_safety_checker=False)
    stock.set_progress_bar_config(disable=True)
    with torch.no_grad():
        pe, npe = stock.encode_prompt(["a red circle"], "cpu", 1, True, negative_prompt=["gray"])
        pe, npe = mini.prior(pe), mini.prior(npe)
    kw = dict(num_inference_steps=3, guidance_scale=6.0)
    theirs = stock(prompt_embeds=pe, negative_prompt_embeds=npe, generator=torch.Generator().manual_seed(4), **kw)
    ours = mini("a red circle", "gray", seed=4, **kw)
    assert np.array_equal(as_array(ours.images), as_array(theirs.images))
    # and the negative branch matters: skipping the prior there gives other pixels
    with torch.no_grad():
        raw_npe = stock.encode_prompt(["a red circle"], "cpu", 1, True, negative_prompt=["gray"])[1]
    skipped = stock(prompt_embeds=pe, negative_prompt_embeds=raw_npe, generator=torch.Generator().manual_seed(4),
                    **kw)
    assert not np.array_equal(as_array(ours.images), as_array(skipped.images))
