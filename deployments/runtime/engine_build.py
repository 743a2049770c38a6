"""Build the real CPU engine image (``docker/vllm-cpu/``) without a registry or BuildKit.

The recipe is a directory: ``recipe.toml`` (Debian suite and packages, wheel platform, entry
point), ``requirements.txt`` (every Python package, pinned) and ``install.sh`` (run inside the
build container). The image's tag is a hash over those files, so it is known before anything is
downloaded and a machine that has the image builds nothing::

    recipe = load_recipe("vllm-cpu")
    image_reference(recipe)           # "berth/vllm-cpu:0.32.0-3f2a9c1d07be"
    result = build(recipe, client, sources_from_settings(), progress=print)
    result.built, result.engine_version, result.seconds

Steps when the image is missing: a Debian root file system from ``mmdebstrap`` (imported into
Docker as the base image, itself tagged by the hash of its package list), a wheelhouse from
``pip download`` on this machine, the virtual environment installed in a throwaway container
that has the wheelhouse mounted read-only and no network, then ``docker commit`` with the entry
point and the engine's version (read by the installed package inside the container) as labels.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from docker.errors import ImageNotFound

RECIPES_DIR = Path(__file__).resolve().parents[2] / "docker"
RECIPE_FILES = ("recipe.toml", "requirements.txt", "install.sh")
# Bumped when this module changes what it makes from the same recipe.
BUILDER_FORMAT = "1"
LABEL_ENGINE_VERSION = "berth.engine.version"
LABEL_ENGINE = "berth.engine"
LABEL_RECIPE = "berth.engine.recipe"
BASE_REPOSITORY_SUFFIX = "-base"
VERSION_MARKER = "BERTH_ENGINE_VERSION="
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
TAIL_LINES = 30  # of a failed step's output, in the error
API_TIMEOUT_S = 1800  # committing a 4 GB container is one API call that takes minutes
INSTALL_TIMEOUT_S = 3600  # the venv install on 2 cores takes minutes, not an hour
INSTALL_MMDEBSTRAP = "install mmdebstrap: sudo apt-get install mmdebstrap"
INSTALL_DOCKER = (
    "install Docker Engine (Debian/Ubuntu: sudo apt-get install docker.io) and let this user "
    "reach it, or point DOCKER_HOST at an engine"
)
TORCH_INDEX_HINT = (
    "set BERTH_ENGINE_TORCH_INDEX_URL to PyTorch's CPU wheel index "
    "(https://download.pytorch.org/whl/cpu) for the torch ...+cpu pin, and "
    "BERTH_ENGINE_PIP_INDEX_URL if PyPI is mirrored"
)

Progress = Callable[[str], None]


class EngineBuildError(Exception):
    """The image cannot be built here; the message says what failed and what to install."""


@dataclass(frozen=True)
class Recipe:
    """An engine image recipe, read from ``docker/<name>/``."""

    name: str
    directory: Path
    engine: str
    repository: str
    suite: str
    variant: str
    packages: tuple[str, ...]
    python: str
    implementation: str
    abi: str
    glibc: str
    machine: str
    prefix: str
    entrypoint: tuple[str, ...]
    environment: dict[str, str]
    requirements: tuple[str, ...]  # "name==version", comments dropped

    @property
    def engine_version(self) -> str:
        """The pinned version of the engine distribution (the tag's readable part)."""
        for line in self.requirements:
            name, _, version = line.partition("==")
            if name == self.engine:
                return version
        raise EngineBuildError(f"{self.directory}/requirements.txt does not pin {self.engine}")


@dataclass(frozen=True)
class Sources:
    """Where packages come from. Empty means pip's own configuration (``pip config list``)."""

    debian_mirror: str
    pip_index_url: str = ""
    torch_index_url: str = ""
    wheelhouse: Path = Path("var/engine-wheels")


@dataclass(frozen=True)
class BuildResult:
    """What ``build_engine_image`` prints (``--json``)."""

    image: str
    engine_version: str
    built: bool
    seconds: float
    size_bytes: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def load_recipe(name: str) -> Recipe:
    """Read ``docker/<name>/``; a missing or malformed recipe raises EngineBuildError."""
    directory = RECIPES_DIR / name
    if not (directory / "recipe.toml").is_file():
        known = sorted(p.parent.name for p in RECIPES_DIR.glob("*/recipe.toml"))
        raise EngineBuildError(f"no engine recipe '{name}' (known: {', '.join(known)})")
    data = tomllib.loads((directory / "recipe.toml").read_text())
    try:
        return Recipe(
            name=name,
            directory=directory,
            engine=data["engine"],
            repository=data["repository"],
            suite=data["base"]["suite"],
            variant=data["base"]["variant"],
            packages=tuple(data["base"]["packages"]),
            python=data["wheels"]["python"],
            implementation=data["wheels"]["implementation"],
            abi=data["wheels"]["abi"],
            glibc=data["wheels"]["glibc"],
            machine=data["wheels"]["machine"],
            prefix=data["image"]["prefix"],
            entrypoint=tuple(data["image"]["entrypoint"]),
            environment=dict(data["image"].get("environment", {})),
            requirements=tuple(_requirement_lines(directory / "requirements.txt")),
        )
    except KeyError as exc:
        raise EngineBuildError(f"{directory}/recipe.toml lacks {exc}") from None


def _requirement_lines(path: Path) -> list[str]:
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    pinned = [line for line in lines if line]
    loose = [line for line in pinned if "==" not in line]
    if loose:
        raise EngineBuildError(f"{path}: every requirement must be pinned (==): {loose[:3]}")
    return pinned


def recipe_hash(recipe: Recipe) -> str:
    """sha256 over the recipe's files (names and contents) and the builder's format."""
    digest = hashlib.sha256(f"berth-engine-build/{BUILDER_FORMAT}\0".encode())
    for name in RECIPE_FILES:
        digest.update(name.encode() + b"\0" + (recipe.directory / name).read_bytes() + b"\0")
    return digest.hexdigest()


def wheel_set_hash(recipe: Recipe) -> str:
    """sha256 over what decides the wheels: the pins and the interpreter they are for."""
    key = [recipe.python, recipe.implementation, recipe.abi, recipe.glibc, recipe.machine]
    return hashlib.sha256(json.dumps([key, list(recipe.requirements)]).encode()).hexdigest()


def image_reference(recipe: Recipe) -> str:
    """``<repository>:<engine version>-<hash>``, computable before anything is downloaded."""
    return f"{recipe.repository}:{recipe.engine_version}-{recipe_hash(recipe)[:12]}"


def base_reference(recipe: Recipe, mirror: str) -> str:
    """The imported Debian root file system, tagged by what went into it."""
    key = json.dumps([recipe.suite, recipe.variant, sorted(recipe.packages), mirror])
    return (
        f"{recipe.repository}{BASE_REPOSITORY_SUFFIX}:{recipe.suite}-"
        + (hashlib.sha256(key.encode()).hexdigest()[:12])
    )


def existing_image(client: Any, reference: str) -> Any | None:
    try:
        return client.images.get(reference)
    except ImageNotFound:
        return None


def build(recipe: Recipe, client: Any, sources: Sources, progress: Progress) -> BuildResult:
    """Make sure the recipe's image exists on ``client``'s engine; build it when missing."""
    started = time.monotonic()
    reference = image_reference(recipe)
    image = existing_image(client, reference)
    if image is not None:
        return _result(reference, image, built=False, started=started)
    progress(f"building {reference} (nothing on this engine has that tag)")
    base = ensure_base_image(recipe, client, sources, progress)
    wheelhouse = download_wheels(recipe, sources, progress)
    image = install_and_commit(recipe, client, base, wheelhouse, reference, progress)
    return _result(reference, image, built=True, started=started)


def _result(reference: str, image: Any, *, built: bool, started: float) -> BuildResult:
    return BuildResult(
        image=reference,
        engine_version=image.labels.get(LABEL_ENGINE_VERSION, ""),
        built=built,
        seconds=round(time.monotonic() - started, 3),
        size_bytes=int(image.attrs.get("Size", 0)),
    )


def ensure_base_image(recipe: Recipe, client: Any, sources: Sources, progress: Progress) -> str:
    """The Debian root file system as an image: mmdebstrap, then ``docker import``."""
    reference = base_reference(recipe, sources.debian_mirror)
    if existing_image(client, reference) is not None:
        progress(f"[1/4] base file system {reference}: present")
        return reference
    mmdebstrap = shutil.which("mmdebstrap")
    if mmdebstrap is None:
        raise EngineBuildError(f"mmdebstrap is missing: {INSTALL_MMDEBSTRAP}")
    progress(
        f"[1/4] base file system: mmdebstrap {recipe.suite} ({recipe.variant}, "
        f"{len(recipe.packages)} packages) from {sources.debian_mirror}"
    )
    with tempfile.TemporaryDirectory(prefix="berth-engine-base-") as scratch:
        tarball = Path(scratch) / "rootfs.tar"
        argv = [
            mmdebstrap,
            f"--variant={recipe.variant}",
            f"--include={','.join(recipe.packages)}",
            recipe.suite,
            str(tarball),
            sources.debian_mirror,
        ]
        run_step(argv, "mmdebstrap", progress, hint=_mirror_hint(sources))
        progress(f"[1/4] importing {tarball.stat().st_size // 2**20} MiB into Docker")
        repository, tag = reference.rsplit(":", 1)
        client.api.import_image_from_file(str(tarball), repository=repository, tag=tag)
    return reference


def _mirror_hint(sources: Sources) -> str:
    return (
        f"is the Debian mirror reachable (BERTH_ENGINE_DEBIAN_MIRROR={sources.debian_mirror})? "
        "mmdebstrap needs root, or unprivileged user namespaces"
    )


def download_wheels(recipe: Recipe, sources: Sources, progress: Progress) -> Path:
    """Every pinned wheel for the image's Python, into a wheelhouse kept per pinned set (a
    rebuild after ``docker image rm`` or a change of the recipe's other files downloads
    nothing)."""
    wheelhouse = sources.wheelhouse.resolve() / wheel_set_hash(recipe)[:12]
    done = wheelhouse / ".complete"
    if done.is_file():
        progress(f"[2/4] wheelhouse {wheelhouse}: present")
        return wheelhouse
    wheelhouse.mkdir(parents=True, exist_ok=True)
    progress(
        f"[2/4] downloading {len(recipe.requirements)} wheels for Python {recipe.python} "
        f"into {wheelhouse}"
    )
    run_step(pip_download_argv(recipe, sources, wheelhouse), "pip download", progress,
             hint=TORCH_INDEX_HINT)  # fmt: skip
    done.write_text(image_reference(recipe) + "\n")
    for stale in wheelhouse.parent.iterdir():  # older recipes' wheels: their images are built
        if stale.is_dir() and stale != wheelhouse:
            shutil.rmtree(stale, ignore_errors=True)
    return wheelhouse


def pip_download_argv(recipe: Recipe, sources: Sources, wheelhouse: Path) -> list[str]:
    """``pip download`` of exactly the pinned set (``--no-deps``: the pins are the resolution),
    binary wheels for the image's interpreter, whatever Python runs Berth."""
    argv = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--python-version", recipe.python, "--implementation", recipe.implementation,
            "--abi", recipe.abi, "--abi", "abi3", "--abi", "none",
            *[f"--platform={platform}" for platform in wheel_platforms(recipe)],
            "--progress-bar", "off", "--dest", str(wheelhouse),
            "--requirement", str(recipe.directory / "requirements.txt")]  # fmt: skip
    if sources.pip_index_url:
        argv += ["--index-url", sources.pip_index_url]
    if sources.torch_index_url:
        argv += ["--extra-index-url", sources.torch_index_url]
    return argv


def wheel_platforms(recipe: Recipe) -> list[str]:
    """Every platform tag a wheel may carry to run on the image's glibc, newest first."""
    major, minor = (int(part) for part in recipe.glibc.split("."))
    machine = recipe.machine
    tags = [f"manylinux_{major}_{m}_{machine}" for m in range(minor, 4, -1)]
    legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
    tags += [f"{name}_{machine}" for m, name in legacy.items() if m <= minor]
    return [*tags, f"linux_{machine}"]


def install_and_commit(
    recipe: Recipe, client: Any, base: str, wheelhouse: Path, reference: str, progress: Progress
) -> Any:
    """Install the environment in a throwaway container, then commit it as ``reference``."""
    progress(f"[3/4] installing {len(recipe.requirements)} packages in a build container")
    container = client.containers.run(
        base,
        ["sh", "/recipe/install.sh", recipe.prefix, recipe.engine],
        detach=True,
        network_disabled=True,
        volumes={
            str(wheelhouse): {"bind": "/wheelhouse", "mode": "ro"},
            str(recipe.directory): {"bind": "/recipe", "mode": "ro"},
        },
        labels={LABEL_RECIPE: recipe.name},
    )
    try:
        tail: deque[str] = deque(maxlen=TAIL_LINES)
        for raw in container.logs(stream=True, follow=True):
            for line in raw.decode(errors="replace").splitlines():
                tail.append(line)
                progress(f"      {line}")
        status = container.wait(timeout=INSTALL_TIMEOUT_S)["StatusCode"]
        if status != 0:
            raise EngineBuildError(
                f"installing the engine failed (exit {status}):\n" + "\n".join(tail)
            )
        version = _engine_version(tail, recipe)
        progress(f"[4/4] committing {reference} (engine {recipe.engine} {version})")
        repository, tag = reference.rsplit(":", 1)
        container.commit(repository=repository, tag=tag, changes=_commit_changes(recipe, version))
    finally:
        container.remove(force=True)
    return client.images.get(reference)


def _engine_version(tail: deque[str], recipe: Recipe) -> str:
    marked = [line for line in tail if line.startswith(VERSION_MARKER)]
    versions = [line.removeprefix(VERSION_MARKER) for line in marked]
    if not versions:
        raise EngineBuildError(f"the build container did not report {recipe.engine}'s version")
    return versions[-1].strip()


def _commit_changes(recipe: Recipe, version: str) -> list[str]:
    """Dockerfile instructions applied by ``docker commit``: what a container of it runs."""
    return [
        f"ENTRYPOINT {json.dumps(list(recipe.entrypoint))}",
        "CMD []",
        "WORKDIR /",
        f"ENV PATH={recipe.prefix}/bin:{SYSTEM_PATH}",
        *(f"ENV {name}={value}" for name, value in sorted(recipe.environment.items())),
        f"LABEL {LABEL_ENGINE}={recipe.engine}",
        f"LABEL {LABEL_ENGINE_VERSION}={version}",
        f"LABEL {LABEL_RECIPE}={recipe.name}",
        "EXPOSE 8000",
    ]


def run_step(argv: list[str], what: str, progress: Progress, *, hint: str) -> None:
    """Run one exec-style step (argument list, no shell), relaying its output as progress; a
    failure raises with the output's tail and the hint."""
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    try:
        process = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
        )
    except OSError as exc:
        raise EngineBuildError(f"{what} could not start: {exc}") from None
    assert process.stdout is not None  # noqa: S101 - stdout=PIPE above
    with process:
        for line in process.stdout:
            tail.append(line.rstrip())
            progress(f"      {line.rstrip()}")
    if process.returncode != 0:
        output = "\n".join(tail)
        raise EngineBuildError(f"{what} failed (exit {process.returncode}): {hint}\n{output}")
