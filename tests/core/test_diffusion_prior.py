"""The diffusion prior (PriorTransformer + x₀ diffusion): files, conditions, seeding, guidance, and that it learns.

Most tests use a very small prior on synthetic conditions (8 "tokens") so that a few hundred training steps take
seconds; the text-encoder tests use the embedded tiny-random model's CLIP text encoder.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, PriorTransformer, UnCLIPScheduler
from transformers import CLIPTextModel, CLIPTokenizer

from minidalle.diffusion_prior import DiffusionPrior, PriorCondition, new_tiny
from minidalle.errors import InvalidInput

P, T = 16, 8  # embedding width, tokens per "prompt"


def small_prior(seed: int = 0, **kwargs) -> DiffusionPrior:
    torch.manual_seed(seed)
    kw = dict(num_embeddings=T, num_layers=2, heads=2, head_dim=16) | kwargs
    return new_tiny(P, **kw).eval()


def synthetic_conditions(n: int, seed: int = 1) -> tuple[PriorCondition, PriorCondition]:
    """`n` distinct conditions and an "empty prompt" one, as `condition()` would shape them."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(n + 1, T, dtype=torch.bool)
    for i in range(n + 1):
        mask[i, : 2 + i % (T - 2)] = True  # BOS … EOS, then padding
    both = PriorCondition(torch.randn(n + 1, P, generator=gen), torch.randn(n + 1, T, P, generator=gen), mask)
    return both[list(range(1, n + 1))], both[0]


def gens(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.fixture(scope="module")
def trained_toy():
    """4 conditions → 4 fixed target embeddings (off-centre, not unit scale), trained a few hundred steps."""
    prior = small_prior(seed=3)
    cond, uncond = synthetic_conditions(4)
    targets = torch.randn(4, P, generator=torch.Generator().manual_seed(7)) * 3.0 + 2.0  # (4, P)
    prior.set_embedding_stats(targets)
    opt = torch.optim.AdamW(prior.trainable_parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    prior.train()
    losses = []
    for _ in range(400):
        rows = torch.randint(0, 4, (32,), generator=gen)
        loss = prior.loss(targets[rows], cond[rows], uncond, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return prior.eval(), cond, uncond, targets, losses


# -- files ----------------------------------------------------------------------------------------------------------
def test_save_load_round_trip_gives_identical_samples(trained_toy, tmp_path):
    prior, cond, uncond, targets, _ = trained_toy
    folder = prior.save_pretrained(tmp_path)
    files = {p.name for p in folder.iterdir()}
    assert {"config.json", "diffusion_pytorch_model.safetensors", "scheduler_config.json",
            "text_projection.safetensors"} <= files
    assert not any(name.endswith((".bin", ".pt", ".ckpt")) for name in files)
    # stock diffusers reads the parts
    assert isinstance(PriorTransformer.from_pretrained(tmp_path, subfolder="diffusion_prior"), PriorTransformer)
    sched = DDIMScheduler.from_pretrained(tmp_path, subfolder="diffusion_prior")
    assert sched.config.prediction_type == "sample" and sched.config.beta_schedule == "squaredcos_cap_v2"
    assert json.loads((folder / "scheduler_config.json").read_text())["_class_name"] == "DDIMScheduler"

    loaded = DiffusionPrior.from_pretrained(tmp_path)
    assert torch.equal(loaded.net.clip_mean, prior.net.clip_mean)
    assert torch.equal(loaded.net.clip_std, prior.net.clip_std)
    assert torch.equal(loaded.text_projection.weight, prior.text_projection.weight)
    kw = dict(num_inference_steps=5, guidance_scale=3.0)
    assert torch.equal(loaded.sample(cond, uncond, generator=gens(0, 1, 2, 3), **kw),
                       prior.sample(cond, uncond, generator=gens(0, 1, 2, 3), **kw))


def test_a_folder_without_diffusion_prior_has_none(tiny_model_dir, tmp_path):
    assert DiffusionPrior.from_pretrained(tiny_model_dir) is None
    assert DiffusionPrior.from_pretrained(tmp_path) is None


def test_loads_in_the_requested_dtype(trained_toy, tmp_path):
    trained_toy[0].save_pretrained(tmp_path)
    loaded = DiffusionPrior.from_pretrained(tmp_path, torch_dtype=torch.float64)
    assert loaded.dtype == torch.float64 and loaded.text_projection.weight.dtype == torch.float64


# -- sampling ------------------------------------------------------------------------------------------------------
def test_same_seed_same_embedding_different_seeds_differ():
    prior = small_prior()
    cond, uncond = synthetic_conditions(2)
    a = prior.sample(cond, uncond, generator=gens(10, 11))
    assert a.shape == (2, P)
    assert torch.equal(a, prior.sample(cond, uncond, generator=gens(10, 11)))
    b = prior.sample(cond, uncond, generator=gens(12, 13))
    assert not torch.allclose(a, b, atol=1e-3)
    # one generator per row: a row is reproducible alone, whatever else is in the batch
    alone = prior.sample(cond[1], uncond, generator=gens(11))
    torch.testing.assert_close(alone[0], a[1], atol=1e-5, rtol=1e-5)
    # a single generator for the batch is seeded too
    torch.testing.assert_close(prior.sample(cond, uncond, generator=torch.Generator().manual_seed(4)),
                               prior.sample(cond, uncond, generator=torch.Generator().manual_seed(4)))


def test_guidance_scale_one_is_the_conditional_path():
    prior = small_prior()
    cond, uncond = synthetic_conditions(3)
    other_uncond = synthetic_conditions(3, seed=9)[1]
    one = prior.sample(cond, uncond, guidance_scale=1.0, generator=gens(0, 1, 2))
    # the unconditional branch is not run at all: any (or no) uncond gives the same bits
    assert torch.equal(one, prior.sample(cond, None, guidance_scale=1.0, generator=gens(0, 1, 2)))
    assert torch.equal(one, prior.sample(cond, other_uncond, guidance_scale=1.0, generator=gens(0, 1, 2)))
    # …and it is the limit of the guided (batched uncond + cond) path
    near = prior.sample(cond, uncond, guidance_scale=1.0 + 1e-6, generator=gens(0, 1, 2))
    torch.testing.assert_close(near, one, atol=1e-4, rtol=1e-4)
    # while real guidance changes the result
    assert not torch.allclose(prior.sample(cond, uncond, guidance_scale=4.0, generator=gens(0, 1, 2)), one, atol=1e-3)


def test_unclip_scheduler_is_drivable_and_seeded():
    prior = small_prior(scheduler=UnCLIPScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="sample",
                                                  clip_sample_range=10.0))
    cond, uncond = synthetic_conditions(2)
    a = prior.sample(cond, uncond, num_inference_steps=6, generator=gens(0, 1))
    assert torch.equal(a, prior.sample(cond, uncond, num_inference_steps=6, generator=gens(0, 1)))
    torch.testing.assert_close(prior.sample(cond[0], uncond, num_inference_steps=6, generator=gens(0))[0], a[0],
                               atol=1e-5, rtol=1e-5)


# -- learning --------------------------------------------------------------------------------------------------------
def test_learns_a_toy_mapping(trained_toy):
    prior, cond, uncond, targets, losses = trained_toy
    assert sum(losses[-50:]) / 50 < 0.2 * sum(losses[:20]) / 20
    for guidance_scale in (1.0, 4.0):
        out = prior.sample(cond, uncond, num_inference_steps=10, guidance_scale=guidance_scale,
                           generator=gens(0, 1, 2, 3))  # (4, P), back on the targets' scale
        cos = F.cosine_similarity(out[:, None], targets[None], dim=-1)  # (4, 4)
        assert torch.equal(cos.argmax(1), torch.arange(4)), cos  # each condition lands on its own target
        assert cos.diagonal().min() > 0.95, cos
        if guidance_scale == 1.0:  # unguided, it lands *on* the target (guidance pushes past it, by design)
            assert ((out - targets).norm(dim=1) / targets.norm(dim=1)).max() < 0.1
    untrained = small_prior(seed=3)
    untrained.set_embedding_stats(targets)
    out = untrained.sample(cond, uncond, generator=gens(0, 1, 2, 3))
    cos = F.cosine_similarity(out[:, None], targets[None], dim=-1)
    assert not torch.equal(cos.argmax(1), torch.arange(4))  # the check above is not met by chance


def test_only_the_net_trains():
    prior = small_prior()
    trainable = {id(p) for p in prior.trainable_parameters()}
    assert id(prior.text_projection.weight) not in trainable
    assert id(prior.net.clip_mean) not in trainable and id(prior.net.clip_std) not in trainable
    prior.requires_grad_(True)
    assert not prior.text_projection.weight.requires_grad and not prior.net.clip_std.requires_grad
    assert all(p.requires_grad for p in prior.trainable_parameters())
    # forward is the training loss (DALLE2-pytorch's convention), seeded by its generator
    cond, uncond = synthetic_conditions(2)
    x = torch.randn(2, P)
    loss = prior(x, cond, uncond, generator=torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.equal(loss, prior.loss(x, cond, uncond, generator=torch.Generator().manual_seed(0)))


# -- conditions from a real CLIP text encoder --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip_text(tiny_model_dir):
    te = CLIPTextModel.from_pretrained(tiny_model_dir, subfolder="text_encoder").eval()
    return te, CLIPTokenizer.from_pretrained(tiny_model_dir, subfolder="tokenizer")


def test_condition_from_the_text_encoder(clip_text):
    te, tok = clip_text
    d = te.config.hidden_size
    torch.manual_seed(0)
    prompts = ["a red circle on a blue background", ""]
    full = new_tiny(d, num_embeddings=77, num_layers=1, text_projection=torch.randn(d, d)).eval()
    cond = full.encode_prompt(prompts, text_encoder=te, tokenizer=tok)
    assert cond.text_embeds.shape == (2, d) and cond.hidden_states.shape == (2, 77, d)
    assert cond.mask.dtype == torch.bool and cond.mask[1].sum() == 2  # "" is BOS + EOS; padding is masked
    assert cond.mask[0].sum() == len(tok(prompts[0]).input_ids)
    out = te(tok(prompts[:1], return_tensors="pt", padding="max_length").input_ids)
    torch.testing.assert_close(cond.text_embeds[0], full.text_projection(out.pooler_output)[0])
    torch.testing.assert_close(cond.hidden_states[0], out.last_hidden_state[0])
    assert full.sample(cond[0], cond[1], num_inference_steps=2, generator=gens(0)).shape == (1, d)
    # a prior reading 16 tokens gets the same first 16 (the rest is padding); the pooled embedding is unchanged
    short = new_tiny(d, num_embeddings=16, num_layers=1, text_projection=full.text_projection.weight).eval()
    cut = short.encode_prompt(prompts, text_encoder=te, tokenizer=tok)
    assert cut.hidden_states.shape == (2, 16, d) and torch.equal(cut.mask, cond.mask[:, :16])
    torch.testing.assert_close(cut.hidden_states, cond.hidden_states[:, :16])
    torch.testing.assert_close(cut.text_embeds, cond.text_embeds)
    assert short.sample(cut[0], cut[1], num_inference_steps=2, generator=gens(0)).shape == (1, d)


def test_bad_dims_name_the_field(clip_text):
    te, tok = clip_text
    d = te.config.hidden_size
    with pytest.raises(InvalidInput) as e:  # a prior for 64-wide CLIP, fed a 32-wide text encoder
        new_tiny(2 * d, num_layers=1).encode_prompt(["a red circle"], text_encoder=te, tokenizer=tok)
    assert e.value.field == "text_encoder" and str(2 * d) in e.value.message
    with pytest.raises(InvalidInput) as e:  # the PriorTransformer needs text width D == embedding width P
        new_tiny(P, num_layers=1, text_projection=torch.randn(P, 2 * P))
    assert e.value.field == "text_projection" and str(2 * P) in e.value.message
    with pytest.raises(InvalidInput) as e:
        new_tiny(P, num_layers=1, text_projection=torch.randn(2 * P, P))
    assert e.value.field == "text_projection"
    prior = small_prior()
    cond, uncond = synthetic_conditions(2)
    with pytest.raises(InvalidInput) as e:
        prior.loss(torch.randn(2, P + 1), cond, uncond)
    assert e.value.field == "image_embeds"
    with pytest.raises(InvalidInput) as e:
        prior.sample(cond, uncond, generator=gens(0))
    assert e.value.field == "generator"
    with pytest.raises(InvalidInput) as e:
        prior.sample(cond, None, guidance_scale=4.0)
    assert e.value.field == "uncond"
    with pytest.raises(InvalidInput) as e:
        prior.sample(cond, uncond, num_inference_steps=0)
    assert e.value.field == "num_inference_steps"
