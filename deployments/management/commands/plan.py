"""``manage.py plan``: plan a deployment from a model directory or a config.json.

Used by checks outside the test suite, so the flags and the ``--json`` shape are stable::

    manage.py plan --config config.json --gpu-memory-gib 40 --gpus 4 --max-model-len 8192 --json
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from deployments.planning import (
    DEFAULT_GPU_MEMORY_UTILIZATION,
    DEFAULT_READ_BYTES_PER_SECOND,
    GIB,
    Plan,
    PlannerError,
    PlanRequest,
    plan,
)
from deployments.planning.model_files import read_config, read_weights_summary


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

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            config, summary = _read_model(options["model_dir"], options["config"])
            result = plan(config, _request(options), summary)
        except PlannerError as exc:
            raise CommandError(str(exc)) from exc
        if options["json"]:
            self.stdout.write(json.dumps(result.as_json(), indent=2))
        else:
            self.stdout.write(_text(result))


def _read_model(model_dir: Path | None, config_path: Path | None) -> tuple[dict, Any]:
    if model_dir is not None:
        return read_config(model_dir / "config.json"), read_weights_summary(model_dir)
    if config_path is None:
        raise CommandError("give --model-dir DIR or --config FILE")
    return read_config(config_path), None


def _request(options: dict[str, Any]) -> PlanRequest:
    free = options["gpu_free_gib"]
    return PlanRequest(
        gpu_memory_bytes=round(options["gpu_memory_gib"] * GIB),
        gpu_count=options["gpus"],
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
        memory = result.per_gpu
        lines.append(
            f"per GPU at TP {result.per_gpu_tensor_parallel_size}: budget "
            f"{gib(memory.budget_bytes)} = weights {gib(memory.weights_bytes)} + overhead "
            f"{gib(memory.overhead_bytes)} + KV cache {gib(memory.kv_cache_bytes)}"
        )
    lines += [f"  - {reason}" for reason in result.reasons]
    lines += [f"suggestion: {suggestion.message}" for suggestion in result.suggestions]
    startup = result.startup
    lines.append(
        f"start-up: ~{startup.total_s} s; health start period {startup.health_start_period_s} s, "
        f"stall timeout {startup.stall_timeout_s} s, "
        f"VLLM_ENGINE_READY_TIMEOUT_S={startup.engine_ready_timeout_s}"
    )
    return "\n".join(lines)
