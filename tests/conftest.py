"""Shared fixtures: the embedded tiny model (loaded once), fresh pipelines, and synthetic adapter folders.

Tests that load adapters or change the prior use their own pipeline (`fresh_pipe`), never `tiny_pipe`, so the
session pipeline stays the plain base model for everybody.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from minidalle.cli.commands import quiet_libraries

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `_support`
from _support.adapters import build_adapter

REPO_ROOT = Path(__file__).resolve().parents[1]

quiet_libraries()  # the CLI's own setting: no library notices or weight-loading bars in test output
# The test machine's cores are shared: with several busy processes, torch's second thread spins and tiny-model
# generation gets 5-10x slower. One thread is also what the CLI subprocesses get (OMP_NUM_THREADS in run_cli).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The embedded random tiny model (identity prior): the model every core test runs on."""
    from minidalle.embedded import TINY_RANDOM

    return Path(TINY_RANDOM)


@pytest.fixture(scope="session")
def tiny_pipe(tiny_model_dir):
    """One shared pipeline, loaded through `from_pretrained` like any real model. Treat it as read-only."""
    from minidalle import MiniDallePipeline

    return MiniDallePipeline.from_pretrained(tiny_model_dir, device="cpu")


@pytest.fixture
def fresh_pipe(tiny_model_dir):
    """A pipeline of its own (0.3 s to load), for tests that load adapters or change weights."""
    from minidalle import MiniDallePipeline

    def make(**kwargs):
        return MiniDallePipeline.from_pretrained(tiny_model_dir, device="cpu", **kwargs)

    return make


def images_array(images) -> np.ndarray:
    return np.stack([np.asarray(im) for im in images])


@pytest.fixture
def as_array() -> Callable:
    return images_array


@pytest.fixture
def make_adapter(tiny_pipe, tmp_path) -> Callable[..., Path]:
    """`make_adapter(name, seed=…, train_prior=True, unet_config=…)` → adapter folder for the tiny model."""

    def make(name: str, *, seed: int = 0, train_prior: bool = True, unet_config=None, prior_config=None,
             **kwargs) -> Path:
        unet_config = unet_config if unet_config is not None else tiny_pipe.unet.config
        if prior_config is None and train_prior:
            prior_config = dict(tiny_pipe.prior.config)
        return build_adapter(tmp_path / "adapters" / name, unet_config=unet_config,
                             prior_config=prior_config if train_prior else None, seed=seed,
                             meta={"base_model_hash": tiny_pipe.model_hash}, **kwargs)

    return make


def zorb_dataset(folder: Path, n: int, size: tuple[int, int] = (32, 32)) -> Path:
    """`n` random images of `size` (height, width) with kohya captions "a zorb number i"."""
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a zorb number {i}")
    return folder


@pytest.fixture
def zorb(tmp_path) -> Callable[..., Path]:
    """`zorb(n, size=(32, 32))` → a `zorb_dataset` folder (tmp_path/ds)."""
    return lambda n, size=(32, 32): zorb_dataset(tmp_path / "ds", n, size)


def run_cli(*args: str, cwd: str | os.PathLike | None = None, timeout: float = 120):
    """Run `python -m minidalle.cli ARGS` in a subprocess (the real entry point, a fresh interpreter)."""
    import subprocess

    path = os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    return subprocess.run([sys.executable, "-m", "minidalle.cli", *args], capture_output=True, text=True,
                          cwd=cwd or REPO_ROOT, env=env, timeout=timeout)


@pytest.fixture
def cli_run():
    """`cli_run("generate", …)` → CompletedProcess of `python -m minidalle.cli …`."""
    return run_cli
