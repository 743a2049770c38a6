"""Filesystem sync of a storage mount with many model directories, and header-only inspection.

Builds a throw-away tree of N real (tiny) model directories — config.json, tokenizer files and
a safetensors file each — on a throw-away test database, then times the first sync (everything
registered and inspected), a second sync (nothing changed: must change nothing) and a third
after touching 1% of the models. Also times inspection of one checkpoint with many shards and
reports the bytes it read (headers only) against the bytes on disk::

    .venv/bin/python benchmarks/model_sync.py [--models 2000]
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
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

import django

django.setup()

from django.db import connection  # noqa: E402

SHARDS = 64


def build_tree(root: Path, count: int) -> None:
    from tests.model_dirs import write_model

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
    from tests.model_dirs import write_model

    directory = root / "sharded"
    write_model(directory, shards=1)
    (directory / "model.safetensors").unlink()
    from tests.model_dirs import write_safetensors

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
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", type=int, default=2000)
    args = parser.parse_args()
    old_name = connection.settings_dict["NAME"]
    connection.creation.create_test_db(verbosity=0, autoclobber=True)
    try:
        from accounts.models import Team
        from models_registry.models import Model, StorageMount

        with tempfile.TemporaryDirectory() as scratch:
            root = Path(scratch) / "models"
            started = time.perf_counter()
            build_tree(root, args.models)
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
            inspection = header_only_inspection(Path(scratch))
            if Model.objects.count() != args.models:
                raise SystemExit(f"expected {args.models} models, found {Model.objects.count()}")
        rows = [
            ("first sync (register + inspect all)", first_s, first),
            ("second sync (nothing changed)", second_s, second),
            ("third sync (1% touched)", third_s, third),
        ]
        print(
            f"database: {connection.vendor}; {args.models} model directories "
            f"(tree built in {built:.1f} s)"
        )
        for name, seconds, result in rows:
            print(
                f"{name:<38} {seconds:8.2f} s  {args.models / seconds:9.0f} dirs/s  "
                f"created={result.created} updated={result.updated} "
                f"unchanged={result.unchanged} missing={result.missing}"
            )
        print(
            f"inspection of {SHARDS} shards: {inspection['seconds'] * 1000:.1f} ms, read "
            f"{inspection['bytes_read']:,} of {inspection['bytes_on_disk']:,} bytes on disk"
        )
        idempotent = second.changed == 0
        print(f"second run changed nothing: {idempotent}")
        print(
            json.dumps(
                {
                    "benchmark": "model_sync",
                    "database": connection.vendor,
                    "models": args.models,
                    "first_s": round(first_s, 2),
                    "second_s": round(second_s, 2),
                    "third_s": round(third_s, 2),
                    "second_changed": second.changed,
                    "third_updated": third.updated,
                    "inspection": inspection,
                }
            )
        )
        if not idempotent:
            raise SystemExit("the second sync changed something")
    finally:
        connection.creation.destroy_test_db(old_name, verbosity=0)


if __name__ == "__main__":
    main()
