"""``manage.py capture_engine_fixtures [--case NAME ...] [--help-only]``: the real engine's output
as test fixtures, in ``tests/fixtures/engine-logs/vllm-<major.minor>-cpu/``.

Runs the real CPU engine image (``build_engine_image vllm-cpu`` must have built it) once per
case of ``deployments.runtime.engine_captures.CASES``, one at a time, and writes each log with
the command and trigger that produced it (``captures.json``), plus the engine's ``--help=all``
(``help-all.txt``), from which a test checks every flag Berth can pass.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError

import docker
from deployments.runtime.engine_build import (
    API_TIMEOUT_S,
    existing_image,
    image_reference,
    load_recipe,
)
from deployments.runtime.engine_captures import (
    CASES,
    FIXTURES_DIR,
    capture,
    capture_help,
    write_fixtures,
)


def fixtures_dir(engine_version: str, recipe: str = "vllm-cpu") -> Path:
    """``vllm-0.32-cpu`` for vLLM 0.32.x: fixtures are kept per minor release."""
    major_minor = ".".join(engine_version.split(".")[:2])
    return FIXTURES_DIR / f"vllm-{major_minor}-{recipe.removeprefix('vllm-')}"


class Command(BaseCommand):
    help = "Capture the real CPU engine's logs for known failures, and its --help=all."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--recipe", default="vllm-cpu")
        parser.add_argument("--case", action="append", choices=sorted(CASES), default=[])
        parser.add_argument("--help-only", action="store_true", help="only --help=all")

    def handle(self, *args: Any, recipe: str, case: list[str], help_only: bool, **options: Any):
        loaded = load_recipe(recipe)
        image = image_reference(loaded)
        client = docker.from_env(timeout=API_TIMEOUT_S)
        try:
            if existing_image(client, image) is None:
                build = f"manage.py build_engine_image {recipe}"
                raise CommandError(f"{image} is not built: run {build}")
            target = fixtures_dir(loaded.engine_version, recipe)
            target.mkdir(parents=True, exist_ok=True)
            (target / "help-all.txt").write_text(capture_help(client, image))
            self.stdout.write(f"{target / 'help-all.txt'}: written")
            if help_only:
                return
            cases = [CASES[name] for name in case] or list(CASES.values())
            with tempfile.TemporaryDirectory(prefix="berth-capture-", dir="/tmp") as workdir:
                results = capture(
                client, image, cases, Path(workdir), progress=self._progress,
                keep=lambda result: write_fixtures(target, [result]),
            )  # fmt: skip
            self.stdout.write(f"{len(results)} logs written to {target}")
        finally:
            client.close()

    def _progress(self, line: str) -> None:
        print(line, file=sys.stderr, flush=True)  # noqa: T201 - progress on stderr
