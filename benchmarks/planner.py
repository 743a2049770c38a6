"""Planner throughput: plans per second over the published configs in
``tests/fixtures/model_configs/`` and a spread of GPU shapes, with and without a context limit.

Pure Python, no Django, no database::

    .venv/bin/python benchmarks/planner.py [--runs 5] [--quick]

Prints one line per (model, GPU shape) with the chosen TP and the largest context that fits,
then the throughput table (median of several runs), then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import emit_json, print_table, summary, target
from deployments.planning import GIB, PlanRequest, plan

CONFIGS = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "model_configs"
GPU_SHAPES = ((24, 1), (24, 2), (40, 4), (48, 8), (80, 1), (80, 8), (141, 8))
CONTEXTS = (None, 8192)
RUNS = 5


def cases() -> list[tuple[str, dict, PlanRequest]]:
    """Every (config, GPU shape, context) combination."""
    configs = {path.stem: json.loads(path.read_text()) for path in sorted(CONFIGS.glob("*.json"))}
    return [
        (
            name,
            config,
            PlanRequest(gpu_memory_bytes=gib * GIB, gpus_on_host=count, max_model_len=ctx),
        )
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=RUNS)
    parser.add_argument("--quick", action="store_true", help="3 runs")
    args = parser.parse_args()
    runs = min(args.runs, 3) if args.quick else args.runs
    work = cases()
    for name, config, request in work:
        if request.max_model_len is None:
            result = plan(config, request)
            shape = f"{request.gpus_on_host}x{request.gpu_memory_bytes // GIB} GiB"
            chosen = result.tensor_parallel_size or "-"
            print(
                f"{name:32} {shape:12} TP {chosen!s:3} max_model_len "
                f"{result.max_model_len:>6} largest fitting {result.max_model_len_supported:>6}"
            )
    stats = summary([plans_per_second(work) for _ in range(runs)], digits=0)
    print()
    print_table(
        [(len(work), runs, stats["median"], stats["min"], stats["max"], f"{stats['spread_pct']}%")],
        ("plans", "runs", "median plans/s", "min", "max", "spread"),
    )
    emit_json(
        "planner",
        {
            "plans": len(work),
            "runs": runs,
            "plans_per_second_median": stats["median"],
            "min": stats["min"],
            "max": stats["max"],
            "spread_pct": stats["spread_pct"],
            "targets": [target("plans per second (median)", stats["median"], "record", None)],
        },
    )


if __name__ == "__main__":
    main()
