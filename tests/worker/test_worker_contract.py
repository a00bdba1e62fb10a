"""The API's torch-free copies of model facts agree with the library (minidalle) they mirror."""

from __future__ import annotations

import minidalle
from minidalle.adapters import NAME_RE
from minidalle.schedulers import SCHEDULERS
from service.model_info import ADAPTER_NAME_PATTERN, SCHEDULER_NAMES, embedded_model, get_model_info


def test_scheduler_names_match_the_library():
    assert sorted(SCHEDULER_NAMES) == sorted(SCHEDULERS)


def test_adapter_name_rule_matches_the_library():
    assert ADAPTER_NAME_PATTERN == NAME_RE.pattern


def test_embedded_model_path_matches_the_library():
    assert embedded_model() == minidalle.DEFAULT_MODEL


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
