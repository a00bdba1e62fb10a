"""The fine-tuning trainer on the embedded tiny model: exact resume, cancel, artifacts, diffusers compatibility."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from minidalle.embedded import TINY_RANDOM
from minidalle.errors import Cancelled
from minidalle.training import TrainConfig, train
from minidalle.training.checkpoint import latest_checkpoint


@pytest.fixture
def dataset(zorb):
    """Four 40×48 images (not square: exercises resize + centre crop), kohya captions."""
    return zorb(4, (40, 48))


def config(dataset, out, **kw) -> TrainConfig:
    base = dict(dataset_dir=str(dataset), output_dir=str(out), steps=6, checkpoint_every=2, learning_rate=1e-3,
                model=str(TINY_RANDOM))  # the core tests' model (the package default is the trained tiny-shapes)
    return TrainConfig(**{**base, **kw})


def cancel_at(step):
    def on_progress(event):
        if event["type"] == "progress" and event["step"] == step:
            raise Cancelled()
    return on_progress


def weights(adapter_dir):
    return load_file(adapter_dir / "adapter.safetensors")


def test_resume_is_exact(dataset, tmp_path):
    straight = train(config(dataset, tmp_path / "a"))
    cfg = config(dataset, tmp_path / "b")
    with pytest.raises(Cancelled):
        train(cfg, on_progress=cancel_at(3))
    assert latest_checkpoint(cfg.work_path).name == "step-000003"  # cancel saved where it stopped
    assert not (tmp_path / "b").exists()  # a cancelled run publishes no adapter
    resumed = train(cfg)
    assert resumed.steps == straight.steps == 6
    a, b = weights(straight.adapter_dir), weights(resumed.adapter_dir)
    assert a.keys() == b.keys() and any(k.startswith("prior.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # and training moved the weights: LoRA B matrices and the prior's zero-initialised last layer left zero
    assert any(a[k].abs().max() > 0 for k in a if "lora_B" in k)
    assert a["prior.fc3.weight"].abs().max() > 0


def test_no_resume_starts_over(dataset, tmp_path):
    cfg = config(dataset, tmp_path / "a", steps=4)
    with pytest.raises(Cancelled):
        train(cfg, on_progress=cancel_at(2))
    events = []
    train(config(dataset, tmp_path / "a", steps=4, resume=False), on_progress=events.append)
    steps = [e["step"] for e in events if e["type"] == "progress"]
    assert steps == [1, 2, 3, 4]


def test_progress_events_and_checkpoint_rotation(dataset, tmp_path):
    events = []
    cfg = config(dataset, tmp_path / "a", steps=8, checkpoint_every=2, keep_checkpoints=2,
                 validation_prompts=["a zorb number 1", "a zorb"], validation_steps=3)
    result = train(cfg, on_progress=events.append)
    caching = [e for e in events if e["type"] == "caching"]
    assert caching[-1]["done"] == caching[-1]["total"] == 4 + 5  # 4 images, 4 captions + the empty one
    assert events.index(caching[-1]) < min(i for i, e in enumerate(events) if e["type"] == "progress")
    progress = [e for e in events if e["type"] == "progress"]
    assert [e["step"] for e in progress] == list(range(1, 9))
    assert all(e["total"] == 8 and np.isfinite(e["loss"]) and e["lr"] > 0 and e["eta_s"] >= 0 for e in progress)
    assert [e["step"] for e in events if e["type"] == "checkpoint"] == [2, 4, 6]
    kept = sorted(p.name for p in (cfg.work_path / "checkpoints").iterdir())
    assert kept == ["step-000004", "step-000006"]
    val = [e for e in events if e["type"] == "validation"]
    assert [e["step"] for e in val] == [2, 4, 6, 8] and all(len(e["images"]) == 2 for e in val)
    # fixed validation seed: the images change only because the weights do; all are decodable PNGs
    first = np.asarray(Image.open(val[0]["images"][0]))
    assert first.shape == (32, 32, 3)
    assert len(result.validation_images) == 8


def test_adapter_artifact(dataset, tmp_path, fresh_pipe):
    result = train(config(dataset, tmp_path / "ad", steps=3, rank=4, alpha=8.0))
    meta = json.loads((result.adapter_dir / "adapter.json").read_text())
    pipe = fresh_pipe()
    assert meta["base_model_hash"] == pipe.model_hash
    assert meta["lora"] == {"rank": 4, "alpha": 8.0, "dropout": 0.1, "target_modules": ["to_q", "to_k", "to_v"]}
    assert meta["steps"] == 3 and meta["num_images"] == 4 and meta["has_prior"] is True
    assert meta["training"]["learning_rate"] == 1e-3 and len(meta["dataset_hash"]) == 16
    lora_a = [v for k, v in weights(result.adapter_dir).items() if k.endswith("lora_A.weight")]
    assert lora_a and all(v.shape[0] == 4 for v in lora_a)
    assert (result.adapter_dir / "pytorch_lora_weights.safetensors").is_file()


def test_diffusers_reads_the_adapter_with_identical_pixels(dataset, tmp_path, fresh_pipe):
    """train_prior=False: stock diffusers' load_lora_weights + StableDiffusionPipeline == MiniDallePipeline."""
    from diffusers import StableDiffusionPipeline

    result = train(config(dataset, tmp_path / "ad", steps=10, learning_rate=5e-3, train_prior=False))
    assert not any(k.startswith("prior.") for k in weights(result.adapter_dir))
    ours = fresh_pipe()
    base = ours("a zorb number 1", num_inference_steps=5, seed=0).images[0]
    mine = ours("a zorb number 1", num_inference_steps=5, seed=0, adapters=[(str(result.adapter_dir), 1.0)]).images[0]
    other = fresh_pipe()
    scheduler = other.scheduler.__class__.from_config(other.scheduler.config)
    sd = StableDiffusionPipeline(vae=other.vae, text_encoder=other.text_encoder, tokenizer=other.tokenizer,
                                 unet=other.unet, scheduler=scheduler,
                                 safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)
    sd.load_lora_weights(str(result.adapter_dir), weight_name="pytorch_lora_weights.safetensors")
    sd.unet.eval()  # diffusers leaves the injected LoRA dropout modules in training mode
    theirs = sd("a zorb number 1", num_inference_steps=5, generator=[torch.Generator().manual_seed(0)]).images[0]
    assert np.array_equal(np.asarray(mine), np.asarray(theirs))
    assert np.abs(np.asarray(mine, dtype=int) - np.asarray(base, dtype=int)).mean() > 1  # the adapter does something


def test_resident_pipeline_is_left_as_it_was(dataset, tmp_path, fresh_pipe):
    pipe = fresh_pipe()
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    img0 = np.asarray(pipe("a zorb", num_inference_steps=4, seed=1).images[0])
    train(config(dataset, tmp_path / "ad", steps=3, validation_prompts=["a zorb"], validation_steps=2), pipeline=pipe)
    after = {k.replace(".base_layer.", "."): v for k, v in pipe.unet.state_dict().items() if "lora_" not in k}
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not pipe.unet.training and not any(p.requires_grad for p in pipe.unet.parameters())
    assert pipe.loaded_adapters == []
    assert np.array_equal(img0, np.asarray(pipe("a zorb", num_inference_steps=4, seed=1).images[0]))


def test_cache_off_matches_cache_on(dataset, tmp_path):
    a = weights(train(config(dataset, tmp_path / "a", steps=3, cache=True)).adapter_dir)
    b = weights(train(config(dataset, tmp_path / "b", steps=3, cache=False)).adapter_dir)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_grad_accum_and_batch(dataset, tmp_path):
    result = train(config(dataset, tmp_path / "a", steps=2, batch_size=2, grad_accum=2, random_flip=True,
                          lr_scheduler="cosine", lr_warmup_steps=1))
    assert result.steps == 2 and np.isfinite(result.loss)


@pytest.mark.parametrize("field,value", [
    ("steps", 0), ("learning_rate", 0.0), ("rank", 0), ("alpha", -1.0), ("dropout", 1.0), ("batch_size", 0),
    ("grad_accum", 0), ("resolution", 30), ("mixed_precision", "fp8"), ("lr_scheduler", "sometimes"),
    ("caption_dropout", 1.5), ("checkpoint_every", -1), ("target_modules", []),
])
def test_bad_config_names_the_field(dataset, tmp_path, field, value):
    with pytest.raises(ValueError, match=f"^{field}"):
        train(config(dataset, tmp_path / "a", **{field: value}))


def test_fp16_on_cpu_is_refused(dataset, tmp_path):
    with pytest.raises(ValueError, match="mixed_precision"):
        train(config(dataset, tmp_path / "a", mixed_precision="fp16"))


def test_bad_dataset_fails_before_training(tmp_path):
    ds = tmp_path / "ds"
    ds.mkdir()
    Image.new("RGB", (16, 16)).save(ds / "ok.png")
    (ds / "ok.txt").write_text("fine")
    (ds / "bad.png").write_bytes(b"not an image at all")
    (ds / "bad.txt").write_text("broken")
    with pytest.raises(ValueError, match="bad.png"):
        train(config(ds, tmp_path / "a"))
    assert not (tmp_path / "a.work").exists()


def test_v_prediction_targets(dataset, tmp_path, fresh_pipe):
    """A v-prediction scheduler config makes the trainer regress the velocity, not the noise."""
    from minidalle.training.trainer import Trainer

    pipe = fresh_pipe()
    pipe.scheduler.register_to_config(prediction_type="v_prediction")
    trainer = Trainer(config(dataset, tmp_path / "a", steps=1), pipeline=pipe)
    try:
        trainer.setup()
        assert trainer.noise_scheduler.config.prediction_type == "v_prediction"
        latents, noise, t = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8), torch.tensor([500])
        v = trainer.noise_scheduler.get_velocity(latents, noise, t)
        assert not torch.allclose(v, noise)
        assert np.isfinite(float(trainer._micro_step(0)[0].detach()))
    finally:
        trainer.teardown()


def test_adapters_left_active_by_a_request_do_not_shape_training(dataset, tmp_path, fresh_pipe, make_adapter):
    """A served generate with an adapter, then a train_prior=False fine-tune on the same resident pipeline."""
    from minidalle.training.trainer import Trainer

    pipe = fresh_pipe()
    pipe("a zorb", num_inference_steps=2, seed=0, adapters=[(str(make_adapter("served")), 1.0)])
    trainer = Trainer(config(dataset, tmp_path / "a", steps=1, train_prior=False), pipeline=pipe)
    try:
        trainer.setup()
        h = torch.randn(1, 77, pipe.text_encoder.config.hidden_size)
        assert torch.equal(trainer._condition(h), h)  # identity base prior only, no served adapter delta
    finally:
        trainer.teardown()


def test_broken_adapter_files_are_value_errors(tmp_path, make_adapter, fresh_pipe):
    from minidalle.adapters import load_adapter_files

    folder = make_adapter("broken")
    meta = json.loads((folder / "adapter.json").read_text())
    (folder / "adapter.json").write_text(json.dumps({**meta, "lora": {**meta["lora"], "bogus": 1}}))
    with pytest.raises(ValueError, match="bad 'lora' section"):
        load_adapter_files(folder)
    (folder / "adapter.json").write_text(json.dumps(meta))
    (folder / "adapter.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        fresh_pipe().load_adapter(folder)
