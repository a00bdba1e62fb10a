"""The fast path's switches (`enable_fast_path`): the images stay what the plain pipeline makes, fused q/k/v and a
compiled UNet are used only while no LoRA is active, so adapters and training keep working over them."""

from __future__ import annotations

import numpy as np


def _worst(a, b) -> int:
    return max(int(np.abs(np.asarray(x, dtype=np.int16) - np.asarray(y, dtype=np.int16)).max()) for x, y in zip(a, b,
                                                                                                               strict=True))


def _fused(pipe) -> bool:
    return any(type(p).__name__.startswith("Fused") for p in pipe.unet.attn_processors.values())


REQUEST = dict(num_inference_steps=4, seed=3, num_images_per_prompt=2)


def test_fast_path_keeps_the_images_and_steps_aside_for_lora(tiny_pipe, fresh_pipe, make_adapter):
    fast = fresh_pipe()
    on = fast.enable_fast_path(channels_last=True, fuse_qkv=True, vae_slicing=True, vae_tiling=True)
    assert on == dict(channels_last=True, fuse_qkv=True, vae_slicing=True, vae_tiling=True, compile_unet=False)
    plain = tiny_pipe("a red circle", **REQUEST).images
    made = fast("a red circle", **REQUEST).images
    assert _fused(fast)
    worst = _worst(plain, made)
    print(f"fast path vs plain: max pixel difference {worst}/255")
    assert worst <= 1

    # an adapter's request runs the separate projections its LoRA sits on: exactly what the plain pipeline makes
    folder = make_adapter("style", seed=4, train_prior=False)
    ref = fresh_pipe()
    ref.load_adapter(folder)
    with_lora = ref("a red circle", adapters=[("style", 1.0)], **REQUEST).images
    assert _worst(with_lora, plain) > 10  # the adapter matters
    fast.load_adapter(folder)
    assert _worst(fast("a red circle", adapters=[("style", 1.0)], **REQUEST).images, with_lora) <= 1
    assert not _fused(fast)
    assert _worst(fast("a red circle", **REQUEST).images, plain) <= 1  # and back to fused without it
    assert _fused(fast)


def test_training_over_a_fast_pipeline_trains_the_lora(fresh_pipe, zorb, tmp_path):
    """Training runs the separate projections: the adapter is bit for bit the one a plain pipeline trains."""
    import torch
    from safetensors.torch import load_file

    from minidalle.training import TrainConfig, train

    dataset = zorb(4)
    adapters = []
    for name, fast in (("plain", False), ("fast", True)):
        pipe = fresh_pipe()
        if fast:
            pipe.enable_fast_path(fuse_qkv=True)
            pipe("warm", num_inference_steps=2, seed=0)
            assert _fused(pipe)
        config = TrainConfig(dataset_dir=str(dataset), output_dir=str(tmp_path / name), work_dir=str(tmp_path / "w"
                             / name), steps=3, checkpoint_every=0, seed=1)
        result = train(config, pipeline=pipe)
        assert not _fused(pipe)  # the LoRA's to_q/to_k/to_v were in the forward pass
        adapters.append(load_file(result.adapter_dir / "adapter.safetensors"))
    assert adapters[0].keys() == adapters[1].keys()
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])
    assert any(float(v.abs().max()) > 0 for k, v in adapters[1].items() if "lora_B" in k)  # it learned (B starts 0)


def test_a_compiled_unet_serves_plain_requests_and_adapters_run_eager(tiny_pipe, fresh_pipe, make_adapter):
    """torch.compile on CPU (inductor): slow to compile once (~1 min here), kept to the smallest request."""
    pipe = fresh_pipe()
    assert pipe.enable_fast_path(compile_unet=True, compile_mode="default")["compile_unet"]
    request = dict(num_inference_steps=2, seed=5)
    plain = tiny_pipe("a blue square", **request).images
    assert _worst(pipe("a blue square", **request).images, plain) <= 1
    assert pipe._sd.unet is pipe._compiled_unet
    folder = make_adapter("style", seed=4, train_prior=False)
    ref = fresh_pipe()
    ref.load_adapter(folder)
    pipe.load_adapter(folder)
    want = ref("a blue square", adapters=[("style", 1.0)], **request).images
    assert _worst(pipe("a blue square", adapters=[("style", 1.0)], **request).images, want) <= 1
    assert pipe._sd.unet is pipe.unet  # eager with an adapter: no recompiles per adapter or scale
