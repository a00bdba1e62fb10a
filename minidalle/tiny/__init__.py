"""The tiny-shapes rig: the world the embedded model is trained and judged in, apart from the product.

`shapes` draws the dataset (coloured shapes on coloured backgrounds, with held-out combinations), `tokenizer` builds
the small CLIP tokenizer, `base_training` trains the tiny-shapes model, `build` makes the random tiny model,
`judge` reads a generated image back into (colour, shape, background), `evaluate` scores a model or an adapter.
The core (`minidalle/*.py`, `minidalle/training/`) imports none of it.
"""
