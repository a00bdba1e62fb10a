"""One loading path for every model: a local folder, a hub id (from a hub cache, offline), the embedded model."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.torch import load_file

from minidalle import MiniDallePipeline
from minidalle.embedded import TINY_RANDOM


def fake_hub_cache(cache, repo_id, src, *, with_prior=True):
    """Lay `src` out the way huggingface_hub caches a downloaded repo (refs/main -> snapshots/<rev>/)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    rev = "0" * 40
    snap = repo / "snapshots" / rev
    shutil.copytree(src, snap)
    if not with_prior:
        shutil.rmtree(snap / "prior")
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    return repo


def run_offline(code: str, cache) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter whose hub is `cache`, offline (what a machine without network sees)."""
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("with_prior", [True, False])
def test_hub_id_loads_through_the_same_code(tmp_path, with_prior):
    """`org/name` resolves through huggingface_hub (offline, from its cache) exactly like a local folder."""
    fake_hub_cache(tmp_path / "hub", "someone/tiny-sd", TINY_RANDOM, with_prior=with_prior)
    code = (
        "import numpy as np\n"
        "from minidalle import MiniDallePipeline\n"
        "a = MiniDallePipeline.from_pretrained('someone/tiny-sd')\n"
        f"b = MiniDallePipeline.from_pretrained({str(TINY_RANDOM)!r})\n"
        "ia = a('a red circle', num_inference_steps=3, seed=5).images[0]\n"
        "ib = b('a red circle', num_inference_steps=3, seed=5).images[0]\n"
        "assert a.model_id == 'someone/tiny-sd'\n"
        "assert np.array_equal(np.asarray(ia), np.asarray(ib))\n"
        "assert a.prior.is_identity\n"
        "print('OK', a.model_hash == b.model_hash)\n"
    )
    proc = run_offline(code, tmp_path / "hub")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "OK True" in proc.stdout


def test_a_hub_repo_with_an_image_side_loads_it(tmp_path):
    """The image encoder, IP-Adapter and diffusion prior come from a hub repo too (offline, from its cache)."""
    from _support.image_model import build_image_model

    folder = build_image_model(tmp_path / "model")
    fake_hub_cache(tmp_path / "hub", "someone/tiny-image", folder)
    code = (
        "import numpy as np\n"
        "from minidalle import MiniDallePipeline\n"
        "a = MiniDallePipeline.from_pretrained('someone/tiny-image')\n"
        f"b = MiniDallePipeline.from_pretrained({str(folder)!r})\n"
        "assert a.diffusion_prior is not None and a.image_encoder is not None and a.has_ip_adapter\n"
        "kw = dict(num_inference_steps=3, seed=5, prior='diffusion', prior_num_inference_steps=2)\n"
        "ia, ib = a('a red circle', **kw).images[0], b('a red circle', **kw).images[0]\n"
        "assert np.array_equal(np.asarray(ia), np.asarray(ib))\n"
        "print('OK')\n"
    )
    proc = run_offline(code, tmp_path / "hub")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "OK" in proc.stdout


def test_unknown_hub_id_fails_clearly(tmp_path):
    code = "from minidalle import MiniDallePipeline\nMiniDallePipeline.from_pretrained('nobody/nothing')\n"
    proc = run_offline(code, tmp_path / "empty")
    assert proc.returncode != 0 and "nobody/nothing" in proc.stderr


def test_embedded_model_is_reproducible_from_its_seed(tmp_path):
    """The shipped random model is exactly what `minidalle build-tiny` builds (the tokenizer too)."""
    out = tmp_path / "rebuilt"
    subprocess.run([sys.executable, "-m", "minidalle.cli", "build-tiny", "--out", str(out)], check=True,
                   capture_output=True,
                   timeout=120)
    for part in ("unet/diffusion_pytorch_model", "vae/diffusion_pytorch_model", "text_encoder/model",
                 "prior/diffusion_pytorch_model"):
        a, b = load_file(TINY_RANDOM / f"{part}.safetensors"), load_file(out / f"{part}.safetensors")
        assert a.keys() == b.keys() and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a), part
    tok = "tokenizer/tokenizer.json"
    assert (out / tok).read_text() == (TINY_RANDOM / tok).read_text()


def test_embedded_model_has_the_sd15_layout():
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "prior"):
        assert (TINY_RANDOM / sub).is_dir(), sub
    assert not list(TINY_RANDOM.rglob("*.bin")) and not list(TINY_RANDOM.rglob("*.pt"))  # safetensors only
    pipe = MiniDallePipeline.from_pretrained()
    assert pipe.tokenizer.model_max_length == 77 and pipe.count_tokens("a red circle") == 3


def test_a_saved_folder_names_no_local_path(tmp_path):
    """Loaded from a folder and saved again: no file of the new folder names where the model came from."""
    src = tmp_path / "private-place"
    shutil.copytree(TINY_RANDOM, src)
    out = MiniDallePipeline.from_pretrained(src, device="cpu").save_pretrained(tmp_path / "saved")
    leaks = [p.relative_to(out) for p in out.rglob("*") if p.is_file() and p.suffix in (".json", ".txt")
             and "private-place" in p.read_text()]
    assert not leaks
    again = MiniDallePipeline.from_pretrained(out, device="cpu")  # and it still loads
    assert again.unet.config.sample_size == MiniDallePipeline.from_pretrained(src, device="cpu").unet.config.sample_size
