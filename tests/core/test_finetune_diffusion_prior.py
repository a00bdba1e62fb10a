"""A fine-tune on a model with a diffusion prior trains a LoRA on it too (train_prior), next to the UNet's LoRA:
what the adapter holds and records, that the pipeline switches it with the adapter and its scale, that it learns
the dataset's CLIP image embeddings, exact resume, and a resident pipeline left as it was."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from _support.image_model import build_image_model
from PIL import Image
from safetensors.torch import load_file, save_file

from minidalle import MiniDallePipeline
from minidalle.errors import Cancelled, InvalidInput
from minidalle.training import TrainConfig, train


@pytest.fixture(scope="module")
def image_model_dir(tmp_path_factory):
    return build_image_model(tmp_path_factory.mktemp("image-model") / "model")


@pytest.fixture
def pipe(image_model_dir):
    return MiniDallePipeline.from_pretrained(image_model_dir, device="cpu")


def config(dataset, out, **kw) -> TrainConfig:
    return TrainConfig(**{**dict(dataset_dir=str(dataset), output_dir=str(out), steps=2, checkpoint_every=0,
                                 learning_rate=1e-3), **kw})


def embeds(pipe, prompt: str, adapters=None) -> torch.Tensor:
    gens = [torch.Generator().manual_seed(s) for s in range(4)]
    return pipe.sample_image_embeds([prompt] * 4, gens, num_inference_steps=3, adapters=adapters)


def test_the_adapter_carries_a_lora_on_the_diffusion_prior(pipe, zorb, tmp_path):
    out = train(config(zorb(4), tmp_path / "zorb"), pipeline=pipe).adapter_dir
    meta = json.loads((out / "adapter.json").read_text())
    assert meta["priors"] == {"mlp": "adapter", "diffusion": "adapter"} and meta["has_diffusion_prior"] is True
    keys = [k for k in load_file(out / "adapter.safetensors") if k.startswith("diffusion_prior.")]
    blocks = pipe.diffusion_prior.net.config.num_layers
    for proj in ("to_q", "to_k", "to_v"):  # the adapter's LoRA settings, on every block of the PriorTransformer
        assert len([k for k in keys if f".{proj}.lora_A" in k]) == blocks, proj
    # the pipeline switches it with the adapter: on at 1, off at 0 and without the adapter, gone when unloaded
    base = embeds(pipe, "a zorb number 1", adapters=[])
    on = embeds(pipe, "a zorb number 1", adapters=[(str(out), 1.0)])
    assert (on - base).abs().max() > 1e-3
    assert torch.equal(embeds(pipe, "a zorb number 1", adapters=[("zorb", 0.0)]), base)
    assert torch.equal(embeds(pipe, "a zorb number 1", adapters=[]), base)
    pipe.unload_adapter("zorb")
    assert not hasattr(pipe.diffusion_prior.net, "peft_config")
    assert torch.equal(embeds(pipe, "a zorb number 1", adapters=[]), base)


def test_train_prior_off_leaves_the_diffusion_prior_alone(pipe, zorb, tmp_path):
    before = embeds(pipe, "a zorb number 0", adapters=[])
    out = train(config(zorb(4), tmp_path / "plain", train_prior=False), pipeline=pipe).adapter_dir
    meta = json.loads((out / "adapter.json").read_text())
    assert meta["priors"] == {"mlp": "base", "diffusion": "base"} and meta["has_diffusion_prior"] is False
    assert not [k for k in load_file(out / "adapter.safetensors") if not k.startswith("unet.")]
    assert torch.equal(embeds(pipe, "a zorb number 0", adapters=[(str(out), 1.0)]), before)


def test_it_learns_the_datasets_image_embeddings(pipe, zorb, tmp_path):
    """Every image is captioned "a zorb": the prior, asked for "a zorb", must move towards their CLIP embeddings."""
    ds = zorb(4)
    for caption in ds.glob("*.txt"):
        caption.write_text("a zorb")
    target = pipe.encode_image([Image.open(p).convert("RGB") for p in sorted(ds.glob("*.png"))]).mean(0)  # (P,)

    def distance(adapters) -> float:
        return float(F.mse_loss(embeds(pipe, "a zorb", adapters=adapters).mean(0), target))

    before = distance([])
    out = train(config(ds, tmp_path / "learnt", steps=60, learning_rate=1e-2, batch_size=4),
                pipeline=pipe).adapter_dir
    after = distance([(str(out), 1.0)])
    assert after < 0.5 * before, (before, after)


def test_resume_with_the_diffusion_prior_is_exact(pipe, zorb, tmp_path):
    ds = zorb(4)
    straight = train(config(ds, tmp_path / "a", steps=4, checkpoint_every=2), pipeline=pipe).adapter_dir

    def cancel_at(step):
        def on_progress(event):
            if event["type"] == "progress" and event["step"] == step:
                raise Cancelled()
        return on_progress

    with pytest.raises(Cancelled):
        train(config(ds, tmp_path / "b", steps=4, checkpoint_every=2), pipeline=pipe, on_progress=cancel_at(3))
    resumed = train(config(ds, tmp_path / "b", steps=4, checkpoint_every=2), pipeline=pipe).adapter_dir
    a, b = load_file(straight / "adapter.safetensors"), load_file(resumed / "adapter.safetensors")
    assert any(k.startswith("diffusion_prior.") for k in a) and a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_progress_reports_the_prior_loss_and_the_pipeline_is_left_as_it_was(pipe, zorb, tmp_path):
    before = embeds(pipe, "a zorb number 2", adapters=[])
    events = []
    train(config(zorb(4), tmp_path / "a"), pipeline=pipe, on_progress=events.append)
    progress = [e for e in events if e["type"] == "progress"]
    assert progress and all(e["diffusion_prior_loss"] > 0 for e in progress)
    assert not hasattr(pipe.diffusion_prior.net, "peft_config")
    assert not any(p.requires_grad for p in pipe.diffusion_prior.parameters())
    assert not pipe.diffusion_prior.training
    assert torch.equal(embeds(pipe, "a zorb number 2", adapters=[]), before)


def test_a_diffusion_prior_lora_that_does_not_fit_is_refused_whole(pipe, zorb, tmp_path):
    out = train(config(zorb(4), tmp_path / "a"), pipeline=pipe).adapter_dir
    tensors = load_file(out / "adapter.safetensors")
    key = next(k for k in tensors if k.startswith("diffusion_prior.") and ".lora_A" in k)
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 1)
    save_file(tensors, out / "adapter.safetensors")
    with pytest.raises(InvalidInput, match="does not fit") as e:
        pipe.load_adapter(out, name="bad")
    assert e.value.field == "adapters" and "bad" not in pipe.loaded_adapters
    assert not hasattr(pipe.unet, "peft_config") or "bad" not in pipe.unet.peft_config


def test_an_imported_copy_keeps_the_prior_lora(pipe, zorb, tmp_path):
    """Our own folder through the import path (POST /adapters, `adapters import`): the same embeddings after."""
    from minidalle.lora_formats import import_adapter

    out = train(config(zorb(4), tmp_path / "a"), pipeline=pipe).adapter_dir
    copy = import_adapter(out, tmp_path / "copy", pipeline=pipe)
    assert json.loads((copy / "adapter.json").read_text())["priors"]["diffusion"] == "adapter"
    original = embeds(pipe, "a zorb number 1", adapters=[(str(out), 1.0)])
    assert torch.equal(embeds(pipe, "a zorb number 1", adapters=[(str(copy), 1.0)]), original)
    assert not torch.equal(embeds(pipe, "a zorb number 1", adapters=[]), original)


def test_cache_off_trains_the_same_prior_lora(pipe, zorb, tmp_path):
    ds = zorb(4)
    cached = train(config(ds, tmp_path / "a", random_flip=True), pipeline=pipe).adapter_dir
    fresh = train(config(ds, tmp_path / "b", random_flip=True, cache=False), pipeline=pipe).adapter_dir
    a, b = load_file(cached / "adapter.safetensors"), load_file(fresh / "adapter.safetensors")
    keys = [k for k in a if k.startswith("diffusion_prior.")]
    assert keys and all(torch.allclose(a[k], b[k], atol=1e-6) for k in keys)
