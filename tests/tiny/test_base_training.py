"""`train-base` on a tiny budget writes a folder that the ordinary loaders read, and it is seeded."""

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from minidalle.cli.tiny import train_base_main
from minidalle.pipeline import MiniDallePipeline
from minidalle.tiny.base_training import BaseTrainConfig, ImageSideConfig, train_base, train_image_side
from minidalle.tiny.evaluate import evaluate
from minidalle.tiny.shapes import heldout_combos

TINY = dict(n_images=64, vae_steps=2, vae_batch=8, unet_steps=3, batch_size=8, warmup_steps=1,
            vae_channels=(16, 16, 16), unet_channels=(32, 32), text_width=32, text_layers=1,
            checkpoint_every=2, image_side=ImageSideConfig(n_images=64, clip_steps=2, prior_steps=2, ip_steps=2))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "model"
    result = train_base(BaseTrainConfig(out=out, seed=5, **TINY))
    return out, result


def test_writes_sd15_layout_that_loads(trained):
    out, result = trained
    index = json.loads((out / "model_index.json").read_text())
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert part in index and (out / part).is_dir()
    assert (out / "prior" / "config.json").is_file()
    assert json.loads((out / "training.json").read_text())["steps"] == TINY["unet_steps"]
    leaks = [p for p in out.rglob("*.json") if str(out.parent) in p.read_text()]  # where it was made stays here
    assert not leaks
    assert result["steps"] == TINY["unet_steps"] and result["timings"]["total_s"] > 0
    # CPU time (the budget's unit) covers the whole run, the image side included
    assert result["timings"]["cpu_s"] > result["image_side"]["timings"]["cpu_s"] > 0
    pipe = MiniDallePipeline.from_pretrained(out, device="cpu")
    assert pipe.default_height == 32
    # latents are scaled to unit variance, as SD's are
    assert pipe.vae.config.scaling_factor != pytest.approx(0.18215)
    image = pipe("a red circle on a blue background", num_inference_steps=2, seed=0).images[0]
    assert image.size == (32, 32)
    # the evaluation runs end to end on it (scores are near zero for 3 training steps; only the shape is checked)
    r = evaluate(pipe, seeds=(0,), prompts=list(heldout_combos())[:2], steps=2, progress=False)
    assert r["n_images"] == 2 and 0.0 <= r["shape_accuracy"] <= 1.0
    # the image side: CLIP vision tower, diffusion prior, IP-Adapter, each where its loader looks
    for part in ("image_encoder/config.json", "diffusion_prior/config.json", "ip_adapter/ip-adapter.safetensors"):
        assert (out / part).is_file(), part
    assert pipe.diffusion_prior is not None and pipe.has_ip_adapter
    side = json.loads((out / "training.json").read_text())["image_side"]
    assert side["clip"]["steps"] == side["prior"]["steps"] == side["ip"]["steps"] == 2
    r = evaluate(pipe, seeds=(0,), prompts=list(heldout_combos())[:2], steps=2, progress=False, prior="diffusion",
                 prior_num_inference_steps=2)
    assert r["prior"] == "diffusion" and -1.0 <= r["clip_score"] <= 1.0


def test_training_is_seeded(trained, tmp_path):
    out, _ = trained
    again = tmp_path / "again"
    train_base(BaseTrainConfig(out=again, seed=5, **TINY))
    a = MiniDallePipeline.from_pretrained(out, device="cpu")
    b = MiniDallePipeline.from_pretrained(again, device="cpu")
    pairs = ((a.unet, b.unet), (a.vae, b.vae), (a.text_encoder, b.text_encoder), (a.image_encoder, b.image_encoder),
             (a.diffusion_prior, b.diffusion_prior))
    a.set_image_tokens(True)
    b.set_image_tokens(True)
    for m1, m2 in pairs:
        sd1, sd2 = m1.state_dict(), m2.state_dict()
        assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    assert not np.isclose(a.vae.config.scaling_factor, 1.0)


def test_the_image_stage_alone_makes_what_the_whole_run_made(trained, tmp_path):
    """`train-base --stages image` over the base of a whole run writes that run's image side, bit for bit, whatever
    the process drew before: how the shipped image side was made, and why the whole run reproduces it."""
    out, _ = trained
    alone = tmp_path / "alone"
    shutil.copytree(out, alone)
    side = ("image_encoder", "diffusion_prior", "ip_adapter")
    for part in (*side, "feature_extractor"):
        shutil.rmtree(alone / part)
    assert MiniDallePipeline.from_pretrained(alone, device="cpu").diffusion_prior is None
    torch.manual_seed(1234)
    torch.rand(99)  # another history of the global generator than the whole run's
    train_image_side(alone, replace(TINY["image_side"], seed=5))
    for part in side:
        files = sorted(p.relative_to(out) for p in (out / part).rglob("*.safetensors"))
        assert files, part
        for f in files:
            a, b = load_file(out / f), load_file(alone / f)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f


def test_bad_config_names_the_field(tmp_path):
    with pytest.raises(ValueError, match="unet_steps"):
        BaseTrainConfig(out=tmp_path, unet_steps=0)
    with pytest.raises(ValueError, match="resolution"):
        BaseTrainConfig(out=tmp_path, resolution=48)
    with pytest.raises(SystemExit):
        train_base_main(["--out", str(tmp_path), "--steps", "-1"])
