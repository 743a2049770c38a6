"""Planner throughput: plans per second over the published configs in
``tests/fixtures/model_configs/`` and a spread of GPU shapes, with and without a context limit.

Pure Python, no Django, no database::

    .venv/bin/python benchmarks/planner.py

Prints one line per (model, GPU shape) with the chosen TP and the largest context that fits,
then the throughput table (median of several runs), then one JSON line.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deployments.planner import GIB, PlanRequest, plan

CONFIGS = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "model_configs"
GPU_SHAPES = ((24, 1), (24, 2), (40, 4), (48, 8), (80, 1), (80, 8), (141, 8))
CONTEXTS = (None, 8192)
RUNS = 5


def cases() -> list[tuple[str, dict, PlanRequest]]:
    """Every (config, GPU shape, context) combination."""
    configs = {path.stem: json.loads(path.read_text()) for path in sorted(CONFIGS.glob("*.json"))}
    return [
        (name, config, PlanRequest(gpu_memory_bytes=gib * GIB, gpu_count=count, max_model_len=ctx))
        for name, config in configs.items()
        for gib, count in GPU_SHAPES
        for ctx in CONTEXTS
    ]


def plans_per_second(work: list[tuple[str, dict, PlanRequest]]) -> float:
    started = time.perf_counter()
    for _, config, request in work:
        plan(config, request)
    return len(work) / (time.perf_counter() - started)


def main() -> None:
    work = cases()
    for name, config, request in work:
        if request.max_model_len is None:
            result = plan(config, request)
            shape = f"{request.gpu_count}x{request.gpu_memory_bytes // GIB} GiB"
            chosen = result.tensor_parallel_size or "-"
            print(
                f"{name:32} {shape:12} TP {chosen!s:3} max_model_len "
                f"{result.max_model_len:>6} largest fitting {result.max_model_len_supported:>6}"
            )
    rates = [plans_per_second(work) for _ in range(RUNS)]
    median = statistics.median(rates)
    print(f"\n{'plans':>8} {'runs':>5} {'median plans/s':>15} {'min':>10} {'max':>10}")
    print(f"{len(work):>8} {RUNS:>5} {median:>15.0f} {min(rates):>10.0f} {max(rates):>10.0f}")
    print(
        json.dumps(
            {
                "benchmark": "planner",
                "plans": len(work),
                "runs": RUNS,
                "plans_per_second_median": round(median),
                "min": round(min(rates)),
                "max": round(max(rates)),
            }
        )
    )


if __name__ == "__main__":
    main()
