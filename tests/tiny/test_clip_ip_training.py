"""The tiny CLIP image tower and the IP-Adapter head train on the shapes data, seeded, touching nothing else."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer

from minidalle import image_conditioning as ic
from minidalle.embedded import TINY_SHAPES
from minidalle.errors import InvalidInput
from minidalle.tiny import shapes
from minidalle.tiny.base_training import encode_latents, tokenize
from minidalle.tiny.clip_training import (
    ClipTrainConfig,
    clip_loss,
    image_embeddings,
    pixel_values,
    pooled_text,
    retrieval_accuracy,
    train_clip,
)
from minidalle.tiny.ip_training import IpTrainConfig, train_ip_adapter

# four combinations that differ in every attribute: a few dozen steps of a one-layer tower can tell them apart
EASY = [shapes.Combo("red", "circle", "blue"), shapes.Combo("green", "square", "yellow"),
        shapes.Combo("white", "triangle", "black"), shapes.Combo("orange", "cross", "purple")]
SMALL = dict(steps=60, batch_size=32, lr=3e-3, warmup_steps=5, patch_size=8, hidden_size=32, layers=1, heads=2)


def _easy_images(n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    combos = [EASY[i % len(EASY)] for i in range(n)]
    return np.stack([shapes.sample(c, rng, 32) for c in combos]), [c.caption for c in combos]


@pytest.fixture(scope="module")
def text_side():
    return (CLIPTextModel.from_pretrained(TINY_SHAPES, subfolder="text_encoder"),
            CLIPTokenizer.from_pretrained(TINY_SHAPES, subfolder="tokenizer"))


@pytest.fixture(scope="module")
def clip(text_side):
    images, captions = _easy_images(128, seed=0)
    return train_clip(*text_side, images, captions, ClipTrainConfig(seed=3, **SMALL))


def test_clip_loss_counts_same_caption_pairs_as_positives():
    e = torch.eye(4)[:2]  # two orthogonal unit embeddings
    img, txt = e[[0, 0, 1]], e[[0, 0, 1]]  # images 0 and 1 share a caption; everything perfectly aligned
    loss = clip_loss(img, txt, torch.tensor([0, 0, 1]), torch.tensor(math.log(100.0)))
    # the floor is the targets' entropy: rows 0, 1 split over two columns (ln 2), row 2 has one (0)
    assert loss.item() == pytest.approx(2 / 3 * math.log(2), abs=1e-4)
    # (with the duplicate as a negative, the loss would push image 0 away from image 1's caption, its own one)
    # captions paired with the wrong images cost far more
    worse = clip_loss(img, txt[[2, 0, 1]], torch.tensor([0, 0, 1]), torch.tensor(math.log(100.0)))
    assert worse.item() > 10


def test_pixel_values_are_what_the_processor_makes():
    images, _ = _easy_images(4, seed=1)
    processor = ic.new_image_processor(32)
    ours = pixel_values(processor, images)
    theirs = processor(images=[Image.fromarray(im) for im in images], return_tensors="pt").pixel_values
    assert ours.shape == (4, 3, 32, 32)
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_train_clip_learns_and_is_seeded(clip, text_side):
    vision, processor, text_projection, stats = clip
    assert vision.config.projection_dim == text_side[0].config.hidden_size == 64  # the prior's one width
    assert text_projection.weight.shape == (64, 64) and text_projection.bias is None
    assert stats["steps"] == SMALL["steps"] and stats["final_loss"] < stats["losses"][0]
    # fresh images of the four combinations find their caption among the four
    images, captions = _easy_images(64, seed=9)
    embeds = image_embeddings(vision, processor, images)
    assert torch.allclose(embeds[:3], ic.encode_images(vision, processor, [Image.fromarray(im) for im in images[:3]]),
                          atol=1e-5)  # the training path and the library path see the same pixels
    candidates = [c.caption for c in EASY]
    text = text_projection(pooled_text(*text_side, candidates))
    assert retrieval_accuracy(embeds, captions, text, candidates) >= 0.9
    again = train_clip(*text_side, *_easy_images(128, seed=0), ClipTrainConfig(seed=3, **SMALL))
    theirs = again[0].state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in vision.state_dict().items())
    assert torch.equal(text_projection.weight, again[2].weight)
    other = train_clip(*text_side, *_easy_images(128, seed=0), ClipTrainConfig(seed=4, **{**SMALL, "steps": 2}))
    assert not torch.equal(vision.visual_projection.weight, other[0].visual_projection.weight)


def test_bad_configs_name_the_field():
    with pytest.raises(InvalidInput, match="^patch_size"):
        ClipTrainConfig(patch_size=5)
    with pytest.raises(InvalidInput, match="^batch_size"):
        ClipTrainConfig(batch_size=1)
    with pytest.raises(InvalidInput, match="^text_dropout"):
        IpTrainConfig(text_dropout=1.5)


@pytest.fixture(scope="module")
def ip_data(clip, text_side):
    vision, processor, _, _ = clip
    text_encoder, tokenizer = text_side
    images, captions = _easy_images(16, seed=2)
    vae = AutoencoderKL.from_pretrained(TINY_SHAPES, subfolder="vae")
    latents = encode_latents(vae, images) * vae.config.scaling_factor  # (16, 4, 8, 8)
    return (latents, tokenize(tokenizer, captions), tokenize(tokenizer, [""])[0],
            image_embeddings(vision, processor, images))


def test_train_ip_adapter_trains_only_the_head(ip_data, text_side):
    text_encoder = text_side[0]
    unet = UNet2DConditionModel.from_pretrained(TINY_SHAPES, subfolder="unet")
    base = {k: v.clone() for k, v in unet.state_dict().items()}
    text_before = {k: v.clone() for k, v in text_encoder.state_dict().items()}
    # all text dropped: the image tokens alone must explain these 16 pictures, and the fixed-batch loss says so
    cfg = IpTrainConfig(seed=1, steps=30, batch_size=8, lr=1e-2, warmup_steps=2, text_dropout=1.0,
                        image_dropout=0.0)
    state, stats = train_ip_adapter(unet, text_encoder, *ip_data, cfg)
    init = ic.new_ip_adapter_state(UNet2DConditionModel.from_pretrained(TINY_SHAPES, subfolder="unet"), 64,
                                   generator=torch.Generator().manual_seed(1))
    assert state.keys() == init.keys()
    assert all(not torch.equal(state[k], init[k]) for k in state)  # every tensor of the head learned
    after = unet.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base.items())  # the UNet's own weights did not move
    assert all(torch.equal(text_encoder.state_dict()[k], v) for k, v in text_before.items())
    assert stats["steps"] == 30 and np.isfinite(stats["final_loss"])
    assert stats["check_after"]["image"] < stats["check_before"]["image"]
    assert stats["check_after"]["image"] < stats["check_after"]["no_image"]
    # what it returns is what the UNet holds, and it is seeded
    assert all(torch.equal(v, ic.ip_adapter_state(unet)[k]) for k, v in state.items())
    again, _ = train_ip_adapter(UNet2DConditionModel.from_pretrained(TINY_SHAPES, subfolder="unet"), text_encoder,
                                *ip_data, cfg)
    assert all(torch.equal(again[k], v) for k, v in state.items())
