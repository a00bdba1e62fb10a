"""LoRAs in and out in the formats other tools use: our diffusers file gives stock diffusers our pixels (even for an
adapter trained with dropout), our kohya file carries the real alpha, and kohya / diffusers / peft files import into
adapters that make the same images; what can't be used is refused by name before anything is written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from minidalle.adapters import DIFFUSERS_FILE, LoraSettings, load_adapter_files, save_adapter
from minidalle.errors import InvalidInput
from minidalle.lora_formats import KOHYA_FILE, import_adapter, read_lora

REQUEST = dict(num_inference_steps=4, seed=7, guidance_scale=7.5)


def _worst(a, b) -> int:
    return max(int(np.abs(np.asarray(x, dtype=np.int16) - np.asarray(y, dtype=np.int16)).max())
               for x, y in zip(a, b, strict=True))


@pytest.fixture
def trained_like(make_adapter, tmp_path):
    """An adapter as training writes it: the default dropout (0.1), alpha 2x rank, no prior."""
    src = load_adapter_files(make_adapter("donor", seed=3, train_prior=False, rank=4, alpha=8.0))
    return save_adapter(tmp_path / "adapters" / "style", lora=src.lora, prior=None,
                        settings=LoraSettings(rank=4, alpha=8.0, dropout=0.1), meta={"base_model": "test"})


def _ours(fresh_pipe, folder, name="style"):
    pipe = fresh_pipe()
    pipe.load_adapter(folder, name=name)
    return pipe("a red circle", adapters=[(name, 1.0)], **REQUEST).images


def test_stock_diffusers_makes_our_pixels_from_our_diffusers_file(fresh_pipe, tiny_model_dir, trained_like):
    from diffusers import StableDiffusionPipeline

    meta = json.loads(__import__("safetensors").safe_open(trained_like / DIFFUSERS_FILE, "pt").metadata()
                      ["lora_adapter_metadata"])
    assert meta["unet.lora_dropout"] == 0.0 and meta["unet.lora_alpha"] == 8.0
    stock = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False)
    stock.set_progress_bar_config(disable=True)
    stock.load_lora_weights(trained_like, weight_name=DIFFUSERS_FILE)
    stock.unet.train()  # even left in training mode (where a dropout would act), the same seed: the same pixels

    def theirs():
        return stock("a red circle", generator=torch.Generator("cpu").manual_seed(REQUEST["seed"]),
                     num_inference_steps=4, guidance_scale=7.5).images

    first = theirs()
    assert _worst(first, theirs()) == 0
    assert _worst(first, _ours(fresh_pipe, trained_like)) == 0


def test_the_kohya_file_carries_the_adapters_alpha(trained_like):
    kohya = load_file(trained_like / KOHYA_FILE)
    alphas = {k: float(v) for k, v in kohya.items() if k.endswith(".alpha")}
    downs = [k for k in kohya if k.endswith(".lora_down.weight")]
    assert downs and len(alphas) == len(downs) and set(alphas.values()) == {8.0}  # not diffusers' alpha = rank
    assert all(k.startswith("lora_unet_") for k in kohya)


@pytest.mark.parametrize("form", ["kohya", "diffusers", "peft", "minidalle"])
def test_an_imported_lora_makes_the_same_images(form, trained_like, fresh_pipe, tmp_path):
    if form == "kohya":
        src = trained_like / KOHYA_FILE
    elif form == "diffusers":
        src = trained_like / DIFFUSERS_FILE
    elif form == "peft":
        src = tmp_path / "peft"
        src.mkdir()
        lora = load_adapter_files(trained_like).lora
        save_file({f"base_model.model.{k}": v for k, v in lora.items()}, src / "adapter_model.safetensors")
        (src / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8.0, "peft_type": "LORA"}))
    else:
        src = trained_like
    pipe = fresh_pipe()
    out = import_adapter(src, tmp_path / "imported" / "style2", pipeline=pipe)
    meta = json.loads((out / "adapter.json").read_text())
    assert meta["imported_from"] == form and meta["lora"]["rank"] == 4 and meta["lora"]["alpha"] == 8.0
    assert meta["base_model_hash"] == pipe.model_hash
    assert _worst(_ours(fresh_pipe, out, "style2"), _ours(fresh_pipe, trained_like)) == 0
    # and out again: the imported adapter's kohya file is the original's
    assert {k: v for k, v in load_file(out / KOHYA_FILE).items()}.keys() == load_file(trained_like / KOHYA_FILE).keys()


def _kohya(trained_like) -> dict:
    return dict(load_file(trained_like / KOHYA_FILE))


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 8)}),
     "text-encoder LoRA keys are not supported"),
    (lambda d: d.update({"lora_unet_x.hada_w1_a": torch.zeros(4, 8)}), "LyCORIS"),
    (lambda d: d.update({next(k for k in d if k.endswith(".alpha")): torch.tensor(3.0)}), "alphas differ"),
    (lambda d: d.update({"something_else.weight": torch.zeros(2)}), "unknown LoRA key format"),
])
def test_what_cant_be_used_is_refused_by_name(trained_like, tmp_path, fresh_pipe, change, message):
    d = _kohya(trained_like)
    change(d)
    bad = tmp_path / "bad.safetensors"
    save_file(d, bad)
    with pytest.raises(InvalidInput, match=message) as e:
        import_adapter(bad, tmp_path / "out" / "x", pipeline=fresh_pipe())
    assert e.value.field == "file"
    assert not (tmp_path / "out" / "x").exists()  # nothing written


def test_a_lora_for_another_model_or_a_pickle_is_refused(make_adapter, tmp_path, fresh_pipe, tiny_pipe):
    other = dict(tiny_pipe.unet.config)
    other["cross_attention_dim"] = other["cross_attention_dim"] * 2
    folder = make_adapter("alien", train_prior=False, unet_config=other)
    with pytest.raises(InvalidInput, match="does not fit this model"):
        import_adapter(folder / DIFFUSERS_FILE, tmp_path / "out" / "alien", pipeline=fresh_pipe())
    pickle = tmp_path / "lora.ckpt"
    pickle.write_bytes(b"\x80\x04not a safetensors file")
    with pytest.raises(InvalidInput, match="only .safetensors"):
        read_lora(pickle)


def test_cli_imports_a_kohya_file(cli_run, trained_like, tmp_path):
    out = tmp_path / "mine"
    proc = cli_run("adapters", "import", str(trained_like / KOHYA_FILE), "--out", str(out),
                   "--model", str(__import__("minidalle.embedded", fromlist=["x"]).TINY_RANDOM))
    assert proc.returncode == 0, proc.stderr
    assert "imported kohya LoRA (rank 4, alpha 8" in proc.stdout and (out / "adapter.safetensors").is_file()
    proc = cli_run("adapters", "import", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path / "x"))
    assert proc.returncode == 2 and proc.stderr.startswith("minidalle: error: ") and "does not exist" in proc.stderr
