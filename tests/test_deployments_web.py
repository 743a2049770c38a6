"""Deployment pages and services: permissions, refusals that enqueue nothing, the live plan,
and the whole path through a real worker to a ready stand-in engine, pushed over SSE."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from importlib import import_module
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from django.apps import apps as django_apps
from django.test import AsyncClient, Client

from accounts.models import Team, User
from audit.models import AuditEvent
from core.queues import get_queue
from deployments.models import Deployment, EngineImage
from deployments.planning.stored import StoredPlan
from deployments.runtime import launcher
from deployments.runtime.engine_args import parse_engine_args
from deployments.services import plan_for
from deployments.states import State
from deployments.web.forms import DeployForm
from tests.conftest import BASE_DIR, subprocess_env
from tests.deployment_builders import host_with_gpus, registered_model
from tests.model_dirs import write_model

FIXTURES = Path(__file__).parent / "fixtures" / "model_configs"
PEOPLE = ("alice", "bob", "carol", "admin", "anonymous")


def client_for(person: User | None) -> Client:
    client = Client()
    if person is not None:
        client.force_login(person)
    return client


@pytest.fixture
def setup(team_a: Team, tmp_path: Path) -> dict[str, Any]:
    """Team A's tiny model on a 4 x H100 host, a vLLM image and a CPU stand-in image."""
    write_model(tmp_path / "team-a" / "tiny")
    model = registered_model(team_a, tmp_path, "tiny")
    model.config = json.loads((tmp_path / "team-a" / "tiny" / "config.json").read_text())
    model.save()
    vllm = EngineImage.objects.create(name="vllm", reference="vllm/vllm-openai:v0.11.0")
    return {"model": model, "host": host_with_gpus(count=4), "vllm": vllm, "team": team_a}


def form_data(setup: dict[str, Any], **changes: Any) -> dict[str, Any]:
    data = {
        "name": "tiny", "team": setup["team"].pk, "model": setup["model"].pk,
        "host": setup["host"].pk, "image": setup["vllm"].pk, "gpu_count": "",
        "max_model_len": "2048", "kv_cache_dtype": "auto", "dtype": "auto", "environment": "",
    }  # fmt: skip
    data.update(changes)
    return data


@pytest.mark.django_db
def test_permission_matrix(people: dict[str, User | None], setup: dict[str, Any]) -> None:
    deployment = Deployment.objects.create(
        name="tiny",
        team=setup["team"],
        model=setup["model"],
        host=setup["host"],
        image=setup["vllm"],
        gpu_count=1,
    )
    matrix = {
        ("get", "/deployments/"): (200, 200, 403, 200, 302),
        ("get", "/deployments/new/"): (200, 200, 403, 200, 302),
        ("get", f"/deployments/{deployment.public_id}/"): (200, 404, 403, 200, 302),
        ("post", f"/deployments/{deployment.public_id}/stop/"): (302, 404, 403, 302, 302),
        ("post", f"/deployments/{deployment.public_id}/delete/"): (302, 404, 403, 302, 302),
        ("post", f"/deployments/{deployment.public_id}/restart/"): (302, 404, 403, 302, 302),
    }
    for (method, path), expected in matrix.items():
        got = tuple(getattr(client_for(people[name]), method)(path).status_code for name in PEOPLE)
        assert got == expected, (method, path, dict(zip(PEOPLE, got, strict=True)))


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("changes", "field", "fragment"),
    [
        ({"environment": "LD_PRELOAD=/model/x.so"}, "environment", "arbitrary code"),
        ({"environment": "VLLM_USE_V1=0"}, "environment", "obsolete"),
        ({"environment": "not a pair"}, "environment", "KEY=VALUE"),
        ({"name": "../x"}, "name", "lowercase letters"),
        ({"name": "<script>"}, "name", "lowercase letters"),
        ({"gpu_count": "0"}, "gpu_count", "needs GPUs"),
        ({"gpu_count": "-1"}, "gpu_count", "greater than or equal to 0"),
        ({"gpu_count": "1e9"}, "gpu_count", "whole number"),
        ({"gpu_memory_utilization": "1.5"}, "gpu_memory_utilization", "between 0.1 and 0.98"),
        ({"gpu_memory_utilization": "NaN"}, "gpu_memory_utilization", "number"),
        ({"max_model_len": "4096; rm -rf /"}, "max_model_len", "whole number"),
        ({"gpu_count": "3"}, "gpu_count", "does not fit"),
    ],
)
def test_refusals_name_the_field_enqueue_nothing_and_are_audited(
    alice: User,
    setup: dict[str, Any],
    changes: dict[str, str],
    field: str,
    fragment: str,
    django_capture_on_commit_callbacks: Any,
) -> None:
    queue = get_queue(setup["host"].queue_name)
    queue.empty()
    with django_capture_on_commit_callbacks(execute=True):
        response = client_for(alice).post("/deployments/new/", form_data(setup, **changes))
    assert response.status_code == 200
    errors = response.context["form"].errors
    assert fragment in " ".join(errors.get(field, [])), errors
    assert not Deployment.objects.exists()
    assert queue.count == 0


@pytest.mark.django_db
def test_service_refusals_are_audited_as_denied(alice: User, setup: dict[str, Any]) -> None:
    client_for(alice).post(
        "/deployments/new/", form_data(setup, environment="CUDA_VISIBLE_DEVICES=0,1")
    )
    event = AuditEvent.objects.get(action="deployment.launch_requested")
    assert (event.outcome, event.actor_name) == ("denied", "alice")
    assert "CUDA_VISIBLE_DEVICES" in event.payload["reason"]


@pytest.mark.django_db
def test_other_teams_ids_are_refused(bob: User, setup: dict[str, Any]) -> None:
    response = client_for(bob).post("/deployments/new/", form_data(setup))
    errors = response.context["form"].errors
    assert "Select a valid choice" in " ".join(errors["team"] + errors["model"])
    assert not Deployment.objects.exists()


@pytest.mark.django_db
def test_the_plan_preview_draws_a_bar_per_gpu(alice: User, setup: dict[str, Any]) -> None:
    html = client_for(alice).post("/deployments/new/plan/", form_data(setup)).content.decode()
    assert "Fits</strong> at tensor-parallel size 1" in html
    assert html.count('class="gpu-bar"') == 1
    assert 'class="seg-weights"' in html
    assert 'class="seg-kv"' in html


@pytest.mark.django_db
def test_a_plan_that_does_not_fit_blocks_members_but_an_admin_can_override_with_a_reason(
    alice: User,
    admin: User,
    setup: dict[str, Any],
    tmp_path: Path,
    django_capture_on_commit_callbacks: Any,
) -> None:
    model = setup["model"]
    model.config = json.loads((FIXTURES / "llama-3.1-70b-instruct.json").read_text())
    model.parameter_count = model.weights_bytes = None
    model.save()
    setup["host"].gpus.update(memory_total_mib=40_960)
    response = client_for(alice).post(
        "/deployments/new/", form_data(setup, gpu_count="2", max_model_len="8192")
    )
    assert "the plan does not fit" in " ".join(response.context["form"].errors["gpu_count"])
    with django_capture_on_commit_callbacks(execute=True):
        response = client_for(admin).post(
            "/deployments/new/",
            form_data(
                setup,
                gpu_count="2",
                max_model_len="8192",
                override_reason="benchmarking the OOM on purpose",
            ),
        )
    assert response.status_code == 302
    assert AuditEvent.objects.get(action="deployment.plan_overridden").payload["reason"] == (
        "benchmarking the OOM on purpose"
    )
    get_queue(setup["host"].queue_name).empty()


@pytest.mark.redis
@pytest.mark.docker
@pytest.mark.django_db(transaction=True)
def test_deploy_through_a_real_worker_to_ready_then_stop(
    alice: User, setup: dict[str, Any], engine_image: str
) -> None:
    stand_in = EngineImage.objects.create(
        name="stand-in",
        reference=engine_image,
        gpu_capable=False,
        cpu_capable=True,
        is_stand_in=True,
        health_command=[
            "curl",
            "-fsS",
            "-o",
            "/dev/null",
            "--max-time",
            "5",
            "http://127.0.0.1:8000/health",
        ],
        environment={"ENGINE_LOAD_SECONDS": "1"},
    )
    client = client_for(alice)
    response = client.post("/deployments/new/", form_data(setup, image=stand_in.pk, gpu_count="0"))
    assert response.status_code == 302, response.context["form"].errors
    deployment = Deployment.objects.get()
    worker = subprocess.Popen(
        [
            sys.executable,
            str(BASE_DIR / "manage.py"),
            "berth_worker",
            setup["host"].queue_name,
            "--with-scheduler",
        ],
        env=subprocess_env(BERTH_MONITOR_INTERVAL_S="0.5"),
        cwd=BASE_DIR,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(deployment, State.READY)
        page = client.get(f"/deployments/{deployment.public_id}/").content.decode()
        for text in ("Ready", "docker run --detach", "stand-in engine"):
            assert text in page
        assert client.post(f"/deployments/{deployment.public_id}/stop/").status_code == 302
        _wait_for(deployment, State.STOPPED)
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        worker.stderr.close()
    states = list(deployment.events.filter(kind="state").values_list("state", flat=True))
    assert states == ["queued", "launching", "loading", "ready", "stopping", "stopped"]
    requested = AuditEvent.objects.get(action="deployment.launch_requested")
    launched = AuditEvent.objects.filter(
        action="deployment.state_changed", payload_json__contains='"new":"ready"'
    ).get()
    assert (launched.actor_name, launched.actor_kind, launched.request_id) == (
        "alice",
        "job",
        requested.request_id,
    )


def _wait_for(deployment: Deployment, state: State, deadline_s: float = 60) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        deployment.refresh_from_db()
        if deployment.state == state:
            return
        assert deployment.state != State.FAILED, (deployment.last_error, deployment.log_tail[-5:])
        time.sleep(0.2)
    raise AssertionError(
        f"still {deployment.state} after {deadline_s} s: {deployment.log_tail[-5:]}"
    )


@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
def test_the_stream_sends_the_current_state_then_each_change(
    alice: User, setup: dict[str, Any]
) -> None:
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    # A fresh event loop in its own thread: the browser tests' Playwright loop may be running in
    # this one.
    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(asyncio.run, _closing_connections(_stream_check(alice, setup))).result(
            timeout=60
        )


async def _closing_connections(check: Any) -> None:
    """Run ``check``, then close the database connections its ORM calls opened in asgiref's
    worker thread (PostgreSQL cannot drop a test database someone is still connected to)."""
    from asgiref.sync import sync_to_async
    from django.db import connections

    try:
        await check
    finally:
        await sync_to_async(connections.close_all)()


async def _stream_check(alice: User, setup: dict[str, Any]) -> None:
    from asgiref.sync import sync_to_async

    from deployments.changes import publish

    deployment = await Deployment.objects.acreate(
        name="tiny",
        team=setup["team"],
        model=setup["model"],
        host=setup["host"],
        image=setup["vllm"],
        gpu_count=1,
    )
    client = AsyncClient()
    await sync_to_async(client.force_login)(alice)
    response = await client.get(f"/deployments/{deployment.public_id}/stream/")
    assert response["Content-Type"] == "text/event-stream"
    chunks = response.streaming_content
    first = await anext(chunks)
    assert first.startswith(b"event: status\ndata: ")
    assert b"Pending" in first
    await Deployment.objects.filter(pk=deployment.pk).aupdate(state=State.QUEUED)
    await sync_to_async(publish)(deployment.pk)
    second = await anext(chunks)
    assert b"Queued" in second
    await chunks.aclose()


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("reference", "ok"),
    [
        ("vllm/vllm-openai:v0.11.0", True),
        ("vllm/vllm-openai@sha256:" + "a" * 64, True),
        ("registry.local:5000/team/vllm:v1", True),
        ("vllm/vllm-openai:v0.11.0; rm -rf /", False),
        ("$(id)", False),
        ("vllm/vllm-openai@sha256:short", False),
    ],
)
def test_engine_image_allow_list_in_the_admin(admin: User, reference: str, ok: bool) -> None:
    response = client_for(admin).post("/admin/deployments/engineimage/add/", {
        "name": "vllm", "reference": reference, "description": "", "gpu_capable": "on",
        "health_command": '["curl", "-fsS", "http://127.0.0.1:8000/health"]', "environment": "{}",
        "enabled": "on",
    })  # fmt: skip
    assert (response.status_code == 302) is ok
    assert EngineImage.objects.filter(reference=reference).exists() is ok
    assert AuditEvent.objects.filter(action="image.saved").exists() is ok


@pytest.mark.django_db
def test_engine_image_health_command_is_exec_form_only(admin: User) -> None:
    response = client_for(admin).post("/admin/deployments/engineimage/add/", {
        "name": "vllm", "reference": "vllm/vllm-openai:v1", "gpu_capable": "on", "enabled": "on",
        "health_command": '["curl -f http://x || true"]', "environment": "{}",
    })  # fmt: skip
    assert response.status_code == 200
    assert "exec form" in response.content.decode()


@pytest.mark.django_db
def test_detail_shows_allocated_gpu_memory_and_delete_only_when_finished(
    alice: User, setup: dict[str, Any], django_capture_on_commit_callbacks: Any
) -> None:
    from deployments.models import GpuAllocation

    deployment = Deployment.objects.create(
        name="tiny",
        team=setup["team"],
        model=setup["model"],
        host=setup["host"],
        image=setup["vllm"],
        gpu_count=1,
        state=State.READY,
    )
    gpu = setup["host"].gpus.get(index=2)
    type(gpu).objects.filter(pk=gpu.pk).update(
        memory_used_mib=40_000, memory_berth_mib=30_000, memory_foreign_mib=10_000
    )
    GpuAllocation.objects.create(deployment=deployment, gpu=gpu, generation=1)
    client = client_for(alice)
    html = client.get(f"/deployments/{deployment.public_id}/").content.decode()
    assert "GPU memory now" in html
    assert "GPU 2: Berth 30000 MiB, foreign 10000 MiB of 81559 MiB" in html
    assert "/delete/" not in html  # a running deployment offers Stop, not Delete
    response = client.post(f"/deployments/{deployment.public_id}/delete/", follow=True)
    assert "only a failed or stopped deployment can be deleted" in response.content.decode()
    Deployment.objects.filter(pk=deployment.pk).update(state=State.STOPPED)
    queue = get_queue(setup["host"].queue_name)
    queue.empty()
    with django_capture_on_commit_callbacks(execute=True):
        assert (
            client.post(f"/deployments/{deployment.public_id}/delete/")["Location"]
            == "/deployments/"
        )
    assert queue.job_ids == [f"delete-{deployment.pk}-1"]
    requests = AuditEvent.objects.filter(action="deployment.delete_requested")
    assert list(requests.values_list("outcome", flat=True)) == ["ok", "denied"]  # newest first
    queue.empty()


@pytest.mark.django_db
def test_a_plan_past_the_team_quota_is_refused_with_the_numbers(
    alice: User, setup: dict[str, Any]
) -> None:
    setup["team"].gpu_quota = 0
    setup["team"].save()
    response = client_for(alice).post("/deployments/new/", form_data(setup))
    errors = " ".join(response.context["form"].errors["gpu_count"])
    assert "quota exceeded: team team-a uses 0 of 0 GPUs and this plan needs 1" in errors
    assert not Deployment.objects.exists()
    assert AuditEvent.objects.get(action="deployment.launch_requested").outcome == "denied"


@pytest.mark.django_db
def test_remote_code_only_for_models_an_admin_approved(
    alice: User, admin: User, setup: dict[str, Any], django_capture_on_commit_callbacks: Any
) -> None:
    response = client_for(alice).post("/deployments/new/", form_data(setup, trust_remote_code="on"))
    assert "not approved for remote code" in " ".join(
        response.context["form"].errors["trust_remote_code"]
    )
    admin_client = client_for(admin)
    admin_client.post("/admin/models_registry/model/", {
        "action": "approve_remote_code", "_selected_action": [setup["model"].pk],
    })  # fmt: skip
    assert AuditEvent.objects.get(action="model.remote_code_approved").target_id == str(
        setup["model"].pk
    )
    with django_capture_on_commit_callbacks(execute=True):
        response = client_for(alice).post(
            "/deployments/new/", form_data(setup, trust_remote_code="on")
        )
    assert response.status_code == 302
    deployment = Deployment.objects.get()
    assert deployment.engine_args["trust_remote_code"] is True
    get_queue(setup["host"].queue_name).empty()


@pytest.mark.redis
@pytest.mark.django_db
def test_the_json_api_deploys_with_the_session_and_the_csrf_header(
    alice: User, setup: dict[str, Any], django_capture_on_commit_callbacks: Any
) -> None:
    client = Client(enforce_csrf_checks=True)
    client.force_login(alice)
    client.get("/deployments/new/")  # the CSRF cookie, as a page of the console would have it
    body = {
        "team": "team-a", "model": setup["model"].pk, "host": setup["host"].name,
        "image": "vllm", "name": "tiny", "engine_args": {"max_model_len": 2048},
        "environment": {"NCCL_DEBUG": "WARN"},
    }  # fmt: skip
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(
            "/deployments/api/",
            json.dumps(body),
            content_type="application/json",
            HTTP_X_CSRFTOKEN=client.cookies["csrftoken"].value,
        )
    assert response.status_code == 201, response.content
    deployment = Deployment.objects.get()
    assert response.json() == {
        "id": str(deployment.public_id),
        "state": "queued",
        "url": f"/deployments/{deployment.public_id}/",
        "replicas": 1,
        "hosts": ["gpu-01"],
    }
    assert deployment.environment == {"NCCL_DEBUG": "WARN"}
    assert get_queue(setup["host"].queue_name).job_ids == [f"launch-{deployment.pk}-1"]
    get_queue(setup["host"].queue_name).empty()


def test_the_json_api_reports_a_refusal_without_fields_as_whole_messages() -> None:
    from django.core.exceptions import PermissionDenied, ValidationError

    from deployments.web import api

    assert api._flat({"team": api._messages(PermissionDenied("not a member of team-b"))}) == {
        "team": "not a member of team-b"
    }
    assert api._flat({"team": api._messages(ValidationError(["quota", "exceeded"]))}) == {
        "team": "quota exceeded"
    }


def test_the_json_api_answers_sign_in_csrf_and_role_refusals_in_json(
    alice: User, carol: User
) -> None:
    anonymous = Client(enforce_csrf_checks=True).post(
        "/deployments/api/", "{}", content_type="application/json"
    )
    assert anonymous.status_code == 401
    assert "sign in first" in anonymous.json()["errors"]["session"]

    member = Client(enforce_csrf_checks=True)
    member.force_login(alice)
    no_token = member.post("/deployments/api/", "{}", content_type="application/json")
    assert no_token.status_code == 403
    assert "X-CSRFToken" in no_token.json()["errors"]["csrf"]

    auditor = Client()
    auditor.force_login(carol)
    refused = auditor.post("/deployments/api/", "{}", content_type="application/json")
    assert refused.status_code == 403
    assert refused.json() == {"errors": {"session": "only team members and admins may deploy"}}


def test_stream_channels_are_per_instance(settings: Any) -> None:
    """Redis pub/sub ignores database numbers: two consoles on one server must not cross."""
    from deployments.changes import channel

    settings.BERTH_INSTANCE = "east"
    east = channel(7)
    settings.BERTH_INSTANCE = "west"
    assert channel(7) != east
    assert "west" in channel(7)


@pytest.mark.django_db
def test_the_loading_page_shows_the_start_up_time_the_planner_expected(
    alice: User, setup: dict[str, Any]
) -> None:
    response = client_for(alice).post("/deployments/new/", form_data(setup))
    assert response.status_code == 302
    deployment = Deployment.objects.get(name="tiny")
    Deployment.objects.filter(pk=deployment.pk).update(state=State.LOADING)
    args = parse_engine_args({"max_model_len": 2048})
    expected = plan_for(setup["model"], setup["host"], args, None).startup.total_s
    html = client_for(alice).get(f"/deployments/{deployment.public_id}/").content.decode()
    assert f"about {expected} s expected" in html
    assert "<progress max=" in html  # a percentage, not the indeterminate bar


@pytest.mark.django_db
def test_the_live_status_shows_the_stored_port_without_rebuilding_the_spec(
    alice: User, setup: dict[str, Any]
) -> None:
    client_for(alice).post("/deployments/new/", form_data(setup))
    deployment = Deployment.objects.get(name="tiny")
    Deployment.objects.filter(pk=deployment.pk).update(state=State.LOADING, host_port=30123)
    page = f"/deployments/{deployment.public_id}/"
    with mock.patch("deployments.web.views.build_spec", wraps=launcher.build_spec) as build_spec:
        status = client_for(alice).get(page, headers={"HX-Request": "true"}).content.decode()
        assert build_spec.call_count == 0  # the pushed fragment holds no docker run line
        client_for(alice).get(page)
        assert build_spec.call_count == 1  # the whole page does, once
    assert "<html" not in status
    assert "engine on port 30123" in status


@pytest.mark.django_db
def test_the_migration_types_plans_stored_before_versions(setup: dict[str, Any]) -> None:
    migration = import_module("deployments.migrations.0003_stored_plan_version")
    args = parse_engine_args({"max_model_len": 2048})
    result = plan_for(setup["model"], setup["host"], args, None)
    legacy = {**result.as_json(), "gpu_memory_utilization": 0.9}  # what was stored before
    common = {"team": setup["team"], "model": setup["model"], "host": setup["host"]}
    rows = [
        Deployment.objects.create(
            name=name, image=setup["vllm"], gpu_count=1, plan=stored, **common
        )
        for name, stored in (("legacy", legacy), ("cpu", {}))
    ]
    migration.forwards(django_apps, None)
    legacy_row, cpu_row = (Deployment.objects.get(pk=row.pk) for row in rows)
    assert legacy_row.stored_plan == StoredPlan.from_plan(result, gpu_memory_utilization=0.9)
    assert cpu_row.plan == {}
    assert cpu_row.stored_plan is None
    migration.backwards(django_apps, None)
    assert "version" not in Deployment.objects.get(pk=legacy_row.pk).plan


@pytest.mark.django_db
def test_the_json_api_applies_the_deploy_forms_limits_and_filters(
    alice: User, setup: dict[str, Any]
) -> None:
    body = {
        "team": "team-a", "model": setup["model"].pk, "host": setup["host"].name,
        "image": "vllm", "name": "tiny", "engine_args": {"max_model_len": 2048},
    }  # fmt: skip
    too_many = {**body, "gpu_count": DeployForm.base_fields["gpu_count"].max_value + 1}
    setup["vllm"].enabled = False
    setup["vllm"].save()
    client = client_for(alice)
    answers = [
        client.post("/deployments/api/", json.dumps(doc), content_type="application/json")
        for doc in (too_many, body)
    ]
    assert "less than or equal to 16" in answers[0].json()["errors"]["gpu_count"]
    assert "no image with that name that you may use" in answers[1].json()["errors"]["image"]
    assert not Deployment.objects.exists()
