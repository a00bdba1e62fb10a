"""The cost model: a step is batch · (a·P + b·P²) seconds for P latent tokens, fitted from measured steps."""

from __future__ import annotations

import pytest

from jobs import cost


def test_two_sizes_recover_the_linear_and_quadratic_terms():
    a, b = 2e-4, 3e-8
    samples = [(p, batch, batch * (a * p + b * p * p)) for p in (64, 256, 4096) for batch in (1, 2)]
    m = cost.fit(samples, native_tokens=64, default_step_s=1.0)
    assert m.measured and m.a == pytest.approx(a, rel=1e-6) and m.b == pytest.approx(b, rel=1e-6)
    # attention makes big images dearer than their pixels alone: 4x the side is more than 16x the time here
    assert m.step_s(4096, 1) / m.step_s(256, 1) > 16


def test_one_measured_size_scales_the_prior_through_it():
    m = cost.fit([(256, 2, 0.2), (256, 2, 0.22)], native_tokens=256, default_step_s=9.0)
    assert m.measured and m.step_s(256, 2) == pytest.approx(0.21)
    assert m.step_s(1024, 1) / m.step_s(256, 1) == pytest.approx(0.7 * 4 + 0.3 * 16)


def test_no_measurement_assumes_the_default_at_the_native_size():
    m = cost.fit([], native_tokens=4096, default_step_s=0.5)
    assert not m.measured and m.step_s(4096, 1) == pytest.approx(0.5)


def test_noisy_samples_never_give_a_negative_term():
    m = cost.fit([(64, 1, 0.010), (128, 1, 0.009), (256, 1, 0.011)], native_tokens=64, default_step_s=1)
    assert m.a >= 0 and m.b >= 0 and m.step_s(256, 1) > 0


def test_estimates_read_what_workers_recorded(store):
    model = cost.CostModel(store.r, "m", native_size=32, vae_factor=4, default_step_s=1.0)
    before = model.generate_s(width=32, height=32, steps=10, images=1, guidance_scale=7.5)
    assert before == pytest.approx(1.0 * 2 * 11)  # default 1 s per image-step, guidance doubles the batch
    for _ in range(cost.KEEP + 10):
        cost.record(store.r, "m", "generate", tokens=64, batch=2, step_s=0.02)
    cost._FITS.clear()  # fits are reused for a couple of seconds
    assert store.r.llen(cost.samples_key("m", "generate")) == cost.KEEP
    assert model.generate_s(width=32, height=32, steps=10, images=1, guidance_scale=7.5) == pytest.approx(0.22)
    # a fine-tune before any training step was measured: three forward passes per sample
    train = model.finetune_s(resolution=32, steps=100, batch_size=2, grad_accum=1, validation_prompts=0,
                             checkpoints=0)
    assert train == pytest.approx(100 * 3 * 0.02)
