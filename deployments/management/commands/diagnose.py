"""``manage.py diagnose LOGFILE [--exit-code N] [--json]``: the root cause of an engine failure.

The JSON shape is stable (checks outside the test suite rely on it)::

    {"findings": [{"code", "title", "remedy", "line_number", "line"}]}   # root cause first
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from deployments.runtime.diagnostics import diagnose


class Command(BaseCommand):
    help = "Diagnose an engine log: most likely root cause first (code, title, remedy, line)."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("logfile", help="a vLLM container log ('-' for standard input)")
        parser.add_argument("--exit-code", type=int, help="the container's exit code, if known")
        parser.add_argument("--json", action="store_true", help="print one JSON object")

    def handle(self, *args: Any, logfile: str, exit_code: int | None, **options: Any) -> None:
        try:
            text = (
                self.stdin.read() if logfile == "-" else Path(logfile).read_text(errors="replace")
            )
        except OSError as exc:
            raise CommandError(f"cannot read {logfile}: {exc.strerror}") from None
        findings = diagnose(text, exit_code=exit_code)
        if options["json"]:
            self.stdout.write(json.dumps({"findings": [finding.as_json() for finding in findings]}))
            return
        for finding in findings:
            where = f"line {finding.line_number}: " if finding.line_number else ""
            self.stdout.write(f"{finding.code}: {finding.title}")
            if finding.line:
                self.stdout.write(f"  {where}{finding.line}")
            self.stdout.write(f"  fix: {finding.remedy}")

    @property
    def stdin(self) -> Any:
        import sys

        return sys.stdin
