"""``manage.py gpu_report FILE --json``: read GPUs from a saved nvidia-smi or NVML output.

Auto-detects ``nvidia-smi -q -x`` XML, ``nvidia-smi --query-gpu=... --format=csv`` (with header,
with or without units) and the NVML JSON dump. The JSON shape is stable (checks outside the
test suite read it)::

    {"gpus": [{"index", "uuid", "name", "memory_total_mib", "memory_used_mib",
               "utilization_gpu_pct", "temperature_c", "power_w",
               "processes": [{"pid", "used_memory_mib"}]}]}

``null`` where the source did not say; ``processes`` is ``null`` when the source does not list
processes (a --query-gpu CSV without ``--apps``), ``[]`` when it says there are none.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from gpus.parsers import ParseError, parse_any, parse_query_csv


class Command(BaseCommand):
    help = "Print the GPUs found in a saved nvidia-smi XML/CSV or NVML JSON output."
    # A file tool: it needs no database, so it runs where none is configured or reachable.
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("file", type=Path, help="the saved output ('-' is not accepted)")
        parser.add_argument("--json", action="store_true", help="print JSON (the stable form)")
        parser.add_argument(
            "--apps",
            type=Path,
            help="a --query-compute-apps CSV giving the processes of a --query-gpu CSV",
        )

    def handle(self, *args: Any, file: Path, json: bool, apps: Path | None, **options: Any) -> None:
        text = _read(file)
        try:
            if apps is not None:
                inventory = parse_query_csv(text, apps=_read(apps))
            else:
                inventory = parse_any(text)
        except ParseError as exc:
            raise CommandError(f"{file}: {exc}") from None
        if json:
            self.stdout.write(_dumps(inventory.report()))
            return
        self._table(inventory)

    def _table(self, inventory: Any) -> None:
        self.stdout.write(f"source: {inventory.source}")
        for note in inventory.notes:
            self.stdout.write(f"note: {note}")
        for gpu in inventory.gpus:
            index = "?" if gpu.index is None else gpu.index
            used = _mib(gpu.memory_used_mib)
            total = _mib(gpu.memory_total_mib)
            self.stdout.write(
                f"GPU {index}  {gpu.name or '?'}  {gpu.uuid or '?'}  {used} / {total} MiB  "
                f"util {_value(gpu.utilization_gpu_pct, '%')}  "
                f"{_value(gpu.temperature_c, ' C')}  {_value(gpu.power_w, ' W')}"
            )
            if gpu.processes is None:
                self.stdout.write("    processes: not listed by this source")
            for process in gpu.processes or ():
                self.stdout.write(
                    f"    pid {process.pid} {process.name}  {_mib(process.used_memory_mib)} MiB"
                )


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise CommandError(f"cannot read {path}: {exc.strerror}") from None


def _dumps(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2)


def _mib(value: int | None) -> str:
    return "?" if value is None else f"{value:,}"


def _value(value: Any, unit: str) -> str:
    return "?" if value is None else f"{value}{unit}"
