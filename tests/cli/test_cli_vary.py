"""`minidalle vary IMAGE` and `generate --prior diffusion`, through the real entry point, on a model with an image
side: PNGs with their parameters, the library's pixels, one-line errors naming the flag."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _support.image_model import build_image_model
from PIL import Image


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_image_model(tmp_path_factory.mktemp("image-model") / "model")


def test_vary_writes_the_librarys_variations(cli_run, model_dir, tmp_path):
    from minidalle import MiniDallePipeline

    src = tmp_path / "in.png"
    Image.new("RGB", (48, 32), (220, 60, 20)).save(src)
    r = cli_run("vary", str(src), "--out", str(tmp_path / "out"), "--model", str(model_dir), "--steps", "3",
                "--num-images", "2", "--seed", "5", "--guidance-scale", "3", "--quiet")
    assert r.returncode == 0, r.stderr
    paths = r.stdout.split()
    assert len(paths) == 2
    pipe = MiniDallePipeline.from_pretrained(model_dir, device="cpu")
    want = pipe("", image=Image.open(src).convert("RGB"), seed=5, num_images_per_prompt=2, num_inference_steps=3,
                guidance_scale=3.0)
    for path, ref in zip(sorted(paths), want.images, strict=True):
        with Image.open(path) as im:
            meta = json.loads(im.text["minidalle"])
            got = np.asarray(im.convert("RGB"), dtype=np.int16)
        assert meta["prior"] == "variation"
        assert np.abs(got - np.asarray(ref, dtype=np.int16)).max() <= 1


def test_generate_with_the_diffusion_prior(cli_run, model_dir, tmp_path):
    r = cli_run("generate", "a red circle", "--out", str(tmp_path / "out"), "--model", str(model_dir), "--steps",
                "2", "--prior", "diffusion", "--prior-steps", "3", "--seed", "1", "--quiet")
    assert r.returncode == 0, r.stderr
    with Image.open(r.stdout.split()[0]) as im:
        meta = json.loads(im.text["minidalle"])
    assert meta["prior"] == "diffusion" and meta["prior_steps"] == 3


@pytest.mark.parametrize("args, flag", [
    (["vary", "missing.png", "--out", "o"], "IMAGE"),
    (["vary", "{src}", "--out", "o", "--prior", "diffusion"], "--prior"),
    (["generate", "a", "--out", "o", "--prior", "clip"], "--prior"),
    (["generate", "a", "--out", "o", "--prior", "diffusion", "--model", "{tiny}"], "--prior"),
])
def test_errors_are_one_line_naming_the_flag(cli_run, tmp_path, args, flag):
    from minidalle.embedded import TINY_RANDOM

    src = tmp_path / "in.png"
    Image.new("RGB", (8, 8)).save(src)
    args = [a.format(src=src, tiny=TINY_RANDOM) for a in args]
    r = cli_run(*args, cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and flag in r.stderr, r.stderr
