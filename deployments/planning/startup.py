"""How long the engine takes to become ready, and the timers derived from it (health start
period, stall timeout, VLLM_ENGINE_READY_TIMEOUT_S)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from deployments.planning.request import PlannerError, PlanRequest

# Process start, imports, engine init and memory profiling: 34 s warm to 94 s cold on 8B
# (vllm issue #20264; tensorfuse's Llama-3.1-8B cold start).
ENGINE_INIT_S = 90
# Dynamo ~15 s + Inductor ~70 s on Llama-70B (vllm issue #19824); 52 s cold on 8B (tensorfuse).
TORCH_COMPILE_S = 90
# CUDA-graph capture: ~60 s on Llama-70B TP=8 (vllm issue #19824), 54 s cold on 8B (tensorfuse).
CUDA_GRAPH_CAPTURE_S = 60
# transformers' save_pretrained default max_shard_size ("5GB"): the loader logs one progress line
# per shard, so a shard's read time is the longest silence while loading.
DEFAULT_SHARD_BYTES = 5 * 10**9
# The health check's start period is the estimate with this margin, never below the 120 s start
# period of the image whose restart loop the field report describes (lesson 7).
HEALTH_START_PERIOD_MARGIN = 1.5
MIN_HEALTH_START_PERIOD_S = 120
# A load is stalled after this many times its longest silent phase without a progress line.
STALL_TIMEOUT_MARGIN = 3
MIN_STALL_TIMEOUT_S = 300
# vLLM's default VLLM_ENGINE_READY_TIMEOUT_S (vllm/envs.py); we never set less.
VLLM_DEFAULT_ENGINE_READY_TIMEOUT_S = 600
ENGINE_READY_TIMEOUT_MARGIN = 2


@dataclass(frozen=True)
class StartupEstimate:
    """How long the engine takes to become ready, and the timers derived from it."""

    read_s: int
    engine_init_s: int
    compile_s: int
    cuda_graph_s: int
    health_start_period_s: int
    stall_timeout_s: int
    engine_ready_timeout_s: int

    @property
    def total_s(self) -> int:
        """Seconds from container start to the first healthy answer, estimated."""
        return self.read_s + self.engine_init_s + self.compile_s + self.cuda_graph_s

    def environment(self) -> dict[str, str]:
        """Environment variables the launcher sets from this estimate."""
        return {"VLLM_ENGINE_READY_TIMEOUT_S": str(self.engine_ready_timeout_s)}


def _round_up(seconds: float, step: int) -> int:
    return int(-(-math.ceil(seconds) // step) * step)


def startup_estimate(checkpoint_bytes: int, request: PlanRequest) -> StartupEstimate:
    """Reading the checkpoint at the assumed throughput, plus engine init, torch.compile and
    CUDA-graph capture (both skipped with --enforce-eager). The health start period adds a
    margin; the stall timeout covers the longest silent phase (one shard, or compilation)."""
    if request.read_bytes_per_second <= 0:
        raise PlannerError("read throughput must be positive")
    read_s = math.ceil(checkpoint_bytes / request.read_bytes_per_second)
    compile_s = 0 if request.enforce_eager else TORCH_COMPILE_S
    graph_s = 0 if request.enforce_eager else CUDA_GRAPH_CAPTURE_S
    total = read_s + ENGINE_INIT_S + compile_s + graph_s
    shard_s = min(checkpoint_bytes, DEFAULT_SHARD_BYTES) / request.read_bytes_per_second
    silent = max(shard_s, compile_s, graph_s, ENGINE_INIT_S)
    return StartupEstimate(
        read_s=read_s,
        engine_init_s=ENGINE_INIT_S,
        compile_s=compile_s,
        cuda_graph_s=graph_s,
        health_start_period_s=max(
            MIN_HEALTH_START_PERIOD_S, _round_up(total * HEALTH_START_PERIOD_MARGIN, 30)
        ),
        stall_timeout_s=max(MIN_STALL_TIMEOUT_S, _round_up(silent * STALL_TIMEOUT_MARGIN, 30)),
        engine_ready_timeout_s=max(
            VLLM_DEFAULT_ENGINE_READY_TIMEOUT_S, _round_up(total * ENGINE_READY_TIMEOUT_MARGIN, 60)
        ),
    )
