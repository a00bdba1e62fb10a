"""LoRA teaches: a short fine-tune binds an invented word to a concept, and the base prompts still work.

Runs on the shipped trained model (minidalle/models/tiny-shapes); skipped while the package has none.
"""

import pytest
import torch

from minidalle.embedded import MODELS_DIR
from minidalle.evaluate import lora_teach

SHAPES_MODEL = MODELS_DIR / "tiny-shapes"


@pytest.mark.skipif(not (SHAPES_MODEL / "model_index.json").is_file(), reason="no trained tiny-shapes model")
def test_lora_teaches_zorb(tmp_path):
    torch.set_num_threads(1)
    r = lora_teach(str(SHAPES_MODEL), tmp_path, n_images=12, train_steps=200, seeds=(0, 1), steps=10,
                   progress=False)
    assert r["concept_accuracy_before"] <= 0.2  # the word means nothing to the base model
    assert r["concept_accuracy_after"] >= 0.8
    for k, drop in r["heldout_drop_points"].items():
        assert drop <= 10, k
