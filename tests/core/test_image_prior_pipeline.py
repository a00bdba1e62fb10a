"""The pipeline with an image side: `prior="diffusion"` (the diffusion prior's CLIP image embedding as image tokens)
and variations (`image=`), on the random tiny model given a random image encoder, IP-Adapter and diffusion prior.
What must hold whatever the weights: the folder round trip, seeds, the untouched text-only path, clear refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _support.image_model import build_image_model
from PIL import Image

from minidalle import MiniDallePipeline
from minidalle.errors import InvalidInput

STEPS = dict(num_inference_steps=4, guidance_scale=3.0, prior_num_inference_steps=3)


@pytest.fixture(scope="module")
def image_model_dir(tmp_path_factory):
    return build_image_model(tmp_path_factory.mktemp("image-model") / "model")


@pytest.fixture(scope="module")
def pipe(image_model_dir):
    return MiniDallePipeline.from_pretrained(image_model_dir, device="cpu")


def _px(out) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.int16) for im in out.images])


def test_the_folder_holds_each_part_where_diffusers_keeps_it(image_model_dir, pipe):
    for part in ("image_encoder/config.json", "feature_extractor/preprocessor_config.json",
                 "ip_adapter/ip-adapter.safetensors", "diffusion_prior/config.json",
                 "diffusion_prior/scheduler_config.json", "diffusion_prior/text_projection.safetensors"):
        assert (image_model_dir / part).is_file(), part
    index = json.loads((image_model_dir / "model_index.json").read_text())
    assert index["image_encoder"] == ["transformers", "CLIPVisionModelWithProjection"]
    assert pipe.has_ip_adapter and pipe.diffusion_prior is not None and pipe.image_encoder is not None


def test_the_text_only_path_is_what_it_was(pipe, tiny_pipe):
    """prior="mlp" (the default) runs the plain UNet: the same pixels as the model without an image side, before
    and after a request with image tokens."""
    want = _px(tiny_pipe("a red circle", seed=3, num_inference_steps=4, guidance_scale=3.0))
    assert np.array_equal(_px(pipe("a red circle", seed=3, num_inference_steps=4, guidance_scale=3.0)), want)
    pipe("a red circle", seed=3, prior="diffusion", **STEPS)
    assert np.array_equal(_px(pipe("a red circle", seed=3, num_inference_steps=4, guidance_scale=3.0)), want)


def test_the_diffusion_prior_gives_each_seed_its_embedding_and_each_image_is_remade_alone(pipe):
    e1 = pipe.sample_image_embeds(["a red circle"] * 2, [torch.Generator().manual_seed(s) for s in (5, 6)],
                                  num_inference_steps=3)
    assert e1.shape == (2, pipe.text_encoder.config.hidden_size)
    assert not torch.allclose(e1[0], e1[1])  # different seeds, different embeddings (DALL·E 2's diversity)
    two = pipe("a red circle", seed=5, num_images_per_prompt=2, prior="diffusion", **STEPS)
    alone = pipe("a red circle", seed=6, prior="diffusion", **STEPS)
    assert np.abs(_px(two)[1] - _px(alone)[0]).max() <= 1
    assert two.metadata[1]["prior"] == "diffusion" and two.metadata[1]["seed"] == 6
    assert two.metadata[1]["prior_steps"] == 3 and two.metadata[1]["ip_adapter_scale"] == 1.0
    mlp = pipe("a red circle", seed=5, num_inference_steps=4, guidance_scale=3.0)
    assert np.abs(_px(two)[0] - _px(mlp)[0]).max() > 0  # the image tokens change the image
    assert "prior" not in mlp.metadata[0]


def test_image_tokens_at_scale_zero_change_nothing(pipe):
    mlp = pipe("a red circle", seed=5, num_inference_steps=4, guidance_scale=3.0)
    off = pipe("a red circle", seed=5, prior="diffusion", ip_adapter_scale=0.0, **STEPS)
    assert np.abs(_px(off) - _px(mlp)).max() <= 1


def test_variations_use_the_images_embedding(pipe):
    red = Image.new("RGB", (32, 32), (200, 30, 30))
    blue = Image.new("RGB", (32, 32), (30, 30, 200))
    a = pipe("", image=red, seed=1, num_images_per_prompt=2, num_inference_steps=4, guidance_scale=3.0)
    b = pipe("", image=blue, seed=1, num_images_per_prompt=2, num_inference_steps=4, guidance_scale=3.0)
    again = pipe("", image=red, seed=2, num_inference_steps=4, guidance_scale=3.0)
    assert np.abs(_px(a)[1] - _px(again)[0]).max() <= 1  # reproducible image by image
    assert np.abs(_px(a) - _px(b)).max() > 0  # another image, other variations
    assert a.metadata[0]["prior"] == "variation"
    emb = pipe.encode_image([red, blue])
    assert emb.shape == (2, pipe.text_encoder.config.hidden_size) and not torch.allclose(emb[0], emb[1])


def test_a_batch_of_variations_makes_what_each_makes_alone(pipe):
    red, blue = Image.new("RGB", (32, 32), (200, 30, 30)), Image.new("RGB", (32, 40), (30, 30, 200))
    outs = pipe.generate_many([dict(prompt="", image=red, seed=1), dict(prompt="", image=blue, seed=4)],
                              num_inference_steps=4, guidance_scale=3.0)
    alone = pipe("", image=blue, seed=4, num_inference_steps=4, guidance_scale=3.0)
    assert np.abs(_px(outs[1]) - _px(alone)).max() <= 1


@pytest.mark.parametrize("kwargs, field, message", [
    (dict(prior="clip"), "prior", "unknown prior"),
    (dict(prior="diffusion", prior_guidance_scale=0.5), "prior_guidance_scale", "in [1, 50]"),
    (dict(prior="diffusion", prior_num_inference_steps=0), "prior_num_inference_steps", "in [1, 1000]"),
    (dict(ip_adapter_scale=-1.0), "ip_adapter_scale", "in [0, 10]"),
    (dict(image=Image.new("L", (32, 32))), "image", "RGB"),
    (dict(image=Image.new("RGB", (32, 32)), prior="diffusion"), "prior", "variation"),
])
def test_bad_input_names_its_field(pipe, kwargs, field, message):
    with pytest.raises(InvalidInput) as e:
        pipe("a red circle", num_inference_steps=2, **kwargs)
    assert e.value.field == field and message in e.value.message


def test_a_model_without_an_image_side_refuses_by_name(tiny_pipe):
    with pytest.raises(InvalidInput, match="no diffusion prior") as e:
        tiny_pipe("a red circle", prior="diffusion", num_inference_steps=2)
    assert e.value.field == "prior"
    with pytest.raises(InvalidInput, match="no image encoder") as e:
        tiny_pipe("", image=Image.new("RGB", (32, 32)), num_inference_steps=2)
    assert e.value.field == "image"


def test_variations_batch_only_with_variations(pipe):
    with pytest.raises(InvalidInput, match="batch only with variations") as e:
        pipe.generate_many([dict(prompt="a", image=Image.new("RGB", (8, 8))), dict(prompt="b")],
                           num_inference_steps=2)
    assert e.value.field == "image"


def test_an_adapter_trained_on_it_records_its_priors_and_works_with_either(image_model_dir, zorb, tmp_path):
    from minidalle.training import TrainConfig, train

    pipe = MiniDallePipeline.from_pretrained(image_model_dir, device="cpu")
    pipe("a red circle", seed=1, prior="diffusion", **STEPS)  # image tokens on before training: it turns them off
    out = tmp_path / "zorb"
    train(TrainConfig(dataset_dir=zorb(4), output_dir=out, steps=2, checkpoint_every=0), pipeline=pipe)
    meta = json.loads((out / "adapter.json").read_text())
    assert meta["priors"] == {"mlp": "adapter", "diffusion": "adapter"}
    plain = pipe("a zorb", seed=1, prior="diffusion", **STEPS)
    styled = pipe("a zorb", seed=1, prior="diffusion", adapters=[(str(out), 1.0)], **STEPS)
    assert np.abs(_px(styled) - _px(plain)).max() > 0  # LoRA and image tokens together
    assert styled.metadata[0]["adapters"] == [["zorb", 1.0]] and styled.metadata[0]["prior"] == "diffusion"
