"""``manage.py inspect_model PATH [--json]``: inspect any readable directory (no mount needed).

Exit status, as linters do: 0 deployable, 1 not deployable (a finding of severity error; a path
that does not exist is one), 2 a usage error (bad arguments). ``--strict`` makes warnings exit 1
too. The JSON shape is stable (checks outside the test suite rely on it)::

    {"path", "architecture", "model_type", "parameter_count", "weights_bytes",
     "dtypes": {"BF16": bytes, ...}, "tokenizer": {"kind", "files"},
     "findings": [{"code", "severity", "message", "remedy"}], "ok"}
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand

from models_registry.inspection import inspect_directory

EXIT_FINDING = 1


class Command(BaseCommand):
    help = "Inspect a model directory: config, tokenizer, safetensors headers; print the findings."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("path", help="the model directory")
        parser.add_argument("--json", action="store_true", help="print one JSON object")
        parser.add_argument(
            "--strict", action="store_true", help="exit 1 on warnings too, not only on errors"
        )

    found = False

    def run_from_argv(self, argv: list[str]) -> None:
        super().run_from_argv(argv)
        if self.found:
            sys.exit(EXIT_FINDING)

    def handle(self, *args: Any, path: str, json: bool, strict: bool, **options: Any) -> None:
        report = inspect_directory(Path(path), display_path=path)
        self.found = not report.ok or (strict and bool(report.findings))
        if json:
            self.stdout.write(_dumps(report.as_json()))
            return
        self.stdout.write(f"{report.path}: {'OK' if report.ok else 'NOT DEPLOYABLE'}")
        self.stdout.write(
            f"  architecture: {report.architecture or '-'} ({report.model_type or '-'})"
        )
        count = f"{report.parameter_count:,}" if report.parameter_count is not None else "unknown"
        size = f"{report.weights_bytes:,}" if report.weights_bytes is not None else "unknown"
        self.stdout.write(f"  parameters: {count}; weights: {size} bytes {report.dtypes or ''}")
        self.stdout.write(
            f"  tokenizer: {report.tokenizer['kind'] or '-'} {report.tokenizer['files']}"
        )
        for finding in report.findings:
            self.stdout.write(f"  [{finding.severity}] {finding.code}: {finding.message}")
            self.stdout.write(f"      fix: {finding.remedy}")


def _dumps(value: dict[str, Any]) -> str:
    return json.dumps(value, sort_keys=False)
