"""The ``docker run`` line on a deployment's page, kept true while the page stays open.

The line is built once per page from the container spec (``launch_spec.docker_run_line``); the
live status pushed over SSE never rebuilds the spec. What changes while a page is open — the
published host port (picked at launch), the generation (in the container's name and label) and
the GPU devices (a restart reserves again) — is marked in the line, and each pushed status
carries those values, which htmx swaps into the marks (``hx-swap-oob`` in a ``<template>``)::

    --publish 127.0.0.1:<span class="run-line-port">30012</span>:8000
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe

from deployments.runtime.launcher import gpu_device_ids

# (pattern on the escaped line, CSS class of the value it marks)
MARKS = (
    (re.compile(r"(--publish \S+?:)(\d+)(:\d+)"), "run-line-port"),
    (re.compile(r"(--name \S+?-g)(\d+)( )"), "run-line-generation"),
    (re.compile(r"(berth\.generation=)(\d+)()"), "run-line-generation"),
    (re.compile(r"(&quot;device=)([^&\s]*)(&quot;)"), "run-line-gpus"),
)


@dataclass(frozen=True)
class Unreserved:
    """A GPU the deployment will get but has not been given yet: the line says ``device=?``
    until the reservation's ids are pushed."""

    uuid: str = ""
    index: str = "?"


def gpus_for_line(deployment: Any, allocations: Iterable[Any]) -> list[Any]:
    """The GPUs to build the line with: those held now, or placeholders before the launch
    reserves them (so the line has its ``--gpus`` to fill in)."""
    held = [allocation.gpu for allocation in allocations if allocation.active]
    return held or [Unreserved()] * deployment.gpu_count


def marked(line: str) -> SafeString:
    """``line`` escaped for HTML, with the values that change marked by class."""
    html = escape(line)
    for pattern, css in MARKS:
        html = pattern.sub(rf'\1<span class="{css}">\2</span>\3', html)
    return mark_safe(html)  # noqa: S308 - escaped above; only our own spans added


def current_values(deployment: Any, allocations: Iterable[Any]) -> dict[str, str]:
    """The marked values as they are now, for the pushed status."""
    return {
        "run-line-port": str(deployment.host_port or 0),
        "run-line-generation": str(deployment.generation),
        "run-line-gpus": ",".join(gpu_device_ids(gpus_for_line(deployment, allocations))),
    }
