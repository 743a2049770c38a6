"""Filesystem sync of a storage mount with many model directories, and header-only inspection.

Builds a throw-away tree of N real (tiny) model directories — config.json, tokenizer files and
a safetensors file each — on a throw-away test database, then times the first sync (everything
registered and inspected), a second sync (nothing changed: must change nothing) and a third
after touching 1% of the models. Also times inspection of one checkpoint with many shards and
reports the bytes it read (headers only) against the bytes on disk::

    .venv/bin/python benchmarks/model_sync.py [--models 2000] [--database postgres] [--quick]

Bytes read are this process's ``rchar`` from ``/proc/self/io`` (every read() call, page cache
or not) around the inspection, so they include the small JSON files it opens too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import (
    database_url_for,
    emit_json,
    setup_django,
    target,
    throwaway_database,
)

SHARDS = 64


def build_tree(root: Path, count: int) -> None:
    from models_registry.tiny_model import write_model

    for index in range(count):
        write_model(root / "team-a" / f"org-{index % 50}" / f"model-{index:05d}")


def timed_sync(mount) -> tuple[float, object]:
    from models_registry.sync import sync_mount

    started = time.perf_counter()
    result = sync_mount(mount)
    return time.perf_counter() - started, result


def header_only_inspection(root: Path) -> dict:
    """Inspect a 64-shard checkpoint with 8 MiB of tensor data per shard; count bytes read."""
    from models_registry.inspection import inspect_directory
    from models_registry.tiny_model import write_model, write_safetensors

    directory = root / "sharded"
    write_model(directory, shards=1)
    (directory / "model.safetensors").unlink()

    weight_map = {}
    for number in range(SHARDS):
        shard = f"model-{number + 1:05d}-of-{SHARDS:05d}.safetensors"
        tensors = {f"layers.{number}.w{k}": ("BF16", (1024, 1024)) for k in range(4)}
        write_safetensors(directory / shard, tensors)
        weight_map |= dict.fromkeys(tensors, shard)
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    on_disk = sum(path.stat().st_size for path in directory.iterdir())
    before = _read_bytes()
    started = time.perf_counter()
    report = inspect_directory(directory)
    elapsed = time.perf_counter() - started
    read = _read_bytes() - before
    return {
        "shards": SHARDS,
        "seconds": round(elapsed, 4),
        "bytes_on_disk": on_disk,
        "bytes_read": read,
        "parameter_count": report.parameter_count,
        "ok": report.ok,
    }


def _read_bytes() -> int:
    """Bytes this process has read through read() calls (Linux /proc/self/io rchar)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=int, default=2000)
    parser.add_argument("--database", default="sqlite", help="sqlite, postgres or a URL")
    parser.add_argument("--quick", action="store_true", help="500 model directories")
    args = parser.parse_args()
    if args.quick:
        args.models = min(args.models, 500)
    setup_django(database_url_for(args.database))
    with throwaway_database() as vendor, tempfile.TemporaryDirectory() as scratch:
        result = measure(Path(scratch), args.models)
    report(vendor, args.models, result)


def measure(scratch: Path, count: int) -> dict:
    from accounts.models import Team
    from models_registry.models import Model, StorageMount

    root = scratch / "models"
    started = time.perf_counter()
    build_tree(root, count)
    built = time.perf_counter() - started
    Team.objects.create(slug="team-a", name="Team A")
    mount = StorageMount.objects.create(
        name="bench",
        canonical_prefix="/ceph/models",
        local_path=str(root),
        host_path="/ceph/models",
        container_path="/models",
    )
    first_s, first = timed_sync(mount)
    second_s, second = timed_sync(mount)
    for path in sorted(root.glob("team-a/*/model-*"))[::100]:
        os.utime(path / "config.json", ns=(1, 1))
    third_s, third = timed_sync(mount)
    inspection = header_only_inspection(scratch)
    if Model.objects.count() != count:
        raise SystemExit(f"expected {count} models, found {Model.objects.count()}")
    return {
        "built_s": built,
        "rows": [
            ("first sync (register + inspect all)", first_s, first),
            ("second sync (nothing changed)", second_s, second),
            ("third sync (1% touched)", third_s, third),
        ],
        "inspection": inspection,
    }


def report(vendor: str, count: int, result: dict) -> None:
    (_, first_s, _), (_, second_s, second), (_, third_s, third) = result["rows"]
    inspection = result["inspection"]
    built = result["built_s"]
    print(f"database: {vendor}; {count} model directories (tree built in {built:.1f} s)")
    for name, seconds, outcome in result["rows"]:
        print(
            f"{name:<38} {seconds:8.2f} s  {count / seconds:9.0f} dirs/s  "
            f"created={outcome.created} updated={outcome.updated} "
            f"unchanged={outcome.unchanged} missing={outcome.missing}"
        )
    share = inspection["bytes_read"] / inspection["bytes_on_disk"]
    print(
        f"inspection of {SHARDS} shards: {inspection['seconds'] * 1000:.1f} ms, read "
        f"{inspection['bytes_read']:,} of {inspection['bytes_on_disk']:,} bytes on disk "
        f"({share:.2%})"
    )
    idempotent = second.changed == 0
    print(f"second run changed nothing: {idempotent}")
    emit_json(
        "model_sync",
        {
            "database": vendor,
            "models": count,
            "first_s": round(first_s, 2),
            "second_s": round(second_s, 2),
            "third_s": round(third_s, 2),
            "first_dirs_per_s": round(count / first_s),
            "second_dirs_per_s": round(count / second_s),
            "third_dirs_per_s": round(count / third_s),
            "second_changed": second.changed,
            "third_updated": third.updated,
            "inspection": inspection,
            "targets": [
                target("first sync dirs/s", round(count / first_s), "record", None),
                target("unchanged sync dirs/s", round(count / second_s), "record", None),
                target("second sync changes", second.changed, "0", idempotent),
                target(
                    f"bytes read inspecting {SHARDS} shards (headers only)",
                    inspection["bytes_read"],
                    f"< 1% of {inspection['bytes_on_disk']:,}",
                    share < 0.01,
                ),
            ],
        },
    )
    if not idempotent:
        raise SystemExit("the second sync changed something")


if __name__ == "__main__":
    main()
