"""``manage.py plan``: plan a deployment from a model directory or a config.json.

Used by checks outside the test suite, so the flags and the ``--json`` shape are stable::

    manage.py plan --config config.json --gpu-memory-gib 40 --gpus 4 --max-model-len 8192 --json

Exit status, as linters do: 0 the model fits, 1 it does not fit (the plan is still printed),
2 a usage error (bad arguments, a config that cannot be read or planned).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from deployments.planning import (
    DEFAULT_GPU_MEMORY_UTILIZATION,
    DEFAULT_READ_BYTES_PER_SECOND,
    GIB,
    GpuMemory,
    Plan,
    PlannerError,
    PlanRequest,
    plan,
)
from deployments.planning.model_files import read_config, read_weights_summary

EXIT_DOES_NOT_FIT = 1
EXIT_USAGE = 2  # argparse's own status for bad arguments


class Command(BaseCommand):
    help = (
        "Plan a vLLM deployment: memory per GPU, the smallest valid tensor-parallel size and "
        "the context that fits."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        source = parser.add_mutually_exclusive_group(required=True)
        source.add_argument(
            "--model-dir",
            type=Path,
            help="model directory (config.json + *.safetensors, whose headers give exact counts)",
        )
        source.add_argument("--config", type=Path, help="a config.json file")
        parser.add_argument(
            "--gpu-memory-gib", type=float, required=True, help="total memory of one GPU, GiB"
        )
        parser.add_argument("--gpus", type=int, required=True, help="GPUs on one host")
        parser.add_argument(
            "--gpu-memory-utilization", type=float, default=DEFAULT_GPU_MEMORY_UTILIZATION
        )
        parser.add_argument(
            "--max-model-len",
            type=int,
            default=None,
            help="default: the model's own maximum, as vLLM derives it",
        )
        parser.add_argument("--dtype", default="auto")
        parser.add_argument("--kv-cache-dtype", default="auto")
        parser.add_argument(
            "--tp",
            type=int,
            default=None,
            help="evaluate this tensor-parallel size instead of choosing one",
        )
        parser.add_argument("--max-num-batched-tokens", type=int, default=None)
        parser.add_argument("--max-num-seqs", type=int, default=None)
        parser.add_argument("--enforce-eager", action="store_true")
        parser.add_argument(
            "--gpu-free-gib",
            type=float,
            default=None,
            help="memory free on each GPU now; vLLM refuses to start below the budget",
        )
        parser.add_argument(
            "--read-gb-per-s",
            type=float,
            default=DEFAULT_READ_BYTES_PER_SECOND / 10**9,
            help="checkpoint read throughput assumed for the start-up estimate",
        )
        parser.add_argument("--json", action="store_true", help="print the plan as JSON")

    does_not_fit = False

    def run_from_argv(self, argv: list[str]) -> None:
        super().run_from_argv(argv)
        if self.does_not_fit:
            sys.exit(EXIT_DOES_NOT_FIT)

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            config, summary = _read_model(options["model_dir"], options["config"])
            result = plan(config, _request(options), summary)
        except PlannerError as exc:
            raise CommandError(str(exc), returncode=EXIT_USAGE) from exc
        self.does_not_fit = not result.fits
        if options["json"]:
            self.stdout.write(json.dumps(result.as_json(), indent=2))
        else:
            self.stdout.write(_text(result))


def _read_model(model_dir: Path | None, config_path: Path | None) -> tuple[dict, Any]:
    if model_dir is not None:
        return read_config(model_dir / "config.json"), read_weights_summary(model_dir)
    if config_path is None:
        raise CommandError("give --model-dir DIR or --config FILE", returncode=EXIT_USAGE)
    return read_config(config_path), None


def _request(options: dict[str, Any]) -> PlanRequest:
    free = options["gpu_free_gib"]
    return PlanRequest(
        gpu_memory_bytes=round(options["gpu_memory_gib"] * GIB),
        gpus_on_host=options["gpus"],
        gpu_memory_utilization=options["gpu_memory_utilization"],
        max_model_len=options["max_model_len"],
        dtype=options["dtype"],
        kv_cache_dtype=options["kv_cache_dtype"],
        tensor_parallel_size=options["tp"],
        max_num_batched_tokens=options["max_num_batched_tokens"],
        max_num_seqs=options["max_num_seqs"],
        enforce_eager=options["enforce_eager"],
        gpu_free_bytes=None if free is None else round(free * GIB),
        read_bytes_per_second=options["read_gb_per_s"] * 10**9,
    )


def gib(size: float) -> str:
    """Bytes as GiB with one decimal."""
    return f"{size / GIB:.1f} GiB"


def tenths_adding_up(total: int, parts: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
    """``total`` and ``parts`` (bytes, parts summing to total) in tenths of a GiB, rounded so
    that the printed parts add up to the printed total: each part is floored, and the tenths
    still missing go to the parts with the largest remainders (each stays within 0.1 GiB)."""
    tenth = GIB / 10
    shown_total = round(total / tenth)
    floors = [int(part // tenth) for part in parts]
    by_remainder = sorted(
        range(len(parts)), key=lambda i: parts[i] / tenth - floors[i], reverse=True
    )
    for index in by_remainder[: max(0, shown_total - sum(floors))]:
        floors[index] += 1
    return shown_total, tuple(floors)


def budget_equation(memory: GpuMemory) -> str:
    """One GPU's budget as an equation that holds in the printed figures: what it holds when
    weights and overhead fit, or by how much they exceed it."""
    if memory.shortfall_bytes == 0:
        total, (weights, overhead, kv) = tenths_adding_up(
            memory.budget_bytes,
            (memory.weights_bytes, memory.overhead_bytes, memory.kv_cache_bytes),
        )
        return (
            f"budget {total / 10:.1f} GiB = weights {weights / 10:.1f} + overhead "
            f"{overhead / 10:.1f} + KV cache {kv / 10:.1f} GiB"
        )
    need = memory.weights_bytes + memory.overhead_bytes
    _, (weights, overhead) = tenths_adding_up(need, (memory.weights_bytes, memory.overhead_bytes))
    total, (budget, short) = tenths_adding_up(need, (memory.budget_bytes, memory.shortfall_bytes))
    return (
        f"weights {weights / 10:.1f} + overhead {overhead / 10:.1f} = {total / 10:.1f} GiB "
        f"> budget {budget / 10:.1f} GiB (short by {short / 10:.1f} GiB): no memory left for "
        "the KV cache"
    )


def _text(result: Plan) -> str:
    """A plain-text plan for people at a terminal."""
    lines = [
        f"parameters: {result.parameter_count:,} "
        f"({'exact' if result.parameters_exact else 'from config.json'}), "
        f"weights {gib(result.weights_bytes)}",
        f"KV cache per token: {result.kv_bytes_per_token:,} bytes",
        f"valid tensor-parallel sizes: {list(result.valid_tensor_parallel_sizes)}",
        f"plan: {'TP ' + str(result.tensor_parallel_size) if result.fits else 'does not fit'}, "
        f"max_model_len {result.max_model_len} (largest that fits: "
        f"{result.max_model_len_supported})",
    ]
    if result.per_gpu:
        tp = result.per_gpu_tensor_parallel_size
        lines.append(f"per GPU at TP {tp}: {budget_equation(result.per_gpu)}")
    lines += [f"  - {reason}" for reason in result.reasons]
    lines += [f"suggestion: {suggestion.message}" for suggestion in result.suggestions]
    startup = result.startup
    lines.append(
        f"start-up: ~{startup.total_s} s; health start period {startup.health_start_period_s} s, "
        f"stall timeout {startup.stall_timeout_s} s, "
        f"VLLM_ENGINE_READY_TIMEOUT_S={startup.engine_ready_timeout_s}"
    )
    return "\n".join(lines)
