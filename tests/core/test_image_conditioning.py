"""The image side: IP-Adapter files that stock diffusers loads, our attach path = diffusers' path, the image encoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer, CLIPVisionConfig, CLIPVisionModelWithProjection

from minidalle import image_conditioning as ic
from minidalle.errors import InvalidInput

EMBED_DIM = 16  # any CLIP image-embedding width: the projection maps it to the UNet's cross-attention width


def _sd(model_dir) -> StableDiffusionPipeline:
    """Stock diffusers over the tiny model's components, each pipeline with a UNet of its own."""
    sd = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(model_dir, subfolder="vae"),
        text_encoder=CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer"),
        unet=UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet"),
        scheduler=DDIMScheduler.from_pretrained(model_dir, subfolder="scheduler"),
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)
    return sd


def _trained_looking_state(unet, seed: int = 0) -> dict[str, torch.Tensor]:
    """A fresh state moved away from its init, so that a loader that mixed keys up could not pass by luck."""
    g = torch.Generator().manual_seed(seed)
    state = ic.new_ip_adapter_state(unet, EMBED_DIM, generator=g)
    return {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in state.items()}


def _generate(sd, image_embeds: torch.Tensor | None, seed: int = 0) -> np.ndarray:
    """Guidance 3 with diffusers' convention for given embeds: [unconditional (zeros); conditional]."""
    pe = torch.randn(1, 77, sd.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(7))
    kw = dict(prompt_embeds=pe, negative_prompt_embeds=torch.zeros_like(pe), num_inference_steps=3,
              guidance_scale=3.0, generator=torch.Generator().manual_seed(seed), output_type="np")
    if image_embeds is not None:
        kw["ip_adapter_image_embeds"] = [torch.cat([torch.zeros_like(image_embeds), image_embeds])[:, None]]
    return sd(**kw).images  # (1, 32, 32, 3) floats in [0, 1]


@pytest.fixture(scope="module")
def ip_folder(tmp_path_factory, tiny_model_dir):
    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    state = _trained_looking_state(unet)
    folder = tmp_path_factory.mktemp("ip")
    ic.save_ip_adapter(state, folder)
    return folder, state


def test_new_state_is_ip_adapters_own_init(tiny_model_dir):
    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    a = ic.new_ip_adapter_state(unet, EMBED_DIM, generator=torch.Generator().manual_seed(1))
    crosses = ic._cross_attentions(unet)
    assert [k for k, _ in crosses] == [1, 3, 5, 7]  # the tiny UNet has 4 cross-attentions: diffusers' odd ids
    for key_id, name in crosses:
        attn = unet.get_submodule(name.removesuffix(".processor"))
        assert torch.equal(a[f"ip_adapter.{key_id}.to_k_ip.weight"], attn.to_k.weight)
        assert torch.equal(a[f"ip_adapter.{key_id}.to_v_ip.weight"], attn.to_v.weight)
    assert a["image_proj.proj.weight"].shape == (4 * 32, EMBED_DIM)
    assert a["image_proj.proj.weight"].abs().max() <= 1 / EMBED_DIM**0.5
    assert torch.equal(a["image_proj.norm.weight"], torch.ones(32))
    b = ic.new_ip_adapter_state(unet, EMBED_DIM, generator=torch.Generator().manual_seed(1))
    c = ic.new_ip_adapter_state(unet, EMBED_DIM, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a["image_proj.proj.weight"], b["image_proj.proj.weight"])
    assert not torch.equal(a["image_proj.proj.weight"], c["image_proj.proj.weight"])
    with pytest.raises(InvalidInput, match="^num_tokens"):
        ic.new_ip_adapter_state(unet, EMBED_DIM, num_tokens=8)


def test_stock_load_ip_adapter_gives_the_same_image_as_attach(ip_folder, tiny_model_dir):
    folder, state = ip_folder
    stock = _sd(tiny_model_dir)
    stock.load_ip_adapter(str(folder), subfolder="ip_adapter", weight_name="ip-adapter.safetensors",
                          image_encoder_folder=None)
    ours = _sd(tiny_model_dir)
    ic.attach_ip_adapter(ours.unet, state)
    embeds = torch.randn(1, EMBED_DIM, generator=torch.Generator().manual_seed(3))
    a, b = _generate(stock, embeds), _generate(ours, embeds)
    assert np.array_equal(a, b)
    # and the image tokens do something: another embedding, another image
    other = _generate(ours, torch.randn(1, EMBED_DIM, generator=torch.Generator().manual_seed(4)))
    assert np.abs(other - a).max() > 1e-2
    # what stock diffusers loaded reads back as the very tensors we saved
    back = ic.ip_adapter_state(stock.unet)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


def test_scale_zero_is_the_image_without_ip_tokens(ip_folder, tiny_model_dir):
    folder, _ = ip_folder
    plain = _generate(_sd(tiny_model_dir), None)
    sd = _sd(tiny_model_dir)
    sd.load_ip_adapter(str(folder), subfolder="ip_adapter", weight_name="ip-adapter.safetensors",
                       image_encoder_folder=None)
    embeds = torch.randn(1, EMBED_DIM, generator=torch.Generator().manual_seed(3))
    assert np.abs(_generate(sd, embeds) - plain).max() > 1e-2
    sd.set_ip_adapter_scale(0.0)
    assert np.abs(_generate(sd, embeds) - plain).max() <= 1e-6


def test_state_roundtrip_parameters_and_fit(ip_folder, tiny_model_dir):
    folder, state = ip_folder
    assert ic.load_ip_adapter_state(folder).keys() == state.keys()
    assert all(torch.equal(ic.load_ip_adapter_state(folder)[k], state[k]) for k in state)
    assert ic.load_ip_adapter_state(tiny_model_dir) is None
    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    with pytest.raises(ValueError, match="no IP-Adapter"):
        ic.ip_adapter_parameters(unet)
    ic.attach_ip_adapter(unet, state)
    params = ic.ip_adapter_parameters(unet)
    assert sum(p.numel() for p in params) == sum(v.numel() for v in state.values())
    assert not any(p.requires_grad for p in params)  # frozen like the rest, until a trainer asks
    with torch.no_grad():
        params[0].add_(1.0)  # the parameters are the live weights: ip_adapter_state sees the change
    assert torch.equal(ic.ip_adapter_state(unet)["image_proj.proj.weight"], state["image_proj.proj.weight"] + 1)
    # an IP-Adapter for a UNet of another width is refused before diffusers sees it
    wide = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), norm_num_groups=8,
                                cross_attention_dim=48, attention_head_dim=8, layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    with pytest.raises(InvalidInput, match=r"^ip_adapter: image_proj.proj.weight must be \(192, P\)"):
        ic.attach_ip_adapter(wide, state)
    with pytest.raises(InvalidInput, match=r"^ip_adapter: ip_adapter.3.to_v_ip.weight: expected"):
        ic.attach_ip_adapter(UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet"),
                             {k: v for k, v in state.items() if k != "ip_adapter.3.to_v_ip.weight"})


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(
        image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, projection_dim=EMBED_DIM)).eval()
    return model, ic.new_image_processor(32)


def _images(n: int, size: int = 32) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def test_encode_images_shape_and_determinism(encoder, tmp_path):
    model, processor = encoder
    a, b = _images(2)
    out = ic.encode_images(model, processor, [a, b, a])
    assert out.shape == (3, EMBED_DIM) and not out.requires_grad
    assert torch.allclose(out[0], out[2], atol=1e-6) and not torch.allclose(out[0], out[1], atol=1e-3)
    assert torch.allclose(ic.encode_images(model, processor, [b])[0], out[1], atol=1e-5)  # batch-independent
    # a bigger picture is resized to the encoder's size, not refused
    assert ic.encode_images(model, processor, _images(1, size=64)).shape == (1, EMBED_DIM)
    ic.save_image_encoder(model, processor, tmp_path)
    assert (tmp_path / "image_encoder" / "model.safetensors").is_file()
    assert (tmp_path / "feature_extractor" / "preprocessor_config.json").is_file()
    loaded = ic.load_image_encoder(tmp_path, torch_dtype=torch.float32)
    assert loaded is not None
    assert torch.equal(ic.encode_images(*loaded, [a, b, a]), out)
    with pytest.raises(InvalidInput, match="^images"):
        ic.encode_images(model, processor, [a.convert("L")])
    with pytest.raises(InvalidInput, match="^images"):
        ic.encode_images(model, processor, [])


def test_load_image_encoder_is_none_without_image_encoder(tiny_model_dir):
    assert ic.load_image_encoder(tiny_model_dir, torch_dtype=torch.float32) is None
