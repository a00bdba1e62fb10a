"""What the API needs to know about the model, read from its config and tokenizer files (no torch).

The worker is the judge of record (`MiniDallePipeline.check_inputs`); these checks answer early with a 422 so a bad
request never reaches the queue. tests/worker/test_contract.py keeps the copies below equal to the library's.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from functools import lru_cache
from pathlib import Path

# == minidalle.schedulers.SCHEDULERS keys (that module imports diffusers, hence torch)
SCHEDULER_NAMES = ("ddim", "ddpm", "deis", "dpmpp_2m", "dpmpp_2m_karras", "dpmpp_2s", "euler", "euler_ancestral",
                   "heun", "kdpm2", "pndm", "unipc")
# == minidalle.adapters.NAME_RE
ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
ADAPTER_NAME_RE = re.compile(ADAPTER_NAME_PATTERN)


def embedded_model() -> str:
    """== minidalle.DEFAULT_MODEL, found without importing the package (its __init__ imports torch)."""
    spec = importlib.util.find_spec("minidalle")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the minidalle package is not installed")
    models = Path(list(spec.submodule_search_locations)[0]) / "models"
    for name in ("tiny-shapes", "tiny-random"):
        if (models / name / "model_index.json").is_file():
            return str(models / name)
    return str(models / "tiny-random")


def resolve_model(model: str) -> str:
    return model or embedded_model()


def _config(model: str, filename: str) -> dict:
    if os.path.isdir(model):
        return json.loads((Path(model) / filename).read_text())
    from huggingface_hub import hf_hub_download  # hub id: same files, from the local cache or the hub

    return json.loads(Path(hf_hub_download(model, filename)).read_text())


class ModelInfo:
    """Default resolution and prompt token counting for one model."""

    def __init__(self, model: str):
        from transformers import CLIPTokenizer  # the tokenizer class only: no torch

        self.model = model
        unet = _config(model, "unet/config.json")
        vae = _config(model, "vae/config.json")
        # the same arithmetic as diffusers' pipelines: latent size × 2^(VAE down blocks - 1)
        self.default_size = int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
        self.tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
        # the encoder adds start and end tokens to what the prompt uses
        self.max_prompt_tokens = int(self.tokenizer.model_max_length) - 2
        # == minidalle.schedulers.min_inference_steps: PNDM with its warm-up (skip_prk_steps off) needs 4 steps
        sched = _config(model, "scheduler/scheduler_config.json")
        self.default_scheduler_is_pndm = sched.get("_class_name") == "PNDMScheduler"
        self.pndm_min_steps = 1 if sched.get("skip_prk_steps", False) else 4

    def min_steps(self, scheduler: str | None) -> int:
        """Fewest denoising steps `scheduler` (None: the model's own) runs with on this model."""
        pndm = scheduler == "pndm" or (scheduler is None and self.default_scheduler_is_pndm)
        return self.pndm_min_steps if pndm else 1

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False).input_ids)


@lru_cache(maxsize=4)
def get_model_info(model: str) -> ModelInfo:
    return ModelInfo(resolve_model(model))
