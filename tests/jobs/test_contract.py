"""One definition per request: the API's bodies, the CLI's flags and the library's checks all come from
`minidalle.params`, and the torch-free facts the API reads agree with the library's."""

from __future__ import annotations

import dataclasses

import pytest

import minidalle
from jobs.requests import FinetuneRequest, GenerateRequest, api_name
from minidalle.cli import build_parser
from minidalle.errors import InvalidInput
from minidalle.params import FINETUNE, GENERATE, SCHEDULER_NAMES, Generate
from minidalle.schedulers import SCHEDULERS
from minidalle.training import TrainConfig
from service.model_info import get_model_info


def _bounds(field) -> dict:
    out = {}
    for m in field.metadata:
        for name in ("ge", "gt", "le", "lt", "multiple_of", "max_length"):
            if getattr(m, name, None) is not None:
                out[name] = getattr(m, name)
    return out


@pytest.mark.parametrize(("body", "params"), [(GenerateRequest, GENERATE), (FinetuneRequest, FINETUNE)])
def test_api_fields_have_the_library_defaults_bounds_and_help(body, params):
    fields = body.model_fields
    for name, p in params.items():
        if p.api_name is None or p.api_name not in fields:
            continue
        f = fields[p.api_name]
        default = f.default_factory() if f.default_factory is not None else f.default
        assert default == (list(p.default) if p.max_items else p.default), name
        want = {k: v for k, v in dict(ge=p.ge, gt=p.gt, le=p.le, lt=p.lt, multiple_of=p.multiple_of,
                                        max_length=p.max_items).items() if v is not None}
        assert _bounds(f) == want, name
        assert f.description == p.help, name


def test_every_api_parameter_is_in_its_body():
    assert {p.api_name for p in FINETUNE.values() if p.api_name} <= set(FinetuneRequest.model_fields)
    generate = {p.api_name for p in GENERATE.values() if p.api_name} - {Generate.adapter_scale.api_name}
    assert generate <= set(GenerateRequest.model_fields)


def test_train_config_defaults_are_the_params():
    config = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for name, p in FINETUNE.items():
        f = config[name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        assert default == (list(p.default) if p.max_items else p.default), name


def test_request_maps_to_library_arguments_in_one_place():
    req = GenerateRequest(prompt="p", num_images=3, num_inference_steps=7, seed=5, adapters=[{"name": "a"}])
    kw = req.pipeline_kwargs()
    assert kw["num_images_per_prompt"] == 3 and kw["num_inference_steps"] == 7 and kw["seed"] == 5
    assert kw["adapters"] == [("a", 1.0)] and "num_images" not in kw
    ft = FinetuneRequest(name="x", dataset_id="0" * 32, steps=9, lr_scheduler="cosine")
    config = TrainConfig(dataset_dir="d", output_dir="o", **ft.train_kwargs())
    assert config.steps == 9 and config.lr_scheduler == "cosine" and config.checkpoint_interval == 1
    config.check()
    assert api_name("num_images_per_prompt") == "num_images" and api_name("steps") == "steps"


def test_cli_flags_carry_the_library_bounds(capsys):
    ap = build_parser()
    with pytest.raises(SystemExit):
        ap.parse_args(["finetune", "d", "--out", "o", "--batch-size", str(FINETUNE["batch_size"].le + 1)])
    assert f"--batch-size: must be in [1, {FINETUNE['batch_size'].le}]" in capsys.readouterr().err
    args = ap.parse_args(["generate", "p", "--out", "o", "--steps", "3", "--num-images", "2"])
    assert args.num_inference_steps == 3 and args.num_images_per_prompt == 2
    args = ap.parse_args(["finetune", "d", "--out", "o", "--no-train-prior", "--validation-prompt", "a"])
    assert args.train_prior is False and args.validation_prompts == ["a"] and args.steps is None


def test_library_errors_carry_the_field():
    with pytest.raises(InvalidInput) as e:
        TrainConfig(dataset_dir="d", output_dir="o", batch_size=0).check()
    assert e.value.field == "batch_size" and str(e.value).startswith("batch_size: ")
    with pytest.raises(InvalidInput) as e:
        GENERATE["num_images_per_prompt"].check(0)
    assert e.value.field == "num_images_per_prompt"


def test_scheduler_names_match_the_library():
    assert sorted(SCHEDULER_NAMES) == sorted(SCHEDULERS)


def test_embedded_model_path_matches_the_library():
    assert get_model_info("").model == minidalle.DEFAULT_MODEL


def test_default_size_and_token_count_match_the_pipeline():
    pipe = minidalle.MiniDallePipeline.from_pretrained(minidalle.DEFAULT_MODEL)
    info = get_model_info("")
    assert info.default_size == pipe.default_height == pipe.default_width
    assert info.max_prompt_tokens == pipe.max_prompt_tokens
    for text in ("a red circle on a blue background", "zebra " * 40, "ünïcødé ✓"):
        assert info.count_tokens(text) == pipe.count_tokens(text)


def test_minimum_steps_per_scheduler_match_the_library():
    from minidalle.schedulers import min_inference_steps

    pipe = minidalle.MiniDallePipeline.from_pretrained(minidalle.DEFAULT_MODEL)
    info = get_model_info("")
    for name in [None, *SCHEDULERS]:
        assert info.min_steps(name) == min_inference_steps(pipe._scheduler_for(name)), name


def test_batch_keys_join_exactly_the_requests_that_can_share_a_denoising_loop():
    from jobs.requests import GenerateRequest, VariationRequest
    from minidalle.pipeline import BATCH_SHARED

    base = GenerateRequest(prompt="a", num_inference_steps=10, adapters=[{"name": "x", "scale": 0.5}])
    own = dict(prompt="b", negative_prompt="c", seed=3, num_images=2, webhook_url="https://example.com/h")
    assert GenerateRequest(**{**base.model_dump(), **own}).batch_key() == base.batch_key()
    differs = dict(num_inference_steps=11, guidance_scale=2.0, width=128, height=128, scheduler="ddim",
                   adapters=[{"name": "x", "scale": 0.6}], prior="diffusion", prior_guidance_scale=2.0,
                   prior_num_inference_steps=3, ip_adapter_scale=0.5)
    for field, value in differs.items():
        assert GenerateRequest(**{**base.model_dump(), field: value}).batch_key() != base.batch_key(), field
    # variations batch with variations of the same settings only, whatever their images
    dumped = {k: v for k, v in base.model_dump().items() if k != "image_id"}
    variation = VariationRequest(**{**dumped, "image_id": "a" * 32})
    assert variation.batch_key() != base.batch_key()
    assert VariationRequest(**{**dumped, "image_id": "b" * 32, **own}).batch_key() == variation.batch_key()
    # what the key holds is what the library's batch shares (eta is not an API field: always the default)
    library = set(BATCH_SHARED) - {"eta"}
    assert {GENERATE[n].api_name or n for n in library if n in GENERATE} | {"adapters"} == \
        {"num_inference_steps", "guidance_scale", "width", "height", "scheduler", "adapters", "prior",
         "prior_guidance_scale", "prior_num_inference_steps", "ip_adapter_scale"}
