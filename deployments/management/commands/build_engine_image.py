"""``manage.py build_engine_image vllm-cpu [--json] [--allow-list NAME]``: the real CPU engine.

Builds the image of ``docker/<recipe>/`` on the local Docker engine unless it is already there
(its tag is a hash of the recipe, so a second run only checks), prints its reference, and with
``--allow-list NAME`` allow-lists it as a CPU engine (audited). Progress goes to stderr, so
``--json`` prints one JSON object on stdout::

    {"image": "berth/vllm-cpu:0.32.0-…", "engine_version": "0.32.0", "built": false,
     "seconds": 0.01, "size_bytes": …}
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

import docker
from deployments.runtime.engine_build import (
    API_TIMEOUT_S,
    INSTALL_DOCKER,
    EngineBuildError,
    Sources,
    build,
    image_reference,
    load_recipe,
)
from deployments.runtime.engine_images import allow_list_cpu_engine


def sources_from_settings() -> Sources:
    """The package sources and wheel cache of this console's settings."""
    return Sources(
        debian_mirror=settings.BERTH_ENGINE_DEBIAN_MIRROR,
        pip_index_url=settings.BERTH_ENGINE_PIP_INDEX_URL,
        torch_index_url=settings.BERTH_ENGINE_TORCH_INDEX_URL,
        wheelhouse=Path(settings.BERTH_ENGINE_WHEELHOUSE),
    )


class Command(BaseCommand):
    help = "Build (once per recipe hash) a real engine image from docker/<recipe>/, e.g. vllm-cpu."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("recipe", help="a directory of docker/ with a recipe.toml: vllm-cpu")
        parser.add_argument("--json", action="store_true", help="print one JSON object")
        parser.add_argument(
            "--reference-only",
            action="store_true",
            help="print the image reference the recipe builds, without Docker or downloads",
        )
        parser.add_argument(
            "--allow-list",
            metavar="NAME",
            default="",
            help="also allow-list the image as a CPU engine under this name (audited)",
        )

    def handle(self, *args: Any, recipe: str, **options: Any) -> None:
        try:
            loaded = load_recipe(recipe)
            if options["reference_only"]:
                self.stdout.write(image_reference(loaded))
                return
            client = _client()
            try:
                result = build(loaded, client, sources_from_settings(), progress=self._progress)
            finally:
                client.close()
        except EngineBuildError as exc:
            raise CommandError(str(exc)) from None
        if options["allow_list"]:
            try:
                line = allow_list_cpu_engine(
                    options["allow_list"], result.image, result.engine_version
                )
            except ValidationError as exc:
                raise CommandError(f"--allow-list: {exc}") from None
            self._progress(line)
        if options["json"]:
            self.stdout.write(json.dumps(result.to_json()))
            return
        verb = "built" if result.built else "already present"
        self.stdout.write(
            f"{result.image}: {verb} in {result.seconds:.1f} s "
            f"({recipe} {result.engine_version}, {result.size_bytes / 2**30:.2f} GiB)"
        )

    def _progress(self, line: str) -> None:
        print(line, file=sys.stderr, flush=True)  # noqa: T201 - progress, separate from --json


def _client() -> Any:
    try:
        client = docker.from_env(timeout=API_TIMEOUT_S)
        client.ping()
    except Exception as exc:  # docker raises several unrelated types when there is no engine
        raise EngineBuildError(f"Docker is not reachable ({exc}): {INSTALL_DOCKER}") from None
    return client
