"""The shapes dataset is deterministic and keeps held-out combinations out of training; the judge reads it."""

import json

import numpy as np
import pytest
from PIL import Image

from minidalle.tiny import shapes
from minidalle.tiny.judge import IOU_THRESHOLD, judge


def test_palette_and_combinations():
    assert len(shapes.COLORS) >= 8 and len(shapes.SHAPES) >= 4
    combos = shapes.all_combos()
    assert len(combos) == len(shapes.COLORS) * len(shapes.SHAPES) * (len(shapes.BACKGROUNDS) - 1)
    assert all(c.shape_color != c.background_color for c in combos)
    held, train = set(shapes.heldout_combos()), set(shapes.train_combos())
    assert not held & train and held | train == set(combos)
    assert 0.12 <= len(held) / len(combos) <= 0.18
    # every held-out combination is a new composition of pairs the model has seen
    pairs = {(c.shape_color, c.shape) for c in train} | {(c.shape, c.background_color) for c in train}
    for c in held:
        assert (c.shape_color, c.shape) in pairs and (c.shape, c.background_color) in pairs


def test_dataset_is_deterministic_and_varied():
    a, ca = shapes.make_dataset(64, seed=3)
    b, cb = shapes.make_dataset(64, seed=3)
    c, _ = shapes.make_dataset(64, seed=4)
    assert np.array_equal(a, b) and ca == cb
    assert not np.array_equal(a, c)
    assert a.shape == (64, 32, 32, 3) and a.dtype == np.uint8
    train = set(shapes.train_combos())
    assert all(x in train for x in ca)
    # sizes and positions vary: the shape's bounding boxes are not all the same
    boxes = set()
    for img in a:
        ys, xs = np.nonzero(np.abs(img.astype(int) - img[0, 0].astype(int)).sum(-1) > 60)
        boxes.add((ys.min(), xs.min(), ys.max(), xs.max()))
    assert len(boxes) > 32


def test_heldout_split_only_draws_heldout():
    _, combos = shapes.make_dataset(200, seed=0, split="heldout")
    assert set(combos) <= set(shapes.heldout_combos())
    with pytest.raises(ValueError, match="split"):
        shapes.make_dataset(4, seed=0, split="test")


@pytest.mark.parametrize("resolution", [32, 64])
def test_judge_is_right_on_dataset_images(resolution):
    images, combos = shapes.make_dataset(300, seed=11, split="heldout", resolution=resolution)
    right = 0
    for img, c in zip(images, combos, strict=True):
        v = judge(img)
        right += (v.shape_color, v.background_color, v.shape) == (c.shape_color, c.background_color, c.shape)
    assert right / len(combos) >= 0.99


def test_judge_is_strict():
    img = shapes.render("red", "circle", "blue", size=16, x=8, y=8, resolution=32)
    v = judge(img)
    assert (v.shape_color, v.background_color, v.shape) == ("red", "blue", "circle") and v.iou > 0.95
    # a plain background: no shape, no colour
    flat = np.full((32, 32, 3), shapes.PALETTE["green"], dtype=np.uint8)
    v = judge(flat)
    assert v.background_color == "green" and v.shape is None and v.shape_color is None
    # a ragged blob of the right colour does not pass as a shape
    rng = np.random.default_rng(0)
    blob = flat.copy()
    blob[6:26, 6:26][rng.random((20, 20)) < 0.5] = shapes.PALETTE["red"]
    v = judge(blob)
    assert v.shape_color == "red" and v.iou < IOU_THRESHOLD and v.shape is None
    with pytest.raises(ValueError, match="image"):
        judge(np.zeros((32, 16, 3), dtype=np.uint8))


def test_write_imagefolder(tmp_path):
    out = shapes.write_imagefolder(tmp_path / "ds", 5, seed=1, split="heldout")
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 5
    captions = {c.caption for c in shapes.heldout_combos()}
    for row in rows:
        assert row["text"] in captions
        img = Image.open(out / row["file_name"])
        assert img.size == (32, 32) and img.mode == "RGB"
        v = judge(img)
        assert row["text"] == shapes.caption(v.shape_color, v.shape, v.background_color)


def test_concept_set():
    concept = shapes.Concept()
    images, captions = shapes.concept_dataset(12, seed=0, concept=concept)
    assert len(images) == 12 and all(concept.word in c for c in captions)
    assert all(shapes.caption(concept.shape_color, concept.shape, "x").split()[1] not in c for c in captions)
    for img in images:
        v = judge(img)
        assert (v.shape_color, v.shape) == (concept.shape_color, concept.shape)
    with pytest.raises(ValueError, match="concept.shape"):
        shapes.concept_dataset(2, seed=0, concept=shapes.Concept(shape="blob"))


def test_shapes_cli(tmp_path, capsys):
    from minidalle.cli.tiny import shapes_main

    assert shapes_main(["--out", str(tmp_path / "c"), "--n", "8", "--split", "concept"]) == 0
    rows = (tmp_path / "c" / "metadata.jsonl").read_text().splitlines()
    assert len(rows) == 8 and all("zorb" in json.loads(r)["text"] for r in rows)
    with pytest.raises(SystemExit):
        shapes_main(["--out", str(tmp_path / "d"), "--n", "-1"])
    err = capsys.readouterr().err.strip()
    assert err.startswith("minidalle: error: argument --n: -1 is not in [1,") and "\n" not in err


def test_captions_read_naturally():
    assert shapes.caption("orange", "circle", "blue") == "an orange circle on a blue background"
    assert shapes.caption("red", "square", "orange") == "a red square on an orange background"
    assert shapes.Concept().caption("white") == "a zorb on a white background"
