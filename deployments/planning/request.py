"""What the planner is asked: the cards, the engine flags and the exact weights of a
checkpoint, plus the error it raises when the inputs cannot be planned."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

GIB = 1024**3

# vLLM 0.33's default (vllm/config/cache.py line 215); it was 0.9 for most of vLLM's life.
DEFAULT_GPU_MEMORY_UTILIZATION = 0.92
# Sequential read throughput assumed for the checkpoint: shared storage as in the field report,
# where 140 GB took 10-15 min (155-235 MB/s). Configurable per request: local
# Gen4 NVMe reads ~7 GB/s and a warm page cache is faster still.
DEFAULT_READ_BYTES_PER_SECOND = 200 * 10**6

# Integer tensors above this share of a checkpoint's bytes are packed quantized weights; below it
# they are buffers (position ids, masks) some checkpoints carry.
PACKED_INTEGER_SHARE = 0.01


class PlannerError(ValueError):
    """The inputs cannot be planned: a config without the fields the planner needs, an unknown
    dtype, a non-positive GPU count. The message names the field and is fit to show a user."""


@dataclass(frozen=True)
class WeightsSummary:
    """Exact figures from a checkpoint's safetensors headers (``models_registry.inspection``
    produces them): floating-point elements, bytes of tensor data, and bytes per dtype."""

    parameter_count: int
    weights_bytes: int
    dtypes: Mapping[str, int] = field(default_factory=dict)

    @property
    def has_packed_integers(self) -> bool:
        """True when integer tensors hold packed quantized weights (AWQ/GPTQ), so the float
        element count is not the model's parameter count."""
        integers = sum(size for dtype, size in self.dtypes.items() if dtype.startswith(("I", "U")))
        return integers > self.weights_bytes * PACKED_INTEGER_SHARE


@dataclass(frozen=True)
class PlanRequest:
    """What the user asks for: the cards (size and count on one host) and the engine flags."""

    gpu_memory_bytes: int
    gpus_on_host: int  # the cards of one host the plan may use (its tensor-parallel ceiling)
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION
    max_model_len: int | None = None
    dtype: str = "auto"
    kv_cache_dtype: str = "auto"
    tensor_parallel_size: int | None = None
    max_num_batched_tokens: int | None = None
    max_num_seqs: int | None = None
    enforce_eager: bool = False
    gpu_free_bytes: int | None = None
    read_bytes_per_second: float = DEFAULT_READ_BYTES_PER_SECOND
