"""Time to ready: the page-cache prewarm against ``dd`` and ``cat`` on the same files, same run.

Writes a model directory of safetensors-sized shard files under ``var/bench/time-to-ready/``
(one folder per process, deleted afterwards unless ``--keep``), then, several
rounds in a rotating order, for each reader: drop the files from the page cache
(``posix_fadvise(POSIX_FADV_DONTNEED)`` per file,
checked with ``mincore``: not ``/proc/sys/vm/drop_caches``, which would empty every other
process's cache too), read everything, and check that the files are resident afterwards::

    .venv/bin/python benchmarks/time_to_ready.py                 # 2 GiB in 4 shards, 3 rounds
    .venv/bin/python benchmarks/time_to_ready.py --size-gib 8 --shards 4 --rounds 5
    .venv/bin/python benchmarks/time_to_ready.py --quick         # 1 GiB, 2 rounds

Readers: ``dd if=F of=/dev/null bs=16M`` and ``cat F... > /dev/null`` (child processes,
argument lists), and ``deployments.runtime.prewarm.Prewarmer`` (``BERTH_PREWARM_THREADS``
threads, 64 MiB chunks, 16 MiB reads; also with 1 thread). Target (B2 in benchmarks/README.md):
prewarm >= 90% of dd's throughput.

Then what a prewarm saves an engine's load. The stand-in engine reads no weights
(``docker/test-engine/README.md``: it only counts shards), so the load is imitated the way
safetensors' default loader reads: mmap each file and touch every 4 KiB page in order. Cold
(nothing cached) against after a prewarm. The sequential read vs the mmap faults is also this
disk's figure for vLLM's ``eager``/``prefetch`` load strategies against the default mmap.

Last, the table of what each lever saves, published (the source named in each row) and from
this run, and one JSON line.
"""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import BASE_DIR, emit_json, print_table, setup_django, summary, target

GIB = 1024**3
GB = 10**9
WRITE_BLOCK = 16 * 1024**2
DEFAULT_SIZE_GIB = 2.0
TARGET_RATIO = 0.90


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gib", type=float, default=None, help="total size of the shards")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=None, help="rounds of every reader")
    parser.add_argument(
        "--threads", type=int, default=None, help="prewarm threads (BERTH_PREWARM_THREADS)"
    )
    parser.add_argument("--dir", type=Path, default=BASE_DIR / "var" / "bench" / "time-to-ready")
    parser.add_argument("--quick", action="store_true", help="1 GiB, 2 rounds")
    parser.add_argument("--keep", action="store_true", help="keep the shard files afterwards")
    parser.add_argument(
        "--standalone",
        action="store_true",
        help="no console settings (a GPU host with only Django on PYTHONPATH): 4 threads",
    )
    args = parser.parse_args()
    if args.size_gib is None:
        args.size_gib = 1.0 if args.quick else DEFAULT_SIZE_GIB
    if args.rounds is None:
        args.rounds = 2 if args.quick else 3
    return args


def check_room(directory: Path, total: int) -> None:
    """Refuse sizes that do not fit: the shards must fit on disk with room to spare, and in a
    third of available memory (or 'resident after' would measure eviction, not reading)."""
    from deployments.runtime.prewarm import available_memory_bytes

    directory.mkdir(parents=True, exist_ok=True)
    free_disk = shutil.disk_usage(directory).free
    if total > free_disk * 0.5:
        raise SystemExit(
            f"--size-gib {total / GIB:.1f}: only {free_disk / GIB:.1f} GiB free on {directory}"
        )
    available = available_memory_bytes()
    if total > available / 3:
        raise SystemExit(
            f"--size-gib {total / GIB:.1f}: more than a third of available memory "
            f"({available / GIB:.1f} GiB); use a smaller size"
        )


def make_shards(directory: Path, total: int, count: int) -> list[Path]:
    """``count`` shard files adding up to ``total`` bytes of incompressible data, in a folder
    of this process's own."""
    model = directory / f"model-{os.getpid()}"  # concurrent runs never share files
    model.mkdir(parents=True, exist_ok=True)
    size = total // count
    block = bytearray(os.urandom(WRITE_BLOCK))
    shards = []
    for number in range(1, count + 1):
        path = model / f"model-{number:05d}-of-{count:05d}.safetensors"
        with path.open("wb") as out:
            written = 0
            while written < size:
                block[:8] = written.to_bytes(8, "little")  # no two blocks alike
                out.write(block[: min(WRITE_BLOCK, size - written)])
                written += WRITE_BLOCK
        shards.append(path)
    return shards


def drop(files: list[Path]) -> float:
    """Drop every file from the page cache; returns the largest share still resident."""
    from deployments.runtime.prewarm import drop_from_page_cache, resident_fraction

    for path in files:
        drop_from_page_cache(path)
    return max(resident_fraction(path) for path in files)


def resident(files: list[Path]) -> float:
    from deployments.runtime.prewarm import resident_fraction

    total = sum(p.stat().st_size for p in files)
    return sum(resident_fraction(p) * p.stat().st_size for p in files) / total


def read_dd(files: list[Path]) -> None:
    dd = shutil.which("dd") or "/bin/dd"
    for path in files:
        subprocess.run(
            [dd, f"if={path}", "of=/dev/null", "bs=16M"], check=True, capture_output=True
        )


def read_cat(files: list[Path]) -> None:
    cat = shutil.which("cat") or "/bin/cat"
    subprocess.run([cat, *map(str, files)], check=True, stdout=subprocess.DEVNULL)


def read_prewarm(files: list[Path], threads: int) -> None:
    from deployments.runtime.prewarm import Prewarmer

    result = Prewarmer(files, threads=threads).run()
    if result.bytes_read != result.total_bytes or result.errors:
        raise SystemExit(f"prewarm read {result.bytes_read} of {result.total_bytes}: {result}")


def mmap_load(files: list[Path]) -> None:
    """safetensors' default access: map the file, fault every page in, in order."""
    page = mmap.PAGESIZE
    for path in files:
        with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, prot=mmap.PROT_READ) as m:
            for offset in range(0, len(m), page):
                m[offset]  # the read is the point: it faults the page in


def timed(work) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def measure_readers(files: list[Path], rounds: int, threads: int) -> dict[str, dict]:
    total = sum(p.stat().st_size for p in files)
    readers = {
        "dd bs=16M": lambda: read_dd(files),
        "cat": lambda: read_cat(files),
        f"prewarm ({threads} threads)": lambda: read_prewarm(files, threads),
        "prewarm (1 thread)": lambda: read_prewarm(files, 1),
    }
    names = list(readers)
    rates: dict[str, list[float]] = {name: [] for name in names}
    worst_cold, worst_after = 0.0, 1.0
    for round_number in range(rounds):
        shift = round_number % len(names)
        for name in names[shift:] + names[:shift]:  # alternate the order: no reader always first
            worst_cold = max(worst_cold, drop(files))
            seconds = timed(readers[name])
            worst_after = min(worst_after, resident(files))
            rates[name].append(total / seconds / GB)
    return {
        "rates": rates,
        "resident_before_max": round(worst_cold, 4),
        "resident_after_min": round(worst_after, 4),
    }


def measure_engine_load(files: list[Path], rounds: int, threads: int) -> dict[str, list[float]]:
    """Seconds: the mmap load cold; the prewarm alone; the mmap load after it."""
    cold, prewarm, warm = [], [], []
    for _ in range(rounds):
        drop(files)
        cold.append(timed(lambda: mmap_load(files)))
        drop(files)
        prewarm.append(timed(lambda: read_prewarm(files, threads)))
        warm.append(timed(lambda: mmap_load(files)))
    return {"cold_mmap_s": cold, "prewarm_s": prewarm, "warm_mmap_s": warm}


def levers(engine: dict[str, float], dd_rate: float, sequential_rate: float) -> list[tuple]:
    """What each lever saves: published figures (source in brackets) and this run's."""
    return [
        (
            "prewarm (page cache)",
            "140 GB from NFS at ~0.2 GB/s ~12 min -> ~10 s from page cache "
            "[vllm#19824]; 70B weights ~10 s hot",
            f"mmap load {engine['cold_mmap_s']:.2f} s cold -> {engine['warm_mmap_s']:.2f} s "
            f"after prewarm ({engine['prewarm_s']:.2f} s, overlapping container start)",
        ),
        (
            "load strategy eager/prefetch",
            "mmap on network volumes 30-50x slower [ComfyUI#2288]; SGLang threaded load "
            "24:46 -> 6:11 [sglang#18124]",
            f"this disk: sequential read {sequential_rate:.2f} GB/s vs mmap faults "
            f"{engine['bytes'] / engine['cold_mmap_s'] / GB:.2f} GB/s (local, not network)",
        ),
        (
            "Run:ai streamer",
            "Llama-3-8B GP3 47.99 s -> 14.34 s (concurrency 16); IO2 7.53 s, ~6x [NVIDIA blog]",
            "not measurable here (no GPU, no vLLM image); flags chosen per storage kind",
        ),
        (
            "compile cache kept",
            "[tensorfuse]: 8B compile 42 -> 13 s, capture 54 -> 7 s; 70B "
            "saves most of ~70 s torch.compile",
            "not timed (no GPU); the cache volume survives stop/restart (tests/test_launch_spec)",
        ),
        (
            "reference storage ceiling",
            "Gen4 NVMe ~7 GB/s (140 GB ~21 s); 10 GbE 1.25 GB/s (112 s)",
            f"this disk: dd {dd_rate:.2f} GB/s",
        ),
    ]


def main() -> None:
    args = parse_args()
    if not args.standalone:
        setup_django()
    if args.threads is None:
        from django.conf import settings

        from deployments.runtime.prewarm import DEFAULT_THREADS

        args.threads = DEFAULT_THREADS if args.standalone else settings.BERTH_PREWARM_THREADS
    total = int(args.size_gib * GIB) // args.shards * args.shards
    check_room(args.dir, total)
    started = time.perf_counter()
    files = make_shards(args.dir, total, args.shards)
    print(f"{args.shards} shards, {total / GIB:.2f} GiB in {files[0].parent} "
          f"(ready in {time.perf_counter() - started:.1f} s)")  # fmt: skip
    try:
        readers = measure_readers(files, args.rounds, args.threads)
        engine_runs = measure_engine_load(files, args.rounds, args.threads)
    finally:
        if not args.keep:
            for path in files:
                path.unlink(missing_ok=True)
            files[0].parent.rmdir()

    stats = {name: summary(values) for name, values in readers["rates"].items()}
    names = list(stats)
    dd_median, cat_median, prewarm_median, single_median = (stats[n]["median"] for n in names)
    ratio_dd = prewarm_median / dd_median
    ratio_best = prewarm_median / max(dd_median, cat_median)
    print(f"\nCold read throughput (GB/s = 10^9 B/s), {args.rounds} rounds, order rotated; "
          f"resident before <= {readers['resident_before_max']:.1%}, "
          f"after >= {readers['resident_after_min']:.1%}")  # fmt: skip
    print_table(
        [(n, s["median"], s["min"], s["max"], f"{s['spread_pct']}%") for n, s in stats.items()],
        ("reader", "median GB/s", "min", "max", "spread"),
    )
    single = single_median / dd_median
    print(f"prewarm / dd = {ratio_dd:.0%}, prewarm / best of dd and cat = {ratio_best:.0%} "
          f"(target >= {TARGET_RATIO:.0%}); 1 thread / dd = {single:.0%}")  # fmt: skip

    engine = {key: statistics.median(values) for key, values in engine_runs.items()}
    engine["bytes"] = total
    print("\nEngine load imitation (mmap, every 4 KiB page in order), median seconds")
    print_table(
        [
            ("mmap load, cold", engine["cold_mmap_s"], min(engine_runs["cold_mmap_s"])),
            ("prewarm alone", engine["prewarm_s"], min(engine_runs["prewarm_s"])),
            ("mmap load after prewarm", engine["warm_mmap_s"], min(engine_runs["warm_mmap_s"])),
        ],
        ("phase", "median s", "min s"),
    )
    saved = engine["cold_mmap_s"] - engine["warm_mmap_s"]
    print(f"saved on the load when the prewarm overlaps the container start: {saved:.2f} s "
          f"({saved / engine['cold_mmap_s']:.0%})")  # fmt: skip

    table = levers(engine, dd_median, prewarm_median)
    print("\nWhat each lever saves")
    print_table(table, ("lever", "published", "this run"))
    emit_json(
        "time_to_ready",
        {
            "bytes": total,
            "shards": args.shards,
            "rounds": args.rounds,
            "threads": args.threads,
            "cache_drop": "posix_fadvise DONTNEED per file, checked with mincore",
            "resident_before_max": readers["resident_before_max"],
            "resident_after_min": readers["resident_after_min"],
            "throughput_gb_s": stats,
            "prewarm_vs_dd": round(ratio_dd, 3),
            "prewarm_vs_best": round(ratio_best, 3),
            "prewarm_1_thread_vs_dd": round(single_median / dd_median, 3),
            "engine_load_s": {k: summary(v) for k, v in engine_runs.items()},
            "levers": [dict(zip(("lever", "reference", "ours"), r, strict=True)) for r in table],
            "targets": [
                target("prewarm / dd throughput", round(ratio_dd, 3), ">= 0.90",
                       ratio_dd >= TARGET_RATIO),
                # Not 1.0: on this VM the hypervisor reclaims page cache (buff/cache stays under
                # ~1 GiB with 22 GiB free), so a fraction of a percent of what a reader brought in
                # can be gone by the time mincore looks; what matters is that reads were whole.
                target("resident after every read", readers["resident_after_min"], ">= 0.99",
                       readers["resident_after_min"] >= 0.99),
            ],
        },
    )  # fmt: skip


if __name__ == "__main__":
    main()
