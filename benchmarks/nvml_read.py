"""The host agent's NVML read on a real GPU: wall and CPU time per snapshot, and nvmlInit once.

Times ``gpus.collectors.read_nvml()`` — the agent's first source: every field Berth reads from
NVML for every GPU (``Nvml.dump``), then ``parse_nvml_json`` — ``--reads`` times, and the two
halves apart. Counts ``nvmlInit`` calls (must be 1 per process, B14 in benchmarks/README.md; target
<= 50 ms wall per 8-GPU snapshot, extrapolated from the GPUs present when there are fewer than
eight: a calculation, said so in the output). Where NVML finds no GPU (this repository's CI
machine) it says so and records nothing::

    .venv/bin/python benchmarks/nvml_read.py [--reads 200] [--quick]
    python3 benchmarks/nvml_read.py --standalone     # a GPU host with nvidia-ml-py, no Django

Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import emit_json, print_table, summary, target

SNAPSHOT_GPUS = 8
WALL_TARGET_MS = 50


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reads", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="50 reads")
    parser.add_argument(
        "--standalone",
        action="store_true",
        help="without Django (collectors only read settings for the Docker and nvidia-smi "
        "sources, which this script does not use)",
    )
    args = parser.parse_args()
    if args.quick:
        args.reads = min(args.reads, 50)
    return args


def import_collectors(standalone: bool) -> types.ModuleType:
    if standalone:
        django = types.ModuleType("django")
        conf = types.ModuleType("django.conf")
        conf.settings = None  # never read on the NVML path
        django.conf = conf
        sys.modules.setdefault("django", django)
        sys.modules.setdefault("django.conf", conf)
    else:
        from benchmarks._common import setup_django

        setup_django()
    from gpus import collectors

    return collectors


def counting_init(library: types.ModuleType) -> list[int]:
    """Wrap ``nvmlInit`` to count its calls; returns the counter (a one-item list)."""
    calls = [0]
    original = library.nvmlInit

    def init(*args: object, **kwargs: object) -> None:
        calls[0] += 1
        original(*args, **kwargs)

    library.nvmlInit = init
    return calls


def timed(function, reads: int) -> tuple[list[float], list[float], object]:
    wall, cpu, result = [], [], None
    for _ in range(reads):
        started_wall, started_cpu = time.perf_counter(), time.process_time()
        result = function()
        wall.append((time.perf_counter() - started_wall) * 1000)
        cpu.append((time.process_time() - started_cpu) * 1000)
    return wall, cpu, result


def main() -> None:
    args = parse_args()
    collectors = import_collectors(args.standalone)
    try:
        import pynvml
    except ImportError as exc:
        unavailable(f"pynvml is not importable: {exc}")
        return
    inits = counting_init(pynvml)
    try:
        first = collectors.read_nvml()
    except collectors.CollectorError as exc:
        unavailable(str(exc))
        return
    count = len(first.gpus)
    read_wall, read_cpu, _ = timed(collectors.read_nvml, args.reads)
    dump_wall, _, dump = timed(collectors.NVML.dump, args.reads)
    parse_wall, _, _ = timed(lambda: collectors.parse_nvml_json(dump), args.reads)
    read, cpu, dumped, parsed = (summary(v) for v in (read_wall, read_cpu, dump_wall, parse_wall))
    per_snapshot = read["median"] / count * SNAPSHOT_GPUS
    names = sorted({gpu.name for gpu in first.gpus})
    print(f"{count} GPU(s): {', '.join(names)}; driver {first.driver_version}; {args.reads} reads")
    print_table(
        [
            ("read_nvml (dump + parse) wall", read["median"], read["p95"], read["p99"]),
            ("read_nvml CPU", cpu["median"], cpu["p95"], cpu["p99"]),
            ("NVML.dump wall", dumped["median"], dumped["p95"], dumped["p99"]),
            ("parse_nvml_json wall", parsed["median"], parsed["p95"], parsed["p99"]),
        ],
        ("ms per snapshot", "median", "p95", "p99"),
    )
    print(
        f"per 8-GPU snapshot (calc: median x {SNAPSHOT_GPUS}/{count}): {per_snapshot:.2f} ms; "
        f"nvmlInit called {inits[0]} time(s) for {args.reads * 2 + 1} reads"
    )
    emit_json(
        "nvml_read",
        {
            "available": True,
            "gpus": count,
            "gpu_names": names,
            "driver": first.driver_version,
            "reads": args.reads,
            "read_wall_ms": read,
            "read_cpu_ms": cpu,
            "dump_wall_ms": dumped,
            "parse_wall_ms": parsed,
            "per_8_gpu_snapshot_ms_calc": round(per_snapshot, 3),
            "nvml_init_calls": inits[0],
            "targets": [
                target(
                    f"NVML read per 8-GPU snapshot ms (from {count})",
                    round(per_snapshot, 3),
                    "<= 50",
                    per_snapshot <= WALL_TARGET_MS,
                ),
                target("nvmlInit calls per process", inits[0], "1", inits[0] == 1),
            ],
        },
    )


def unavailable(why: str) -> None:
    print(f"NVML is not available here, nothing measured: {why}")
    emit_json(
        "nvml_read",
        {
            "available": False,
            "error": why,
            "targets": [target("NVML read per 8-GPU snapshot ms", "no GPU here", "<= 50", None)],
        },
    )


if __name__ == "__main__":
    main()
