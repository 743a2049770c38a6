"""The stand-in engine image (``docker/test-engine/``), built locally. It is NOT vLLM.

It is invoked like ``vllm/vllm-openai`` (``ENTRYPOINT ["vllm", "serve"]``, then vLLM's flags),
prints vLLM's log milestones, refuses connections while "loading", then answers ``/health``,
``/v1/models`` and ``/metrics`` — so the whole deployment path runs on a machine without a GPU.
The tests (``tests/engine_image.py``) and ``manage.py berth_demo`` build it the same way::

    tag = build_engine_image(docker.from_env())   # "berth-test/engine:<hash of the inputs>"

The image is ``FROM scratch`` with Debian's static busybox (no registry needed) and tagged by
the content hash of its inputs, so each machine builds it once.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path
from typing import Any

ENGINE_DIR = Path(__file__).resolve().parents[2] / "docker" / "test-engine"
ENGINE_FILES = {"Dockerfile": 0o644, "vllm": 0o755, "http.sh": 0o755, "curl": 0o755}
ENGINE_PORT = 8000  # the port the engine listens on inside its container, as vLLM's default
ENGINE_REPOSITORY = "berth-test/engine"
BUSYBOX = Path("/usr/bin/busybox")
INSTALL_BUSYBOX = "install Debian's static busybox: sudo apt-get install busybox-static"


class StandInUnavailable(Exception):
    """The image cannot be built here; the message says what to install."""


def engine_health_command(port: int = ENGINE_PORT) -> list[str]:
    """The exec-form probe (without Docker's ``CMD``): ``curl`` is in the real
    vllm/vllm-openai image, and this image carries a small ``curl`` on busybox ``wget``."""
    url = f"http://127.0.0.1:{port}/health"
    return ["curl", "-fsS", "-o", "/dev/null", "--max-time", "5", url]


def engine_image_tag() -> str:
    """The tag of the image built from the current inputs (busybox included)."""
    _require_busybox()
    digest = hashlib.sha256(BUSYBOX.read_bytes())
    for name in sorted(ENGINE_FILES):
        digest.update(name.encode() + b"\0" + (ENGINE_DIR / name).read_bytes())
    return f"{ENGINE_REPOSITORY}:{digest.hexdigest()[:12]}"


def build_engine_image(client: Any) -> str:
    """Build the image through ``client`` (a Docker SDK client) unless the engine already has
    it; returns its tag. Raises StandInUnavailable when busybox is missing."""
    tag = engine_image_tag()
    if client.images.list(name=tag):
        return tag
    files = [(name, (ENGINE_DIR / name).read_bytes(), mode) for name, mode in ENGINE_FILES.items()]
    return build_from_files(client, tag, [*files, ("busybox", BUSYBOX.read_bytes(), 0o755)])


def build_from_files(client: Any, tag: str, files: list[tuple[str, bytes, int]]) -> str:
    """Build ``tag`` from an in-memory context of (name, content, mode) files, one of them the
    Dockerfile: no build directory on disk, no registry. Returns the tag."""
    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w") as archive:
        for name, data, mode in files:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            archive.addfile(info, io.BytesIO(data))
    context.seek(0)
    client.images.build(fileobj=context, custom_context=True, tag=tag, rm=True, forcerm=True)
    return tag


def _require_busybox() -> None:
    if not BUSYBOX.is_file():
        raise StandInUnavailable(f"{BUSYBOX} is missing: {INSTALL_BUSYBOX}")
