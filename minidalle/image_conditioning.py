"""The image side: a CLIP image encoder, and an IP-Adapter that feeds a CLIP image embedding to the UNet.

Where the files live in a model folder (where diffusers' `StableDiffusionPipeline` keeps them):

    image_encoder/                      transformers `CLIPVisionModelWithProjection` (safetensors)
    feature_extractor/                  its `CLIPImageProcessor` config
    ip_adapter/ip-adapter.safetensors   the IP-Adapter, in the flat layout stock diffusers reads with
                                        `pipe.load_ip_adapter(folder, subfolder="ip_adapter",
                                        weight_name="ip-adapter.safetensors", image_encoder_folder=None)`:
        image_proj.proj.{weight,bias}        (4·D, P), (4·D,)   embedding → 4 tokens of the cross-attention width D
        image_proj.norm.{weight,bias}        (D,)               LayerNorm over each token
        ip_adapter.{k}.to_{k,v}_ip.weight    (C, D)             one pair per cross-attention, k = 1, 3, 5, … in
                                                                `unet.attn_processors` order (diffusers' numbering)

The UNet side is diffusers' own code (`unet._load_ip_adapter_weights`, `IPAdapterAttnProcessor2_0`): what trains here
is exactly what `load_ip_adapter` + `pipe(ip_adapter_image_embeds=[…])` runs later.

With guidance, diffusers takes `ip_adapter_image_embeds=[torch.stack([zeros, e])[:, None]]` (unconditional branch
first) and repeats it for every prompt of the call: a (2B, 1, P) tensor for B prompts is NOT one image per prompt
(each prompt would attend to the 4·B tokens of all B images, silently). One image per call, or a batch-aware
`prepare_ip_adapter_image_embeds`, gives each prompt its own image.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPImageProcessorPil, CLIPVisionModelWithProjection

from minidalle.errors import InvalidInput

IMAGE_ENCODER = "image_encoder"
FEATURE_EXTRACTOR = "feature_extractor"
IP_ADAPTER = "ip_adapter"
IP_ADAPTER_WEIGHTS = "ip-adapter.safetensors"
# diffusers' loader reads an `image_proj.proj.weight` projection as exactly 4 tokens (it hard-codes the number and
# derives D from the weight's rows / 4), so any other count would load as the wrong shapes.
NUM_TOKENS = 4

# The PIL backend always: transformers' `CLIPImageProcessor` switches to torchvision when it is installed, and the
# pixels the encoder sees must not depend on what else is installed. The saved config is an ordinary
# "CLIPImageProcessor" one, which either backend reads.
ImageProcessor = CLIPImageProcessorPil


# ----------------------------------------------------------------------------------------------------------------
# the image encoder
def new_image_processor(image_size: int) -> ImageProcessor:
    """CLIP's preprocessing at the encoder's size: resize the short side, centre-crop, CLIP mean/std."""
    return ImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})


def load_image_encoder(model: str | os.PathLike, *, torch_dtype: torch.dtype | None = None,
                       ) -> tuple[CLIPVisionModelWithProjection, ImageProcessor] | None:
    """`image_encoder/` + `feature_extractor/` of a folder or hub id; None when the model has no image encoder.
    Safetensors only. Without `feature_extractor/`, CLIP's preprocessing at the encoder's size (what diffusers does)."""
    model = str(model)
    if os.path.isdir(model):
        if not (Path(model) / IMAGE_ENCODER / "config.json").is_file():
            return None
        return _load_image_encoder(model, torch_dtype)
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return _load_image_encoder(model, torch_dtype)
    except (EntryNotFoundError, OSError) as e:
        if isinstance(e, EntryNotFoundError) or "does not appear to have" in str(e) or "no file named" in str(e):
            return None  # a stock SD repo has no image encoder
        raise


def _load_image_encoder(model: str, torch_dtype: torch.dtype | None):
    encoder = CLIPVisionModelWithProjection.from_pretrained(model, subfolder=IMAGE_ENCODER, use_safetensors=True,
                                                            dtype=torch_dtype or torch.float32)
    encoder.requires_grad_(False).eval()
    try:
        processor = ImageProcessor.from_pretrained(model, subfolder=FEATURE_EXTRACTOR)
    except OSError:
        processor = new_image_processor(encoder.config.image_size)
    return encoder, processor


def save_image_encoder(encoder: CLIPVisionModelWithProjection, processor: ImageProcessor,
                       model_dir: str | os.PathLike) -> Path:
    """Write `image_encoder/` (safetensors) and `feature_extractor/` into a model folder."""
    model_dir = Path(model_dir)
    encoder.save_pretrained(model_dir / IMAGE_ENCODER)
    processor.save_pretrained(model_dir / FEATURE_EXTRACTOR)
    return model_dir


@torch.no_grad()
def encode_images(encoder: CLIPVisionModelWithProjection, processor: ImageProcessor, images: list) -> torch.Tensor:
    """CLIP image embeddings (the projected ones, what IP-Adapter and the prior take). (B, P)"""
    from PIL import Image

    if not isinstance(images, list) or not images:
        raise InvalidInput("images", "must be a non-empty list of PIL images")
    for i, image in enumerate(images):
        if not isinstance(image, Image.Image) or image.mode != "RGB":
            raise InvalidInput("images", f"item {i} must be an RGB PIL image, got "
                               f"{getattr(image, 'mode', type(image).__name__)!r}")
    pixels = processor(images=images, return_tensors="pt").pixel_values  # (B, 3, S, S)
    pixels = pixels.to(device=encoder.device, dtype=encoder.dtype)
    return encoder(pixel_values=pixels).image_embeds  # (B, P)


# ----------------------------------------------------------------------------------------------------------------
# the IP-Adapter
def _cross_attentions(unet: UNet2DConditionModel) -> list[tuple[int, str]]:
    """(key id, processor name) of every cross-attention, numbered as `_convert_ip_adapter_attn_to_diffusers` does:
    1, 3, 5, … over `unet.attn_processors` (the original IP-Adapter counted self- and cross-attention alike)."""
    names = [n for n in unet.attn_processors if not n.endswith("attn1.processor") and "motion_modules" not in n]
    return [(1 + 2 * i, name) for i, name in enumerate(names)]


def _attention(unet: UNet2DConditionModel, processor_name: str) -> nn.Module:
    return unet.get_submodule(processor_name.removesuffix(".processor"))


def _weight(linear: nn.Module) -> torch.Tensor:
    return getattr(linear, "base_layer", linear).weight  # the base weight, also under a peft LoRA wrapper


def new_ip_adapter_state(unet: UNet2DConditionModel, image_embed_dim: int, *, num_tokens: int = NUM_TOKENS,
                         generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """A fresh IP-Adapter for this UNet (flat keys, CPU, fp32), initialised as IP-Adapter itself does:
    `to_k_ip` / `to_v_ip` are copies of each cross-attention's `to_k` / `to_v` (image tokens start out read like
    text tokens), the projection is `nn.Linear`'s default range and the LayerNorm is the identity affine."""
    if num_tokens != NUM_TOKENS:
        raise InvalidInput("num_tokens", f"diffusers' IP-Adapter loader reads exactly {NUM_TOKENS} tokens, "
                           f"got {num_tokens!r}")
    if not isinstance(image_embed_dim, int) or image_embed_dim < 1:
        raise InvalidInput("image_embed_dim", f"must be a positive int, got {image_embed_dim!r}")
    width = unet.config.cross_attention_dim
    bound = 1.0 / math.sqrt(image_embed_dim)  # nn.Linear's default: U(-1/√fan_in, 1/√fan_in), but seeded here

    def uniform(*shape: int) -> torch.Tensor:
        return (torch.rand(shape, generator=generator) * 2 - 1) * bound

    state = {
        "image_proj.proj.weight": uniform(num_tokens * width, image_embed_dim),  # (4·D, P)
        "image_proj.proj.bias": uniform(num_tokens * width),
        "image_proj.norm.weight": torch.ones(width),
        "image_proj.norm.bias": torch.zeros(width),
    }
    for key_id, name in _cross_attentions(unet):
        attn = _attention(unet, name)
        state[f"ip_adapter.{key_id}.to_k_ip.weight"] = _weight(attn.to_k).detach().float().cpu().clone()  # (C, D)
        state[f"ip_adapter.{key_id}.to_v_ip.weight"] = _weight(attn.to_v).detach().float().cpu().clone()
    return state


def check_ip_adapter_fits(unet: UNet2DConditionModel, state: dict[str, torch.Tensor], field: str = "ip_adapter",
                          ) -> None:
    """Every key this UNet needs, of the right shape, and nothing else (else: an IP-Adapter for another model)."""
    width = unet.config.cross_attention_dim
    proj = state.get("image_proj.proj.weight")
    if proj is None or proj.ndim != 2 or proj.shape[0] != NUM_TOKENS * width:
        raise InvalidInput(field, f"image_proj.proj.weight must be ({NUM_TOKENS * width}, P) for this UNet, got "
                           f"{None if proj is None else tuple(proj.shape)}")
    want = {"image_proj.proj.weight": tuple(proj.shape), "image_proj.proj.bias": (proj.shape[0],),
            "image_proj.norm.weight": (width,), "image_proj.norm.bias": (width,)}
    for key_id, name in _cross_attentions(unet):
        attn = _attention(unet, name)
        want[f"ip_adapter.{key_id}.to_k_ip.weight"] = tuple(_weight(attn.to_k).shape)
        want[f"ip_adapter.{key_id}.to_v_ip.weight"] = tuple(_weight(attn.to_v).shape)
    extra = sorted(set(state) - set(want))
    if extra:
        raise InvalidInput(field, f"keys this UNet has no place for: {extra[:4]}")
    for key, shape in want.items():
        got = tuple(state[key].shape) if key in state else None
        if got != shape:
            raise InvalidInput(field, f"{key}: expected {shape}, got {got}")


def attach_ip_adapter(unet: UNet2DConditionModel, state: dict[str, torch.Tensor]) -> None:
    """Put an IP-Adapter (flat keys) on the UNet through diffusers' own loader; replaces one already there.
    The new modules come frozen, like every module the pipeline holds (training asks for their gradients)."""
    check_ip_adapter_fits(unet, state)
    nested: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in state.items():
        group, _, rest = key.partition(".")
        nested[group][rest] = value
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # its closing `unet.to(unet.dtype)` warns about a cast that is a no-op
    try:
        # plain modules filled by load_state_dict (no meta-device step): the same values, real trainable tensors
        unet._load_ip_adapter_weights([nested], low_cpu_mem_usage=False)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    for p in ip_adapter_parameters(unet):
        p.requires_grad_(False)


def _ip_processors(unet: UNet2DConditionModel) -> list[tuple[int, nn.Module]]:
    from diffusers.models.attention_processor import IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0

    procs = unet.attn_processors
    out = [(key_id, procs[name]) for key_id, name in _cross_attentions(unet)]
    if unet.encoder_hid_proj is None or not all(isinstance(p, (IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0))
                                                for _, p in out):
        raise ValueError("this UNet has no IP-Adapter attached (see attach_ip_adapter)")
    if len(unet.encoder_hid_proj.image_projection_layers) != 1:
        raise ValueError("this UNet holds several IP-Adapters; the flat format holds one")
    return out


def ip_adapter_parameters(unet: UNet2DConditionModel) -> list[nn.Parameter]:
    """What IP-Adapter training updates: the image projection and every `to_k_ip` / `to_v_ip`."""
    procs = _ip_processors(unet)  # raises when none is attached
    params = list(unet.encoder_hid_proj.image_projection_layers[0].parameters())
    for _, proc in procs:
        params += [*proc.to_k_ip.parameters(), *proc.to_v_ip.parameters()]
    return params


def ip_adapter_state(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """The attached IP-Adapter's weights, read back out of the UNet in the flat file layout (CPU copies)."""
    procs = _ip_processors(unet)
    proj = unet.encoder_hid_proj.image_projection_layers[0]  # diffusers' ImageProjection

    def copy(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu", copy=True).contiguous()

    state = {"image_proj.proj.weight": copy(proj.image_embeds.weight), "image_proj.proj.bias":
             copy(proj.image_embeds.bias), "image_proj.norm.weight": copy(proj.norm.weight),
             "image_proj.norm.bias": copy(proj.norm.bias)}
    for key_id, proc in procs:
        state[f"ip_adapter.{key_id}.to_k_ip.weight"] = copy(proc.to_k_ip[0].weight)
        state[f"ip_adapter.{key_id}.to_v_ip.weight"] = copy(proc.to_v_ip[0].weight)
    return state


def save_ip_adapter(state: dict[str, torch.Tensor], model_dir: str | os.PathLike) -> Path:
    """Write `ip_adapter/ip-adapter.safetensors` into a model folder; returns the file."""
    path = Path(model_dir) / IP_ADAPTER / IP_ADAPTER_WEIGHTS
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})
    return path


def load_ip_adapter_state(model_dir: str | os.PathLike) -> dict[str, torch.Tensor] | None:
    """The flat state of a folder's `ip_adapter/ip-adapter.safetensors`; None when the folder has none."""
    path = Path(model_dir) / IP_ADAPTER / IP_ADAPTER_WEIGHTS
    return load_file(str(path)) if path.is_file() else None
