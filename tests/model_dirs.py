"""Real model directories for tests, built in ``tmp_path`` with ``models_registry.tiny_model``
(shared with ``manage.py berth_demo``), plus shapes only tests need."""

from __future__ import annotations

import math

from models_registry.tiny_model import (
    DTYPE_SIZE,
    LLAMA_CONFIG,
    TOKENIZER_CONFIG,
    TOKENIZER_JSON,
    llama_tensors,
    write_model,
    write_safetensors,
)

__all__ = [
    "DTYPE_SIZE",
    "LFS_POINTER",
    "LLAMA_CONFIG",
    "TOKENIZER_CONFIG",
    "TOKENIZER_JSON",
    "llama_tensors",
    "parameter_count",
    "write_model",
    "write_safetensors",
]


def parameter_count(tensors: dict[str, tuple[str, tuple[int, ...]]]) -> int:
    return sum(
        math.prod(shape) for dtype, shape in tensors.values() if not dtype.startswith(("I", "U"))
    )


LFS_POINTER = (
    "version https://git-lfs.github.com/spec/v1\n"
    "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
    "size 4976698672\n"
)
