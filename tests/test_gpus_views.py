"""GPU pages: who may open them, what they show for a busy, an idle and a broken host, and that
their query counts do not grow with the number of GPUs."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone

from accounts.models import User
from gpus import inventory
from gpus.hosts import register_host
from gpus.models import Host
from gpus.parsers import parse_any, parse_query_csv
from gpus.readings import Collection, SourceFailure

pytestmark = pytest.mark.django_db

H100 = Path(__file__).parent / "fixtures" / "gpu" / "h100-80gb"
PUBLIC = Path(__file__).parent / "fixtures" / "gpu" / "public"
PEOPLE = ("alice", "bob", "carol", "admin", "anonymous")
MATRIX = {
    "/gpus/": (200, 200, 403, 200, 302),
    "/gpus/hosts/gpu-busy/": (200, 200, 403, 200, 302),
    "/gpus/hosts/gpu-busy/0/": (200, 200, 403, 200, 302),
    "/gpus/hosts/no-such-host/": (404, 404, 403, 404, 302),
    "/gpus/hosts/gpu-busy/9/": (404, 404, 403, 404, 302),
}


def client_for(person: User | None) -> Client:
    client = Client()
    if person is not None:
        client.force_login(person)
    return client


@pytest.fixture
def busy_host(db: None) -> Host:
    """gpu-busy: the H100 capture with the foreign 21 GiB python process, read just now."""
    host = register_host("gpu-busy")[0]
    reading = parse_query_csv(
        (H100 / "nvidia-smi-query-busy.csv").read_text(),
        apps=(H100 / "nvidia-smi-compute-apps-busy.csv").read_text(),
    )
    inventory.store_collection(host, Collection(reading), timezone.now() - timedelta(seconds=1))
    return host


@pytest.mark.parametrize("path", list(MATRIX))
def test_permission_matrix(path: str, people: dict[str, User | None], busy_host: Host) -> None:
    got = tuple(client_for(people[name]).get(path).status_code for name in PEOPLE)
    assert got == MATRIX[path], dict(zip(PEOPLE, got, strict=True))


def test_dashboard_splits_memory_and_names_the_foreign_process(
    alice: User, busy_host: Host
) -> None:
    html = client_for(alice).get("/gpus/hosts/gpu-busy/").content.decode()
    assert "online" in html
    assert "foreign 21.0 GiB" in html
    assert "Berth 0 MiB" in html
    assert "free 58.2 GiB" in html
    assert "pid 435 <code>python3</code>" in html
    assert "placement avoids this GPU" in html
    assert 'class="membar-foreign" x="0.00" y="0" width="26.30"' in html  # 21453 / 81559
    assert "100 %" in html
    assert "70 °C" in html
    assert "688 W" in html


def test_unavailable_host_shows_each_source_error_and_no_gpus(alice: User) -> None:
    host = register_host("gpu-dark")[0]
    failures = (
        SourceFailure("nvml", "NVML: NVMLError_LibraryNotFound: NVML Shared Library Not Found"),
        SourceFailure("docker-nvidia-smi", 'could not select device driver "" with capabilities'),
    )
    inventory.store_collection(host, Collection(None, failures))
    html = client_for(alice).get("/gpus/").content.decode()
    assert "inventory unavailable" in html
    assert "NVML Shared Library Not Found" in html
    assert "could not select device driver" in html
    assert "No GPUs can be listed: every source failed (see the errors above)." in html
    assert html.index("could not select device driver") < html.index("No GPUs can be listed")


def test_gpu_page_draws_history_charts(alice: User, busy_host: Host) -> None:
    html = client_for(alice).get("/gpus/hosts/gpu-busy/0/?hours=1").content.decode()
    assert "GPU-c52ba79b-f39d-a388-315d-65a6606606ea" in html
    assert html.count("<polyline") == 5
    assert "1 reading in the last 1 h" in html
    assert "foreign" in html


def test_htmx_refresh_renders_only_the_live_part(alice: User, busy_host: Host) -> None:
    response = client_for(alice).get("/gpus/hosts/gpu-busy/", headers={"HX-Request": "true"})
    html = response.content.decode()
    assert "<html" not in html
    assert "foreign 21.0 GiB" in html


def test_list_page_queries_do_not_grow_with_gpus(
    alice: User, django_assert_max_num_queries: Any
) -> None:
    eight = parse_any((PUBLIC / "v100s-pcie-32gb-x8-q.xml").read_text())
    for number in range(6):
        host = register_host(f"gpu-{number:02}")[0]
        inventory.store_collection(host, Collection(eight))
    client = client_for(alice)
    with django_assert_max_num_queries(8):
        response = client.get("/gpus/")
    assert response.content.decode().count('class="gpu-row') == 48
