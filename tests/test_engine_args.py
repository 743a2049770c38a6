"""Engine flags and environment variables: strict, typed, allow-listed (hostile cases 14-23 of
``tests/test_hostile_input.py``)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from deployments.runtime.engine_args import (
    ALLOWED_ENV,
    MAX_VARIABLES,
    REFUSED_ENV,
    EngineArgs,
    SchemaError,
    parse_engine_args,
    parse_environment,
)


def test_typed_flags_render_to_an_argument_list() -> None:
    args = parse_engine_args({
        "max_model_len": "8192", "gpu_memory_utilization": "0.92", "kv_cache_dtype": "fp8",
        "enforce_eager": "on", "enable_prefix_caching": "false", "dtype": "",
    })  # fmt: skip
    assert args == EngineArgs(
        max_model_len=8192,
        gpu_memory_utilization=0.92,
        kv_cache_dtype="fp8",
        enforce_eager=True,
        enable_prefix_caching=False,
    )
    assert args.as_argv() == [
        "--max-model-len", "8192", "--gpu-memory-utilization", "0.92", "--kv-cache-dtype", "fp8",
        "--enforce-eager", "--no-enable-prefix-caching",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_model_len", "4096; rm -rf /", "whole number"),
        ("max_model_len", "$(id)", "whole number"),
        ("max_model_len", "`id`", "whole number"),
        ("max_model_len", "1e9", "whole number"),
        ("max_model_len", "-1", "whole number"),
        ("max_model_len", 10**12, "between"),
        ("max_model_len", True, "whole number"),
        ("gpu_memory_utilization", "1.5", "between 0.1 and 0.98"),
        ("gpu_memory_utilization", "NaN", "plain decimal"),
        ("gpu_memory_utilization", "Infinity", "plain decimal"),
        ("gpu_memory_utilization", "0.9 ", "plain decimal"),
        ("gpu_memory_utilization", float("nan"), "between"),
        ("dtype", "bfloat16 --trust-remote-code", "one of"),
        ("max_num_seqs", "0", "between"),
    ],
)
def test_bad_numbers_and_injection_attempts_are_refused_by_field(
    field: str, value: object, message: str
) -> None:
    with pytest.raises(SchemaError) as error:
        parse_engine_args({field: value})
    assert message in error.value.errors[field]


@pytest.mark.parametrize(
    ("field", "fragment"),
    [
        ("--host", "Berth binds the engine"),
        ("port", "assigns the port"),
        ("api_key", "command line"),
        ("--chat-template", "approved by an admin"),
        ("tokenizer", "model directory"),
        ("allowed_local_media_path", "host files"),
        ("tensor_parallel_size", "planner"),
        ("privileged", "not an engine setting"),
        ("cap_add", "not an engine setting"),
        ("network_mode", "not an engine setting"),
        ("volumes", "not an engine setting"),
    ],
)
def test_server_owned_and_unknown_fields_are_refused(field: str, fragment: str) -> None:
    with pytest.raises(SchemaError) as error:
        parse_engine_args({field: "x"})
    assert fragment in error.value.errors[field]


def test_trust_remote_code_needs_an_approved_model() -> None:
    with pytest.raises(SchemaError, match="not approved for remote code"):
        parse_engine_args({"trust_remote_code": "true"})
    assert parse_engine_args(
        {"trust_remote_code": "true"}, trust_remote_code_allowed=True
    ).as_argv() == ["--trust-remote-code"]


@pytest.mark.parametrize(
    ("variables", "name", "fragment"),
    [
        ({"NVIDIA_VISIBLE_DEVICES": "all"}, "NVIDIA_VISIBLE_DEVICES", "Berth's allocation"),
        ({"CUDA_VISIBLE_DEVICES": "0,1,2,3"}, "CUDA_VISIBLE_DEVICES", "Berth's allocation"),
        ({"LD_PRELOAD": "/model/x.so"}, "LD_PRELOAD", "arbitrary code"),
        ({"PYTHONPATH": "/model"}, "PYTHONPATH", "arbitrary code"),
        ({"VLLM_SERVER_DEV_MODE": "1"}, "VLLM_SERVER_DEV_MODE", "development endpoints"),
        (
            {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true"},
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING",
            "run time",
        ),
        ({"VLLM_USE_V1": "0"}, "VLLM_USE_V1", "obsolete"),
        ({"HTTPS_PROXY": "http://evil"}, "HTTPS_PROXY", "allow-list"),
        ({"A=B": "1"}, "A=B", "upper-case letters"),
        ({"1BAD": "1"}, "1BAD", "upper-case letters"),
        ({"": "1"}, "", "upper-case letters"),
        ({"X" * 300: "1"}, "environment", "upper-case letters"),
        ({"NCCL_P2P_DISABLE": "1\nLD_PRELOAD=x"}, "NCCL_P2P_DISABLE", "one of"),
        ({"NCCL_P2P_DISABLE": "1" * 1_000_000}, "NCCL_P2P_DISABLE", "one of"),
        ({"OMP_NUM_THREADS": "\0"}, "OMP_NUM_THREADS", "whole number"),
    ],
)
def test_environment_refusals_name_the_variable(
    variables: dict[str, str], name: str, fragment: str
) -> None:
    with pytest.raises(SchemaError) as error:
        parse_environment(variables)
    assert fragment in error.value.errors[name]


def test_too_many_variables() -> None:
    with pytest.raises(SchemaError, match="at most 32"):
        parse_environment({f"V{index}": "1" for index in range(500)})


def test_allowed_variables_pass_through() -> None:
    assert parse_environment({"NCCL_P2P_DISABLE": "1", "OMP_NUM_THREADS": "8"}) == {
        "NCCL_P2P_DISABLE": "1", "OMP_NUM_THREADS": "8",
    }  # fmt: skip


@given(st.dictionaries(st.text(max_size=40), st.text(max_size=40), max_size=6))
def test_whatever_is_accepted_is_allow_listed_and_printable(variables: dict[str, str]) -> None:
    try:
        accepted = parse_environment(variables)
    except SchemaError:
        return
    for name, value in accepted.items():
        assert name in ALLOWED_ENV
        assert value.isprintable()
        assert "\n" not in value
        assert len(value) <= 16


@given(
    st.dictionaries(
        st.sampled_from(["max_model_len", "gpu_memory_utilization", "max_num_seqs", "dtype"]),
        st.one_of(st.text(max_size=20), st.integers(), st.floats()),
        max_size=4,
    )
)
def test_accepted_engine_args_render_to_safe_tokens(data: dict[str, object]) -> None:
    try:
        argv = parse_engine_args(data).as_argv()
    except SchemaError:
        return
    for token in argv:
        assert token.replace("-", "").replace(".", "").replace("_", "").isalnum(), token


# --- properties of the environment validator ---------------------------------------------------

HOSTILE_TEXT = st.text(
    alphabet=st.sampled_from([*"AZaz09_=-./ $;`|&'\"\n\r\t\0\\", "\u0430", "\uff0f"]),
    max_size=30,
)
ALLOWED_VALUES = st.one_of(
    st.sampled_from(["0", "1", "DEBUG", "INFO", "WARN", "spawn", "fork", "true", "false", "8"]),
    HOSTILE_TEXT,
)


@given(st.sampled_from(sorted(REFUSED_ENV)), HOSTILE_TEXT, st.sampled_from(sorted(ALLOWED_ENV)))
def test_a_refused_variable_is_always_named_and_nothing_passes(
    refused: str, value: str, allowed: str
) -> None:
    with pytest.raises(SchemaError) as error:
        parse_environment({allowed: "1", refused: value})
    assert refused in error.value.errors
    assert "cannot be set" in error.value.errors[refused]


@given(HOSTILE_TEXT.filter(lambda name: name not in ALLOWED_ENV), st.text(max_size=10))
def test_a_name_off_the_allow_list_is_refused_whatever_it_looks_like(name: str, value: str) -> None:
    with pytest.raises(SchemaError):
        parse_environment({name: value})


@given(st.dictionaries(st.sampled_from(sorted(ALLOWED_ENV)), ALLOWED_VALUES, max_size=5))
def test_accepted_values_are_plain_tokens_from_each_variables_own_domain(
    variables: dict[str, str],
) -> None:
    try:
        accepted = parse_environment(variables)
    except SchemaError as exc:
        refused = set(exc.errors)
    else:
        refused = set()
        assert accepted.keys() == variables.keys()
        for name, value in accepted.items():
            assert re.fullmatch(r"[A-Za-z0-9]{1,8}", value), (name, value)
            assert ALLOWED_ENV[name](value) == value  # stable: validating again changes nothing
    assert refused <= set(variables)  # every refusal names one of the inputs


@given(st.integers(min_value=MAX_VARIABLES + 1, max_value=MAX_VARIABLES + 200))
def test_more_variables_than_the_limit_are_refused_as_a_whole(count: int) -> None:
    names = sorted(ALLOWED_ENV)
    variables = {f"{names[index % len(names)]}_{index}": "1" for index in range(count)}
    with pytest.raises(SchemaError, match=f"at most {MAX_VARIABLES}"):
        parse_environment(variables)
