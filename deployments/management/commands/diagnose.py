"""``manage.py diagnose LOGFILE [--exit-code N] [--json]``: the root cause of an engine failure.

The JSON shape is stable (checks outside the test suite rely on it)::

    {"findings": [{"code", "title", "remedy", "line_number", "line"}]}   # root cause first

Exit status, as linters do: 0 no failure found (the one finding is ``none``), 1 a failure was
found, 2 a usage error (bad arguments, a log file that cannot be read).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from deployments.runtime.diagnostics import NONE, diagnose

EXIT_FOUND = 1
EXIT_USAGE = 2  # argparse's own status for bad arguments


class Command(BaseCommand):
    help = "Diagnose an engine log: most likely root cause first (code, title, remedy, line)."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("logfile", help="a vLLM container log ('-' for standard input)")
        parser.add_argument("--exit-code", type=int, help="the container's exit code, if known")
        parser.add_argument(
            "--oom-killed",
            choices=["true", "false"],
            help="Docker's OOMKilled flag (docker inspect): false with exit code 137 means killed "
            "from outside; left out, 137 is read as host out-of-memory",
        )
        parser.add_argument("--json", action="store_true", help="print one JSON object")

    found = False

    def run_from_argv(self, argv: list[str]) -> None:
        super().run_from_argv(argv)
        if self.found:
            sys.exit(EXIT_FOUND)

    def handle(
        self,
        *args: Any,
        logfile: str,
        exit_code: int | None,
        oom_killed: str | None = None,
        **options: Any,
    ) -> None:
        try:
            text = sys.stdin.read() if logfile == "-" else Path(logfile).read_text(errors="replace")
        except OSError as exc:
            message = f"cannot read {logfile}: {exc.strerror}"
            raise CommandError(message, returncode=EXIT_USAGE) from None
        flag = None if oom_killed is None else oom_killed == "true"
        findings = diagnose(text, exit_code=exit_code, oom_killed=flag)
        self.found = findings[0].code != NONE.code
        if options["json"]:
            self.stdout.write(json.dumps({"findings": [finding.as_json() for finding in findings]}))
            return
        for finding in findings:
            where = f"line {finding.line_number}: " if finding.line_number else ""
            self.stdout.write(f"{finding.code}: {finding.title}")
            if finding.line:
                self.stdout.write(f"  {where}{finding.line}")
            self.stdout.write(f"  fix: {finding.remedy}")
