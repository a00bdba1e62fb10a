"""Generation requests: input checks name the bad field, the step callback, cancellation, reproducibility."""

from __future__ import annotations

import numpy as np
import pytest

from minidalle import Cancelled

GOOD = dict(num_inference_steps=2, seed=0)


@pytest.mark.parametrize("kwargs, field", [
    (dict(prompt=""), None),  # an empty prompt is allowed (unconditional)
    (dict(prompt=3), "prompt"),
    (dict(prompt=[]), "prompt"),
    (dict(prompt=["ok", 4]), "prompt"),
    (dict(prompt="x", negative_prompt=5), "negative_prompt"),
    (dict(prompt=["a", "b"], negative_prompt=["only one"]), "negative_prompt"),
    (dict(prompt="x", num_inference_steps=0), "num_inference_steps"),
    (dict(prompt="x", num_inference_steps=2.5), "num_inference_steps"),
    (dict(prompt="x", guidance_scale=-1.0), "guidance_scale"),
    (dict(prompt="x", guidance_scale="high"), "guidance_scale"),
    (dict(prompt="x", width=30), "width"),
    (dict(prompt="x", height=0), "height"),
    (dict(prompt="x", num_images_per_prompt=0), "num_images_per_prompt"),
    (dict(prompt="x", scheduler="nope"), "scheduler"),
    (dict(prompt="x", seed=-1), "seed"),
    (dict(prompt="x", seed="7"), "seed"),
    (dict(prompt="x", adapters=[("a",)]), "adapters"),
    (dict(prompt="x", adapters=[("a", 99.0)]), "adapters"),
    (dict(prompt="x", adapters=[("a", float("nan"))]), "adapters"),
    (dict(prompt="x", adapters=[("a", 1.0), ("a", 0.5)]), "adapters"),  # one adapter, two scales: which?
    (dict(prompt="x", guidance_scale=float("nan")), "guidance_scale"),
    # PNDM from a DDIM-style config keeps its Runge-Kutta warm-up: 1-3 steps used to fail inside diffusers
    (dict(prompt="x", scheduler="pndm", num_inference_steps=3), "num_inference_steps"),
    (dict(prompt="x", scheduler="pndm", num_inference_steps=4), None),
])
def test_check_inputs_names_the_field(tiny_pipe, kwargs, field):
    kwargs = dict(kwargs)
    prompt = kwargs.pop("prompt")
    negative = kwargs.pop("negative_prompt", None)
    if field is None:
        tiny_pipe.check_inputs(prompt, negative, **kwargs)
        return
    with pytest.raises(ValueError, match=rf"^{field}\b"):
        tiny_pipe.check_inputs(prompt, negative, **kwargs)
    with pytest.raises(ValueError, match=rf"^{field}\b"):  # __call__ checks before doing anything
        tiny_pipe(prompt, negative, **{**GOOD, **kwargs})


def test_too_long_prompt_says_the_token_count(tiny_pipe):
    prompt = "red " * 200
    n = tiny_pipe.count_tokens(prompt)
    assert n > tiny_pipe.max_prompt_tokens
    with pytest.raises(ValueError, match=rf"^prompt: {n} tokens.*at most {tiny_pipe.max_prompt_tokens}"):
        tiny_pipe(prompt, **GOOD)
    with pytest.raises(ValueError, match=rf"^negative_prompt: {n} tokens"):
        tiny_pipe("ok", negative_prompt=prompt, **GOOD)
    # the longest allowed prompt works
    words = ["red"] * tiny_pipe.max_prompt_tokens
    assert tiny_pipe.count_tokens(" ".join(words)) == tiny_pipe.max_prompt_tokens
    tiny_pipe.check_inputs(" ".join(words))


@pytest.mark.parametrize("scheduler, steps", [("ddim", 5), ("euler_ancestral", 4), ("dpmpp_2m", 3)])
def test_callback_sees_every_step_in_order(tiny_pipe, scheduler, steps):
    calls = []
    tiny_pipe("a cat", num_inference_steps=steps, seed=1, scheduler=scheduler,
              callback=lambda step, total: calls.append((step, total)))
    assert calls == [(i, steps) for i in range(1, steps + 1)]


def test_cancelled_stops_generation(tiny_pipe):
    calls = []

    def cb(step, total):
        calls.append(step)
        if step == 2:
            raise Cancelled()

    with pytest.raises(Cancelled):
        tiny_pipe("a cat", num_inference_steps=10, seed=1, callback=cb)
    assert calls == [1, 2]  # no step ran after the cancel
    assert len(tiny_pipe("a cat", num_inference_steps=2, seed=1).images) == 1  # the pipeline still works


def _assert_batch_equivalent(alone: np.ndarray, in_batch: np.ndarray, i: int) -> None:
    """Same image up to float rounding: CPU kernels may round a batch of 6 differently from a batch of 2.

    That shows as one grey level on a few pixels; a wrong seed, prompt or setting differs almost everywhere.
    """
    diff = np.abs(alone.astype(int) - in_batch.astype(int))
    assert diff.max() <= 2 and (diff > 0).mean() < 0.05, (i, diff.max(), (diff > 0).mean())


def test_metadata_of_each_image_reproduces_it_alone(tiny_pipe, as_array):
    out = tiny_pipe("a red circle", num_inference_steps=3, guidance_scale=6.0, num_images_per_prompt=3, seed=100)
    assert [m["seed"] for m in out.metadata] == [100, 101, 102]
    for i, meta in enumerate(out.metadata):
        alone = tiny_pipe(meta["prompt"], num_inference_steps=meta["steps"], guidance_scale=meta["guidance_scale"],
                          width=meta["width"], height=meta["height"], seed=meta["seed"], scheduler=meta["scheduler"])
        _assert_batch_equivalent(as_array(alone.images), as_array(out.images[i:i + 1]), i)
    assert len({as_array([im]).tobytes() for im in out.images}) == 3  # three different images
    with pytest.raises(AssertionError):  # the tolerance is tight enough to tell neighbouring seeds apart
        _assert_batch_equivalent(as_array(out.images[0:1]), as_array(out.images[1:2]), -1)


def test_metadata_reproduces_images_of_a_mixed_batch(tiny_pipe, as_array):
    out = tiny_pipe(["a red circle", "a blue square"], negative_prompt=["gray", ""], num_inference_steps=3,
                    guidance_scale=6.0, num_images_per_prompt=2, seed=100, scheduler="euler_ancestral")
    assert [m["seed"] for m in out.metadata] == [100, 101, 102, 103]
    assert [m["prompt"] for m in out.metadata] == ["a red circle"] * 2 + ["a blue square"] * 2
    assert [m["negative_prompt"] for m in out.metadata] == ["gray"] * 2 + [""] * 2
    for i, meta in enumerate(out.metadata):
        alone = tiny_pipe(meta["prompt"], meta["negative_prompt"] or None, num_inference_steps=meta["steps"],
                          guidance_scale=meta["guidance_scale"], width=meta["width"], height=meta["height"],
                          seed=meta["seed"], scheduler=meta["scheduler"])
        _assert_batch_equivalent(as_array(alone.images), as_array(out.images[i:i + 1]), i)


def test_string_negative_prompt_applies_to_every_prompt(tiny_pipe, as_array):
    # diffusers' convention, and what __call__ does: one negative string for a list of prompts
    kw = dict(num_inference_steps=2, seed=3, guidance_scale=6.0)
    out = tiny_pipe(["a red circle", "a blue square"], negative_prompt="gray", **kw)
    assert [m["negative_prompt"] for m in out.metadata] == ["gray", "gray"]
    listed = tiny_pipe(["a red circle", "a blue square"], negative_prompt=["gray", "gray"], **kw)
    assert np.array_equal(as_array(out.images), as_array(listed.images))


def test_non_default_size(tiny_pipe):
    out = tiny_pipe("a tree", width=48, height=40, **GOOD)
    assert out.images[0].size == (48, 40)
    assert (out.metadata[0]["width"], out.metadata[0]["height"]) == (48, 40)


def test_unseeded_runs_record_their_seed(tiny_pipe, as_array):
    out = tiny_pipe("a star", num_inference_steps=2)
    seed = out.metadata[0]["seed"]
    assert isinstance(seed, int)
    again = tiny_pipe("a star", num_inference_steps=2, seed=seed)
    assert np.array_equal(as_array(again.images), as_array(out.images))


def _pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_a_batch_makes_what_each_request_makes_alone(tiny_pipe):
    """generate_many: several requests, one denoising loop; every image as its request makes it alone (its own
    prompt, negative prompt, seed and image count), so a service may batch without changing anyone's images."""
    shared = dict(num_inference_steps=4, guidance_scale=7.5)
    requests = [dict(prompt="a red circle", seed=11, num_images_per_prompt=2),
                dict(prompt="a blue square", negative_prompt="green", seed=5),
                dict(prompt=["a green triangle", "a yellow circle"], seed=99)]
    batched = tiny_pipe.generate_many(requests, **shared)
    assert [len(o.images) for o in batched] == [2, 1, 2]
    worst = 0
    for request, out in zip(requests, batched, strict=True):
        alone = tiny_pipe(**request, **shared)
        assert out.metadata == alone.metadata  # same seeds, prompts, indices
        for a, b in zip(out.images, alone.images, strict=True):
            worst = max(worst, int(np.abs(_pixels(a) - _pixels(b)).max()))
    print(f"max pixel difference batched vs alone: {worst}/255")
    assert worst <= 1
    assert batched[1].metadata[0]["negative_prompt"] == "green" and batched[0].metadata[1]["seed"] == 12


def test_a_batch_refuses_requests_that_disagree_on_what_it_shares(tiny_pipe):
    with pytest.raises(ValueError, match=r"^num_inference_steps: request 1 asks for 3"):
        tiny_pipe.generate_many([dict(prompt="a", num_inference_steps=2), dict(prompt="b", num_inference_steps=3)])
    with pytest.raises(ValueError, match=r"^guidance_scale\b"):
        tiny_pipe.generate_many([dict(prompt="a", guidance_scale=2.0)], guidance_scale=3.0, num_inference_steps=2)
    with pytest.raises(ValueError, match=r"^prompt\b"):  # each request's own input is checked before any work
        tiny_pipe.generate_many([dict(prompt="fine"), dict(prompt=7)], num_inference_steps=2)
    assert tiny_pipe.generate_many([]) == []
