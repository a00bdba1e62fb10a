"""`train_diffusion_prior` on a small budget: it learns, it is seeded, its output saves and loads, bad data is named."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPTextModel, CLIPTokenizer

from minidalle.diffusion_prior import DiffusionPrior, new_tiny
from minidalle.errors import InvalidInput
from minidalle.tiny.prior_training import PriorTrainConfig, train_diffusion_prior

CAPTIONS = ["a red circle on a blue background", "a green square on a white background",
            "a blue cross on a yellow background", "an orange triangle on a black background"]
TINY = dict(steps=150, batch_size=32, warmup_steps=10, lr=2e-3, ema_decay=0.9)  # EMA ~ the last 10 steps


@pytest.fixture(scope="module")
def clip_text(tiny_model_dir):
    te = CLIPTextModel.from_pretrained(tiny_model_dir, subfolder="text_encoder").eval()
    return te, CLIPTokenizer.from_pretrained(tiny_model_dir, subfolder="tokenizer")


def pairs(n_per_caption: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(caption_index (N,), image_embeds (N, 32), centroids (4, 32)): a cluster of embeddings per caption."""
    gen = torch.Generator().manual_seed(seed)
    centroids = torch.randn(4, 32, generator=gen) * 2 + 1  # (4, 32), off-centre like real CLIP embeddings
    index = torch.arange(4).repeat_interleave(n_per_caption)  # (N,)
    return index, centroids[index] + 0.1 * torch.randn(len(index), 32, generator=gen), centroids


def fresh_prior(te) -> DiffusionPrior:
    torch.manual_seed(0)
    d = te.config.hidden_size
    return new_tiny(d, num_layers=2, heads=2, head_dim=16, text_projection=torch.randn(d, d) / d**0.5)


@pytest.fixture(scope="module")
def trained(clip_text):
    te, tok = clip_text
    index, embeds, centroids = pairs()
    prior = fresh_prior(te)
    seen = []
    stats = train_diffusion_prior(prior, te, tok, CAPTIONS, index, embeds, PriorTrainConfig(seed=1, **TINY),
                                  progress=False, on_progress=lambda step, total, loss: seen.append(step))
    return prior, stats, centroids, seen


def test_learns_each_caption_s_embedding(trained, clip_text):
    prior, stats, centroids, seen = trained
    assert stats["steps"] == TINY["steps"] == len(stats["losses"]) and seen[-1] == TINY["steps"]
    assert stats["captions"] == 4 and stats["loss_last100"] < 0.5 * stats["loss_first100"]
    assert not prior.training and not any(p.requires_grad for p in prior.parameters())
    te, tok = clip_text
    cond = prior.encode_prompt(CAPTIONS, text_encoder=te, tokenizer=tok)
    uncond = prior.encode_prompt([""], text_encoder=te, tokenizer=tok)
    out = prior.sample(cond, uncond, guidance_scale=1.0, generator=[torch.Generator().manual_seed(i) for i in range(4)])
    cos = F.cosine_similarity(out[:, None], centroids[None], dim=-1)  # (4, 4)
    assert torch.equal(cos.argmax(1), torch.arange(4)) and cos.diagonal().min() > 0.9, cos


def test_training_is_seeded_and_saves(trained, clip_text, tmp_path):
    te, tok = clip_text
    prior, _, _, _ = trained
    index, embeds, _ = pairs()
    again = fresh_prior(te)
    train_diffusion_prior(again, te, tok, CAPTIONS, index, embeds, PriorTrainConfig(seed=1, **TINY), progress=False)
    sd, sd2 = prior.state_dict(), again.state_dict()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    # the standardisation came from the data, and travels with the weights
    torch.testing.assert_close(prior.net.clip_mean[0], embeds.mean(0))
    prior.save_pretrained(tmp_path)
    loaded = DiffusionPrior.from_pretrained(tmp_path)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in sd.items())


def test_bad_data_and_config_name_the_field(clip_text, tmp_path):
    te, tok = clip_text
    prior = fresh_prior(te)
    index, embeds, _ = pairs()
    cfg = PriorTrainConfig(steps=1)
    with pytest.raises(InvalidInput, match="caption_index"):
        train_diffusion_prior(prior, te, tok, CAPTIONS[:2], index, embeds, cfg, progress=False)
    with pytest.raises(InvalidInput, match="caption_index"):
        train_diffusion_prior(prior, te, tok, CAPTIONS, index[:-1], embeds, cfg, progress=False)
    with pytest.raises(InvalidInput, match="image_embeds"):
        train_diffusion_prior(prior, te, tok, CAPTIONS, index, embeds[:, :16], cfg, progress=False)
    for field, bad in (("steps", 0), ("batch_size", -1), ("cond_drop_prob", 1.0), ("ema_decay", 1.0)):
        with pytest.raises(InvalidInput) as e:
            PriorTrainConfig(**{field: bad})
        assert e.value.field == field
