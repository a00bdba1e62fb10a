"""The evaluation scores what the judge reads: a pipeline that draws the prompt scores 1, a wrong one scores 0."""

import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from minidalle.cli.tiny import eval_main
from minidalle.tiny import shapes
from minidalle.tiny.evaluate import evaluate, evaluate_concept, format_table, judge_dataset_accuracy

CAPTION = re.compile(r"an? (\w+) (\w+) on an? (\w+) background")
CONCEPT = re.compile(r"a zorb on an? (\w+) background")


class DrawingPipe:
    """Draws exactly what the prompt says (optionally with the shape colour swapped), at a seeded position."""

    model_id = "drawing"

    def __init__(self, swap_color: str | None = None, shape: str | None = None):
        self.swap_color, self.shape, self.calls = swap_color, shape, 0

    def __call__(self, prompts, negative_prompt=None, *, num_inference_steps, guidance_scale, generator, adapters):
        self.calls += 1
        images = []
        for p, g in zip(prompts, generator, strict=True):
            if m := CONCEPT.fullmatch(p):  # "a zorb on a X background": the concept is an orange cross
                color, shape, bg = "orange", "cross", m.group(1)
            else:
                color, shape, bg = CAPTION.fullmatch(p).groups()
            color = self.swap_color if self.swap_color and self.swap_color != bg else color
            rng = np.random.default_rng(g.initial_seed())
            img = shapes.sample(shapes.Combo(color, self.shape or shape, bg), rng, 32)
            images.append(Image.fromarray(img))
        return SimpleNamespace(images=images)


def test_perfect_pipeline_scores_one():
    r = evaluate(DrawingPipe(), seeds=(0, 1), progress=False)
    assert r["n_images"] == 2 * len(shapes.heldout_combos()) and r["n_prompts"] == len(shapes.heldout_combos())
    assert r["shape_color_accuracy"] == r["background_color_accuracy"] == r["shape_accuracy"] == 1.0
    assert "shape colour" in format_table({"x": r})


def test_wrong_pipelines_score_low():
    r = evaluate(DrawingPipe(shape="square"), seeds=(0,), progress=False)
    n_square = sum(c.shape == "square" for c in shapes.heldout_combos())
    assert r["shape_accuracy"] == pytest.approx(n_square / len(shapes.heldout_combos()))
    assert r["shape_color_accuracy"] == 1.0
    r = evaluate(DrawingPipe(swap_color="white"), seeds=(0,), progress=False)
    held = shapes.heldout_combos()
    kept = sum("white" in (c.shape_color, c.background_color) for c in held)  # no swap possible: still right
    assert r["shape_color_accuracy"] == pytest.approx(kept / len(held)) and r["background_color_accuracy"] == 1.0


def test_concept_scoring():
    assert evaluate_concept(DrawingPipe(), seeds=(0,), progress=False)["concept_accuracy"] == 1.0
    assert evaluate_concept(DrawingPipe(shape="circle"), seeds=(0,), progress=False)["concept_accuracy"] == 0.0


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match="seeds"):
        evaluate(DrawingPipe(), seeds=())
    with pytest.raises(ValueError, match="steps"):
        evaluate(DrawingPipe(), steps=0)
    with pytest.raises(ValueError, match="model"):
        evaluate(42)


def test_judge_on_real_images():
    assert judge_dataset_accuracy(300)["all_accuracy"] >= 0.99


def test_eval_cli_json_on_random_model(capsys):
    assert eval_main(["--json", "--seeds", "0", "--steps", "2"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    r = json.loads(line)
    for k in ("shape_color_accuracy", "background_color_accuracy", "shape_accuracy"):
        assert 0.0 <= r[k] <= 1.0
    assert r["n_images"] == len(shapes.heldout_combos()) and r["judge_real_accuracy"] >= 0.99
