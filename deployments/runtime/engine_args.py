"""The engine flags and environment variables a user may set, as a strict typed schema.

Nothing a user types reaches the container as free text: every flag is a known vLLM option
with a parsed, bounded value, rendered by Berth into an argument list; every environment
variable comes from an allow-list with a validator per name. Unknown fields, server-owned flags
(``--host``, ``--port``, ``--api-key``, paths) and dangerous variables are refused with a message
naming the field and the fix::

    args = parse_engine_args({"max_model_len": "8192", "kv_cache_dtype": "fp8"})
    args.as_argv()        # ['--max-model-len', '8192', '--kv-cache-dtype', 'fp8']
    parse_environment({"NCCL_P2P_DISABLE": "1"})
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any


class SchemaError(ValueError):
    """Refused input; ``errors`` maps each field to what is wrong and how to fix it."""

    def __init__(self, errors: dict[str, str]):
        super().__init__("; ".join(f"{field}: {message}" for field, message in errors.items()))
        self.errors = errors


# Flags Berth sets itself (or that open files, network or code paths): never from a user.
SERVER_OWNED = {
    "host": "Berth binds the engine itself",
    "port": "Berth assigns the port",
    "api_key": "secrets never go on the command line (docker inspect shows it)",
    "model": "the model comes from the registry",
    "tokenizer": "the tokenizer comes from the model directory",
    "download_dir": "Berth serves local model directories only",
    "chat_template": "chat templates must be approved by an admin",
    "allowed_local_media_path": "it exposes host files to requests",
    "tensor_parallel_size": "the planner chooses it from the GPUs",
    "served_model_name": "set it in the deployment's name field",
    "tool_server": "it lets the engine call out to other servers",
    "lora_modules": "adapters must be registered models",
    "load_format": "Berth chooses the loader from the storage kind of the model's mount",
    "safetensors_load_strategy": "Berth chooses it from the storage kind of the model's mount",
    "model_loader_extra_config": "Berth sets the loader's settings with the load format",
    "runner": "Berth chooses it from the model (embedding models get the pooling runner)",
    "convert": "Berth chooses the runner from the model",
}
DTYPES = ("auto", "bfloat16", "float16", "half", "float32")
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")


@dataclass(frozen=True)
class EngineArgs:
    """User-tunable vLLM flags; ``None`` means vLLM's (or the planner's) default."""

    max_model_len: int | None = None
    gpu_memory_utilization: float | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    dtype: str | None = None
    kv_cache_dtype: str | None = None
    enforce_eager: bool = False
    enable_prefix_caching: bool | None = None
    trust_remote_code: bool = False

    def as_argv(self) -> list[str]:
        """The flags as an argument list (no shell ever sees them)."""
        argv: list[str] = []
        for spec in fields(self):
            value = getattr(self, spec.name)
            flag = "--" + spec.name.replace("_", "-")
            if isinstance(value, bool):
                if spec.name == "enable_prefix_caching":
                    argv.append(flag if value else "--no-enable-prefix-caching")
                elif value:
                    argv.append(flag)
            elif value is not None:
                argv += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
        return argv


def _int(low: int, high: int) -> Callable[[Any], int]:
    def parse(raw: Any) -> int:
        if isinstance(raw, bool) or not isinstance(raw, int | str):
            raise ValueError("must be a whole number")
        text = str(raw)
        if not re.fullmatch(r"[0-9]{1,9}", text):
            raise ValueError(f"must be a whole number between {low:,} and {high:,}")
        value = int(text)
        if not low <= value <= high:
            raise ValueError(f"must be between {low:,} and {high:,}")
        return value

    return parse


def _float(low: float, high: float) -> Callable[[Any], float]:
    def parse(raw: Any) -> float:
        if isinstance(raw, bool) or not isinstance(raw, int | float | str):
            raise ValueError("must be a number")
        if isinstance(raw, str) and not re.fullmatch(r"[0-9]*\.?[0-9]+", raw):
            raise ValueError(f"must be a plain decimal number between {low} and {high}")
        value = float(raw)
        if not math.isfinite(value) or not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}")
        return value

    return parse


def _choice(choices: tuple[str, ...]) -> Callable[[Any], str]:
    def parse(raw: Any) -> str:
        if raw not in choices:
            raise ValueError(f"must be one of: {', '.join(choices)}")
        return raw

    return parse


def _bool(raw: Any) -> bool:
    if raw in (True, "true", "on", "1", 1):
        return True
    if raw in (False, "false", "off", "0", 0, ""):
        return False
    raise ValueError("must be true or false")


PARSERS: dict[str, Callable[[Any], Any]] = {
    "max_model_len": _int(16, 10_000_000),
    # Above 0.98 leaves nothing for CUDA context and NCCL buffers (vLLM's own docs use ≤ 0.95).
    "gpu_memory_utilization": _float(0.1, 0.98),
    # vLLM's default max_num_seqs is 256 (1024 on recent GPUs); far above that is a mistake.
    "max_num_seqs": _int(1, 4096),
    "max_num_batched_tokens": _int(16, 10_000_000),
    "dtype": _choice(DTYPES),
    "kv_cache_dtype": _choice(KV_CACHE_DTYPES),
    "enforce_eager": _bool,
    "enable_prefix_caching": _bool,
    "trust_remote_code": _bool,
}


def parse_engine_args(
    data: Mapping[str, Any], *, trust_remote_code_allowed: bool = False
) -> EngineArgs:
    """Strictly parse user input: unknown and server-owned fields are errors, blanks are unset.
    ``trust_remote_code`` needs the model to be approved by an admin."""
    errors: dict[str, str] = {}
    values: dict[str, Any] = {}
    for name, raw in data.items():
        key = name.lstrip("-").replace("-", "_")
        if key in SERVER_OWNED:
            errors[name] = f"cannot be set: {SERVER_OWNED[key]}"
        elif key not in PARSERS:
            errors[name] = f"is not an engine setting Berth accepts (allowed: {', '.join(PARSERS)})"
        elif raw is None or raw == "":
            continue
        else:
            try:
                values[key] = PARSERS[key](raw)
            except ValueError as exc:
                errors[name] = str(exc)
    if values.get("trust_remote_code") and not trust_remote_code_allowed:
        errors["trust_remote_code"] = (
            "this model is not approved for remote code; ask an admin to review it"
        )
    if errors:
        raise SchemaError(errors)
    return EngineArgs(**values)


# --- environment ------------------------------------------------------------------------------

_NAME = re.compile(r"^[A-Z][A-Z0-9_]{0,63}$")
MAX_VARIABLES = 32
REFUSED_ENV = {
    "VLLM_USE_V1": "obsolete: removed from vLLM. The field report's V1 crash was an unwritable "
    "cache directory, which Berth prevents with a writable cache volume",
    "CUDA_VISIBLE_DEVICES": "GPUs are assigned by Berth's allocation, not by variables",
    "NVIDIA_VISIBLE_DEVICES": "GPUs are assigned by Berth's allocation, not by variables",
    "LD_PRELOAD": "it loads arbitrary code into the engine",
    "LD_LIBRARY_PATH": "it loads arbitrary code into the engine",
    "PYTHONPATH": "it loads arbitrary code into the engine",
    "PYTHONSTARTUP": "it runs arbitrary code in the engine",
    "VLLM_SERVER_DEV_MODE": "it enables unauthenticated development endpoints",
    "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "it lets requests load code and weights at run time",
    "HF_TOKEN": "secrets are not stored in deployments; models are served from local storage",
}
_BOOL_VALUES = ("0", "1")
ALLOWED_ENV: dict[str, Callable[[str], str]] = {
    "VLLM_LOGGING_LEVEL": _choice(("DEBUG", "INFO", "WARNING", "ERROR")),
    "NCCL_P2P_DISABLE": _choice(_BOOL_VALUES),
    "NCCL_SHM_DISABLE": _choice(_BOOL_VALUES),
    "NCCL_IB_DISABLE": _choice(_BOOL_VALUES),
    "NCCL_DEBUG": _choice(("VERSION", "WARN", "INFO")),
    "VLLM_WORKER_MULTIPROC_METHOD": _choice(("spawn", "fork")),
    "VLLM_ALLOW_LONG_MAX_MODEL_LEN": _choice(_BOOL_VALUES),
    "VLLM_ENABLE_CUDA_COMPATIBILITY": _choice(_BOOL_VALUES),
    "TOKENIZERS_PARALLELISM": _choice(("true", "false")),
    "OMP_NUM_THREADS": lambda raw: str(_int(1, 1024)(raw)),
}


def parse_environment(data: Mapping[str, Any]) -> dict[str, str]:
    """Validate variables against the allow-list; each refusal names the variable and why."""
    errors: dict[str, str] = {}
    result: dict[str, str] = {}
    if len(data) > MAX_VARIABLES:
        raise SchemaError({"environment": f"at most {MAX_VARIABLES} variables"})
    for name, raw in data.items():
        label = name if isinstance(name, str) and len(name) <= 64 else "environment"
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            errors[label] = (
                "variable names are upper-case letters, digits and _ (e.g. NCCL_P2P_DISABLE)"
            )
        elif name in REFUSED_ENV:
            errors[name] = f"cannot be set: {REFUSED_ENV[name]}"
        elif name not in ALLOWED_ENV or name.endswith("_PROXY"):
            errors[name] = f"is not on the allow-list ({', '.join(ALLOWED_ENV)})"
        elif not isinstance(raw, str):
            errors[name] = "value must be text"
        else:
            try:
                result[name] = ALLOWED_ENV[name](raw)
            except ValueError as exc:
                errors[name] = f"value {exc}"
    if errors:
        raise SchemaError(errors)
    return result
