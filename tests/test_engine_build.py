"""``manage.py build_engine_image``: the real CPU engine image's recipe, tag and build.

The tag is a content hash known before anything is downloaded; the build itself (minutes) runs
once per machine, in ``.ci/run`` before the suite; the tests marked ``vllm`` check the image it
made and that a second run only checks.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command

from audit.models import AuditEvent
from deployments.models import EngineImage
from deployments.runtime.engine_build import (
    LABEL_ENGINE_VERSION,
    EngineBuildError,
    Recipe,
    Sources,
    build,
    image_reference,
    load_recipe,
    pip_download_argv,
    recipe_hash,
    wheel_platforms,
)
from deployments.runtime.launch_spec import engine_version
from tests.conftest import run_manage, subprocess_env
from tests.vllm_engine import VLLM_VERSION

RECIPE = "vllm-cpu"


def _copy_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The real recipe copied where a test may change it (RECIPES_DIR pointed there)."""
    root = tmp_path / "docker"
    shutil.copytree(load_recipe(RECIPE).directory, root / RECIPE)
    monkeypatch.setattr("deployments.runtime.engine_build.RECIPES_DIR", root)
    return root / RECIPE


def test_tag_names_the_pinned_engine_version_and_a_hash_of_the_recipe() -> None:
    recipe = load_recipe(RECIPE)
    reference = image_reference(recipe)
    assert reference == f"berth/vllm-cpu:{VLLM_VERSION}-{recipe_hash(recipe)[:12]}"
    assert recipe.engine_version == VLLM_VERSION
    assert image_reference(load_recipe(RECIPE)) == reference  # stable across reads


@pytest.mark.parametrize("name", ["requirements.txt", "install.sh", "recipe.toml"])
def test_changing_any_recipe_file_changes_the_tag(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = image_reference(load_recipe(RECIPE))
    directory = _copy_recipe(tmp_path, monkeypatch)
    assert image_reference(load_recipe(RECIPE)) == before  # same content, same tag
    with (directory / name).open("a") as handle:
        handle.write("\n# changed\n")
    assert image_reference(load_recipe(RECIPE)) != before


def test_requirements_must_be_pinned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = _copy_recipe(tmp_path, monkeypatch)
    with (directory / "requirements.txt").open("a") as handle:
        handle.write("requests>=2\n")
    with pytest.raises(EngineBuildError, match=r"must be pinned \(==\): \['requests>=2'\]"):
        load_recipe(RECIPE)


def test_the_pinned_set_leaves_out_what_breaks_transformers() -> None:
    names = {line.partition("==")[0] for line in load_recipe(RECIPE).requirements}
    assert {"vllm-cpu", "torch", "transformers"} <= names
    assert not names & {"torchvision", "torchaudio", "torchcodec"}
    assert "torch==2.13.0+cpu" in load_recipe(RECIPE).requirements


def test_unknown_recipe_names_the_known_ones() -> None:
    with pytest.raises(EngineBuildError, match="no engine recipe 'vllm-gpu' \\(known: vllm-cpu\\)"):
        load_recipe("vllm-gpu")


def test_wheels_are_downloaded_for_the_images_python_not_berths() -> None:
    recipe = load_recipe(RECIPE)
    sources = Sources(debian_mirror="http://deb.example/debian", torch_index_url="https://t/cpu")
    argv = pip_download_argv(recipe, sources, Path("/w"))
    assert argv[argv.index("--python-version") + 1] == "3.11"
    assert argv[argv.index("--abi") + 1] == "cp311"
    assert {"--no-deps", "--only-binary=:all:"} <= set(argv)
    assert argv[argv.index("--extra-index-url") + 1] == "https://t/cpu"
    assert "--index-url" not in argv  # empty: pip's own configuration


def test_wheel_platforms_cover_older_manylinux_tags_down_to_manylinux1() -> None:
    platforms = wheel_platforms(load_recipe(RECIPE))
    assert platforms[0] == "manylinux_2_36_x86_64"
    # blake3's only wheel is manylinux_2_17/manylinux2014: a 2_28-only list missed it.
    assert {"manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"} <= set(platforms)


def test_reference_only_needs_no_docker() -> None:
    result = run_manage(
        "build_engine_image", RECIPE, "--reference-only",
        env=subprocess_env(DOCKER_HOST="unix:///nonexistent/docker.sock"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == image_reference(load_recipe(RECIPE))


def test_no_docker_says_what_to_install() -> None:
    result = run_manage(
        "build_engine_image", RECIPE, "--json",
        env=subprocess_env(DOCKER_HOST="unix:///nonexistent/docker.sock"),
    )  # fmt: skip
    assert result.returncode == 1
    assert "Docker is not reachable" in result.stderr
    assert "apt-get install docker.io" in result.stderr
    assert result.stdout == ""


@pytest.mark.docker
def test_missing_mmdebstrap_says_what_to_install(
    docker_client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A recipe whose base image is not on this engine needs mmdebstrap; with none on PATH the
    build stops before downloading anything."""
    directory = _copy_recipe(tmp_path, monkeypatch)
    with (directory / "recipe.toml").open("a") as handle:
        handle.write("\n# a recipe no engine has built\n")
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: nothing is found on it
    recipe: Recipe = load_recipe(RECIPE)
    sources = Sources(debian_mirror="http://deb.example/debian/" + tmp_path.name,
                      wheelhouse=tmp_path / "wheels")  # fmt: skip
    with pytest.raises(EngineBuildError, match="apt-get install mmdebstrap"):
        build(recipe, docker_client, sources, progress=lambda line: None)
    assert not (tmp_path / "wheels").exists()


@pytest.mark.vllm
def test_second_run_builds_nothing_and_reports_the_engine_version_label(
    vllm_image: str, docker_client: Any
) -> None:
    result = run_manage("build_engine_image", RECIPE, "--json", env=subprocess_env())
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["image"] == vllm_image
    assert report["built"] is False
    assert report["engine_version"] == VLLM_VERSION
    assert 0 <= report["seconds"] < 10
    labels = docker_client.images.get(vllm_image).labels
    assert labels[LABEL_ENGINE_VERSION] == VLLM_VERSION


@pytest.mark.vllm
@pytest.mark.django_db
def test_allow_list_makes_it_a_cpu_engine_once(vllm_image: str) -> None:
    call_command("build_engine_image", RECIPE, "--allow-list", "vllm-cpu")
    call_command("build_engine_image", RECIPE, "--allow-list", "vllm-cpu")
    image = EngineImage.objects.get(name="vllm-cpu")
    assert (image.reference, image.cpu_capable, image.gpu_capable) == (vllm_image, True, False)
    assert not image.is_stand_in
    # The second run changed nothing, so it recorded nothing.
    assert AuditEvent.objects.filter(action="image.saved").count() == 1


def test_version_gating_reads_the_engine_version_label_before_the_tag() -> None:
    label = {"berth.engine.version": VLLM_VERSION}
    assert engine_version("berth/vllm-cpu:0.32.0-e546ff0c5317", label) == (0, 32)
    assert engine_version("registry.local/vllm:latest", label) == (0, 32)  # no version in the tag
    assert engine_version("vllm/vllm-openai:v0.11.0", {"berth.engine.version": "0.18.1"}) == (0, 18)
    assert engine_version("vllm/vllm-openai:v0.11.0", {}) == (0, 11)
    assert engine_version("registry.local/vllm:latest", {"other": "1"}) is None
