"""Hostile input: 31 attacks on the deploy form, the JSON API and model registration, each as
a numbered case.

Every case sends its input the way an attacker would (deploy form, JSON API, model
registration, sign-in, launch) and then the suite checks the same things for all of them:
a 4xx or a form error naming the field, **no job in any RQ queue** of the test Redis database
(on-commit callbacks executed, so an enqueue would really land), **no Docker call** (the one
Docker adapter, ``gpus.collectors.docker_client``, patched with autospec), no deployment
created, and an audit event with outcome ``denied`` for refusals of user actions. Rows whose
table entry expects something else (10 launch-time re-check, 27 CSRF, 28 lockout, 29
forwarded address, 30 double submit, 31 oversized bodies) say so in their outcome.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from django.http import HttpResponse
from django.test import Client
from redis import Redis
from rq import Queue

import docker
from accounts.models import Team, User
from audit.models import AuditEvent
from deployments.models import Deployment, EngineImage
from deployments.runtime import launcher
from deployments.states import State
from models_registry.models import Model
from models_registry.services import reinspect
from tests.conftest import PASSWORD
from tests.deployment_builders import (
    host_with_gpus,
    on_host,
    planned,
    registered_model,
    remove_engines,
)
from tests.model_dirs import write_model

pytestmark = [pytest.mark.redis, pytest.mark.django_db]
LAUNCH = "deployment.launch_requested"
REGISTER = "model.registered"
OTHER_DIGEST = "sha256:" + "b" * 64


@dataclass
class World:
    """Team A's inspected model on a 4-GPU host, team B's model, a vLLM image, a running team A
    deployment; clients signed in as alice (team A) and bob (team B)."""

    root: Path
    team_a: Team
    model: Any
    other_model: Any
    host: Any
    image: EngineImage
    deployment: Deployment
    alice: Client
    bob: Client
    adapter: mock.MagicMock
    settings: Any
    capture: Callable[..., Any]


@dataclass
class Outcome:
    """What a case expects beyond the defaults."""

    response: HttpResponse | None
    field: str | None  # the field the error names (None: no form or JSON errors expected)
    audit: str | None = LAUNCH  # the action audited as denied (None: not audited)
    jobs: int = 0
    deployments: int = 0  # deployments created
    docker_ok: bool = False  # the case calls the adapter itself (launch-time re-checks)


def form_data(w: World, **changes: Any) -> dict[str, Any]:
    data = {
        "name": "tiny", "team": w.team_a.pk, "model": w.model.pk, "host": w.host.pk,
        "image": w.image.pk, "gpu_count": "", "max_model_len": "2048", "kv_cache_dtype": "auto",
        "dtype": "auto", "environment": "",
    }  # fmt: skip
    data.update(changes)
    return data


def api_body(w: World, **changes: Any) -> dict[str, Any]:
    body = {
        "team": "team-a", "model": w.model.pk, "host": w.host.name, "image": "vllm",
        "name": "tiny", "engine_args": {"max_model_len": 2048},
    }  # fmt: skip
    body.update(changes)
    return body


def form(w: World, field_name: str, **changes: Any) -> Outcome:
    return Outcome(w.alice.post("/deployments/new/", form_data(w, **changes)), field_name)


def api(w: World, field_name: str | None, body: Any = None, **changes: Any) -> Outcome:
    raw = body if isinstance(body, bytes | str) else json.dumps(body or api_body(w, **changes))
    response = w.alice.post("/deployments/api/", raw, content_type="application/json")
    return Outcome(response, field_name)


def register(w: World, path: str) -> Outcome:
    response = w.alice.post("/models/register/", {"team": w.team_a.pk, "path": path})
    return Outcome(response, "path", audit=REGISTER)


def errors_of(response: HttpResponse) -> dict[str, str]:
    """Field → message, from a JSON refusal or the re-rendered form."""
    if response.get("Content-Type", "").startswith("application/json"):
        return response.json().get("errors", {})
    context_form = (response.context or {}).get("form") if response.context else None
    if context_form is None:
        return {}
    return {key: " ".join(messages) for key, messages in context_form.errors.items()}


# --- the cases, one function per variant, keyed "case-<row>-<what>" ------------------------------

CASES: dict[str, Callable[[World], Outcome]] = {}


def case(name: str) -> Callable[[Callable[[World], Outcome]], Callable[[World], Outcome]]:
    def add(function: Callable[[World], Outcome]) -> Callable[[World], Outcome]:
        CASES[name] = function
        return function

    return add


def paths_case(name: str, path: str) -> None:
    CASES[name] = lambda w: register(w, path)


# Rows 1-9: model paths, at registration.
paths_case("case-01-dotdot-segment", "/store/team-a/../../etc")
paths_case("case-04-prefix-trick", "/store-evil/x")
paths_case("case-04-other-teams-part", "/store/team-b/other")
for label, raw in {"relative": "relative/path", "tilde": "~/x", "empty": "", "root": "/"}.items():
    paths_case(f"case-05-{label}", raw)
for label, char in {"nul": "\0", "newline": "\n", "cr": "\r", "tab": "\t"}.items():
    paths_case(f"case-06-{label}", f"/store/team-a/ti{char}ny")
paths_case("case-07-fullwidth-slash", "/store/team-a\uff0ftiny")
paths_case("case-07-cyrillic-a", "/store/te\u0430m-a/tiny")
paths_case("case-07-nfkc-ligature", "/store/team-a/\ufb01ne")
paths_case("case-08-percent-encoded", "/store/team-a/..%2f..%2fetc")
paths_case("case-08-double-encoded", "/store/team-a/..%252f..%252fetc")
paths_case("case-09-5000-chars", "/store/team-a/" + "a/" * 2500)
paths_case("case-09-200-char-segment", "/store/team-a/" + "a" * 200)


def _linked_model(w: World, name: str, target: Path) -> Any:
    (w.root / "team-a" / name).symlink_to(target)
    model = registered_model(w.team_a, w.root, name)
    model.config = w.model.config
    model.save()
    return model


@case("case-02-symlink-to-etc")
def _(w: World) -> Outcome:
    # Registration keeps the model, with the finding, but it can never be deployed.
    (w.root / "team-a" / "evil").symlink_to("/etc")
    register(w, "/store/team-a/evil")
    model = Model.objects.get(path="/store/team-a/evil")
    assert not model.deployable
    assert "path-outside-storage" in [finding["code"] for finding in model.findings]
    return form(w, "model", model=model.pk)


@case("case-02-symlink-to-etc-past-the-registry")
def _(w: World) -> Outcome:
    model = _linked_model(w, "evil", Path("/etc"))  # as if the registry had been bypassed
    return form(w, "model", model=model.pk)


@case("case-03-symlink-to-other-team")
def _(w: World) -> Outcome:
    model = _linked_model(w, "borrowed", w.root / "team-b" / "other")
    return form(w, "model", model=model.pk)


@case("case-10-swapped-for-other-teams-model")
def _(w: World) -> Outcome:
    return _launch_after_swap(w, w.root / "team-b" / "other")


@case("case-10-swapped-within-the-team")
def _(w: World) -> Outcome:
    write_model(w.root / "team-a" / "lookalike")
    return _launch_after_swap(w, w.root / "team-a" / "lookalike")


def _launch_after_swap(w: World, target: Path) -> Outcome:
    """Valid at registration; the directory is replaced by a link before the host launches."""
    deployment = _queued(w, w.image)
    directory = w.root / "team-a" / "tiny"
    directory.rename(w.root / "team-a" / "tiny-as-registered")
    directory.symlink_to(target)
    assert on_host(launcher.launch, deployment, deployment.generation).startswith("failed")
    deployment.refresh_from_db()
    assert deployment.state == State.FAILED
    assert deployment.diagnosis[0]["code"] == "path-changed"
    w.adapter.return_value.containers.create.assert_not_called()
    return Outcome(None, None, audit="deployment.path_changed", deployments=1, docker_ok=True)


def _queued(w: World, image: EngineImage) -> Deployment:
    return Deployment.objects.create(
        name="swap", team=w.team_a, model=w.model, host=w.host, image=image, gpu_count=1,
        state=State.QUEUED, plan=planned(max_model_len=2048, gpu_memory_utilization=0.9),
    )  # fmt: skip


for label, reference in {
    "alpine": "alpine",
    "registry-image": "docker.io/evil/x:latest",
    "tag-not-allowed": "vllm/vllm-openai:latest",
    "reference-not-name": "vllm/vllm-openai:v0.11.0",
}.items():
    CASES[f"case-11-api-{label}"] = lambda w, reference=reference: api(w, "image", image=reference)
CASES["case-11-form-unknown-image-id"] = lambda w: form(w, "image", image="999999")
CASES["case-12-api-other-digest"] = lambda w: api(
    w, "image", image=f"vllm/vllm-openai@{OTHER_DIGEST}"
)


@case("case-12-host-image-has-another-digest")
def _(w: World) -> Outcome:
    pinned = EngineImage.objects.create(
        name="pinned", reference="vllm/vllm-openai@sha256:" + "a" * 64
    )
    client = w.adapter.return_value
    client.images.get.side_effect = docker.errors.ImageNotFound("no such image")
    client.images.list.return_value = [
        mock.Mock(id=OTHER_DIGEST, attrs={"RepoDigests": [f"vllm/vllm-openai@{OTHER_DIGEST}"]})
    ]
    deployment = _queued(w, pinned)
    assert on_host(launcher.launch, deployment, deployment.generation).startswith("failed")
    deployment.refresh_from_db()
    assert deployment.diagnosis[0]["code"] == "image-digest-mismatch"
    assert OTHER_DIGEST in deployment.last_error
    client.containers.create.assert_not_called()
    return Outcome(None, None, audit="deployment.image_refused", deployments=1, docker_ok=True)


DOCKER_KWARGS = {
    "privileged": True,
    "cap_add": ["SYS_ADMIN"],
    "network_mode": "host",
    "devices": ["/dev/sda"],
    "volumes": {"/": {"bind": "/host", "mode": "rw"}},
    "pid_mode": "host",
    "security_opt": ["seccomp=unconfined"],
}
for key, value in DOCKER_KWARGS.items():
    CASES[f"case-13-api-{key}"] = lambda w, key=key, value=value: api(w, key, **{key: value})
    CASES[f"case-13-form-{key}"] = lambda w, key=key, value=value: _form_extra(w, key, value)


def _form_extra(w: World, key: str, value: Any) -> Outcome:
    response = w.alice.post("/deployments/new/", {**form_data(w), key: json.dumps(value)})
    assert response.status_code == 400
    return Outcome(response, key)


ENV_REFUSALS = {
    "case-14-nvidia-visible-devices": "NVIDIA_VISIBLE_DEVICES=all",
    "case-14-cuda-visible-devices": "CUDA_VISIBLE_DEVICES=0,1,2,3",
    "case-15-ld-preload": "LD_PRELOAD=/model/x.so",
    "case-15-pythonpath": "PYTHONPATH=/model",
    "case-16-server-dev-mode": "VLLM_SERVER_DEV_MODE=1",
    "case-16-runtime-lora": "VLLM_ALLOW_RUNTIME_LORA_UPDATING=true",
    "case-17-1mb-value": "NCCL_DEBUG=" + "x" * 1_000_000,
    "case-17-500-variables": "\n".join(f"V{index}=1" for index in range(500)),
    "case-17-proxy": "HTTPS_PROXY=http://evil:3128",
}
for name, lines in ENV_REFUSALS.items():
    CASES[name] = lambda w, lines=lines: form(w, "environment", environment=lines)
for label, variables in {
    "name-with-equals": {"A=B": "1"},
    "name-starts-with-digit": {"1BAD": "1"},
    "empty-name": {"": "1"},
    "300-char-name": {"X" * 300: "1"},
    "newline-in-value": {"NCCL_DEBUG": "WARN\nLD_PRELOAD=/x.so"},
    "nul-in-value": {"NCCL_DEBUG": "WARN\0"},
    "value-not-text": {"NCCL_DEBUG": ["WARN"]},
}.items():
    CASES[f"case-17-api-{label}"] = lambda w, v=variables: api(w, "environment", environment=v)

for label, value in {"semicolon": "4096; rm -rf /", "dollar": "$(id)", "backtick": "`id`"}.items():
    CASES[f"case-18-form-{label}"] = lambda w, v=value: form(w, "max_model_len", max_model_len=v)
    CASES[f"case-18-api-{label}"] = lambda w, v=value: api(
        w, "max_model_len", engine_args={"max_model_len": v}
    )
CASES["case-18-api-flag-in-choice"] = lambda w: api(
    w, "dtype", engine_args={"dtype": "bfloat16 --trust-remote-code"}
)
CASES["case-19-form-remote-code"] = lambda w: form(w, "trust_remote_code", trust_remote_code="on")
CASES["case-19-api-remote-code"] = lambda w: api(
    w, "trust_remote_code", engine_args={"trust_remote_code": True}
)
for key, value in {
    "allowed_local_media_path": "/",
    "chat_template": "/etc/passwd",
    "tokenizer": "/store/team-b/x",
    "host": "0.0.0.0",  # noqa: S104  (row 21 from here: server-owned flags)
    "port": 22,
    "api_key": "sk-0123456789",
    "--host": "0.0.0.0",  # noqa: S104
    "download_dir": "/",
}.items():
    row = 20 if key in ("allowed_local_media_path", "chat_template", "tokenizer") else 21
    CASES[f"case-{row}-api-{key.lstrip('-')}{'-flag' if key.startswith('-') else ''}"] = (
        lambda w, key=key, value=value: api(w, key, engine_args={key: value})
    )

for label, value in {
    "zero": "0",
    "negative": "-1",
    "three": "3",
    "nine": "9",
    "all": "all",
}.items():
    CASES[f"case-22-form-{label}"] = lambda w, v=value: form(w, "gpu_count", gpu_count=v)
CASES["case-22-form-1e9"] = lambda w: form(w, "gpu_count", gpu_count="1e9")
for label, value in {"bool": True, "string": "2", "huge": 10**9, "float": 2.0}.items():
    CASES[f"case-22-api-{label}"] = lambda w, v=value: api(w, "gpu_count", gpu_count=v)
for label, value in {"1-5": "1.5", "nan": "NaN", "infinity": "Infinity"}.items():
    CASES[f"case-23-form-{label}"] = lambda w, v=value: form(
        w, "gpu_memory_utilization", gpu_memory_utilization=v
    )
CASES["case-23-api-trailing-space"] = lambda w: api(
    w, "gpu_memory_utilization", engine_args={"gpu_memory_utilization": "0.9 "}
)
CASES["case-23-api-bare-nan"] = lambda w: api(w, "body", b'{"team": "team-a", "gpu_count": NaN}')
for label, extra in {
    "cmd-shell": {"healthcheck": ["CMD-SHELL", "curl x || true"]},
    "interval-zero": {"health_interval_s": 0},
    "start-period": {"health_start_period_s": 10**15},
}.items():
    key = next(iter(extra))
    CASES[f"case-24-api-{label}"] = lambda w, key=key, extra=extra: api(w, key, **extra)

for label, value in {
    "dotdot": "../x",
    "markup": "<script>alert(1)</script>",
    "10kb": "a" * 10_240,
    "emoji": "model-\U0001f680",
    "option": "-rf",
}.items():
    CASES[f"case-25-form-{label}"] = lambda w, v=value: form(w, "name", name=v)
    CASES[f"case-25-api-{label}"] = lambda w, v=value: api(w, "name", name=v)
# Django's RegexValidator searches, so "$" also matches before a final newline (the form strips
# whitespace first; the API passes the string as sent).
CASES["case-25-api-trailing-newline"] = lambda w: api(w, "name", name="tiny\n")


for action in ("stop", "restart", "delete"):

    def _other_team(w: World, action: str = action) -> Outcome:
        response = w.bob.post(f"/deployments/{w.deployment.public_id}/{action}/")
        assert response.status_code == 404
        w.deployment.refresh_from_db()
        assert w.deployment.state == State.READY
        return Outcome(response, None, audit=f"deployment.{action}_requested")

    CASES[f"case-26-other-team-{action}"] = _other_team


@case("case-26-other-teams-model-id")
def _(w: World) -> Outcome:
    response = w.bob.post(
        "/deployments/api/",
        json.dumps(api_body(w, team="team-b")),
        content_type="application/json",
    )
    return Outcome(response, "model")


@case("case-26-other-teams-team-in-form")
def _(w: World) -> Outcome:
    return Outcome(w.bob.post("/deployments/new/", form_data(w)), "team")


def _csrf_client(w: World) -> Client:
    client = Client(enforce_csrf_checks=True)
    client.force_login(User.objects.get(username="alice"))
    client.get("/deployments/new/")  # sets the CSRF cookie
    return client


@case("case-27-form-without-token")
def _(w: World) -> Outcome:
    response = _csrf_client(w).post("/deployments/new/", form_data(w))
    assert response.status_code == 403
    return Outcome(response, None, audit=None)


@case("case-27-wrong-origin")
def _(w: World) -> Outcome:
    client = _csrf_client(w)
    token = client.cookies["csrftoken"].value
    response = client.post(
        "/deployments/new/",
        {**form_data(w), "csrfmiddlewaretoken": token},
        HTTP_ORIGIN="https://evil.example",
    )
    assert response.status_code == 403
    return Outcome(response, None, audit=None)


@case("case-27-cross-site-json")
def _(w: World) -> Outcome:
    response = _csrf_client(w).post(
        "/deployments/api/", json.dumps(api_body(w)), content_type="application/json"
    )
    assert response.status_code == 403
    return Outcome(response, None, audit=None)


@case("case-28-lockout-after-repeated-failures")
def _(w: World) -> Outcome:
    attacker = Client(REMOTE_ADDR="10.9.9.9")
    codes = [
        attacker.post("/accounts/login/", {"username": "alice", "password": "guess-12345"})
        for _ in range(6)
    ]
    assert [response.status_code for response in codes] == [200] * 4 + [429] * 2
    other_user = attacker.post("/accounts/login/", {"username": "bob", "password": PASSWORD})
    other_address = Client(REMOTE_ADDR="10.1.1.1").post(
        "/accounts/login/", {"username": "alice", "password": PASSWORD}
    )
    assert (other_user.status_code, other_address.status_code) == (302, 302)
    return Outcome(codes[-1], None, audit="auth.locked_out")


@case("case-29-forwarded-for-from-a-client")
def _(w: World) -> Outcome:
    response = w.alice.post(
        "/deployments/new/",
        form_data(w, environment="LD_PRELOAD=/x.so"),
        REMOTE_ADDR="10.0.0.9",
        HTTP_X_FORWARDED_FOR="1.2.3.4",
    )
    assert AuditEvent.objects.get(action=LAUNCH, outcome="denied").client_ip == "10.0.0.9"
    return Outcome(response, "environment")


@case("case-29-forwarded-for-behind-one-proxy")
def _(w: World) -> Outcome:
    w.settings.BERTH_TRUSTED_PROXIES = 1
    response = w.alice.post(
        "/deployments/new/",
        form_data(w, environment="LD_PRELOAD=/x.so"),
        REMOTE_ADDR="10.0.0.1",
        HTTP_X_FORWARDED_FOR="1.2.3.4, 192.0.2.44",  # the client forged the first entry
    )
    assert AuditEvent.objects.get(action=LAUNCH, outcome="denied").client_ip == "192.0.2.44"
    return Outcome(response, "environment")


@case("case-30-double-submit-form")
def _(w: World) -> Outcome:
    first = w.alice.post("/deployments/new/", form_data(w))
    second = w.alice.post("/deployments/new/", form_data(w))
    assert (first.status_code, second.status_code) == (302, 409)
    assert "already deploying" in errors_of(second)["name"]
    return Outcome(second, "name", jobs=1, deployments=1)


@case("case-30-double-submit-api")
def _(w: World) -> Outcome:
    first = api(w, None).response
    second = api(w, "name")
    assert (first.status_code, second.response.status_code) == (201, 409)
    return Outcome(second.response, "name", jobs=1, deployments=1)


@case("case-30-stop-submitted-twice")
def _(w: World) -> Outcome:
    path = f"/deployments/{w.deployment.public_id}/stop/"
    first, second = w.alice.post(path), w.alice.post(path, follow=True)
    assert (first.status_code, second.status_code) == (302, 200)
    assert "cannot be stopped" in second.content.decode()
    return Outcome(None, None, audit="deployment.stop_requested", jobs=1)


@case("case-31-10mb-body")
def _(w: World) -> Outcome:
    outcome = api(w, "body", b'{"name": "' + b"a" * 10_000_000 + b'"}')
    assert outcome.response.status_code == 413
    return outcome


CASES["case-31-1001-json-fields"] = lambda w: api(
    w, "body", json.dumps({f"field{index}": 1 for index in range(1001)})
)
CASES["case-31-1000-levels"] = lambda w: api(w, "body", "[" * 1000 + "]" * 1000)


@case("case-31-1001-form-fields")
def _(w: World) -> Outcome:
    data = {**form_data(w), **{f"field{index}": "1" for index in range(1001)}}
    response = w.alice.post("/deployments/new/", data)
    assert response.status_code == 400  # DATA_UPLOAD_MAX_NUMBER_FIELDS, before any view code
    return Outcome(response, None, audit=None)


# --- the suite -----------------------------------------------------------------------------------


@pytest.fixture
def world(
    alice: User,
    bob: User,
    team_a: Team,
    team_b: Team,
    tmp_path: Path,
    settings: Any,
    redis_client: Redis,
    django_capture_on_commit_callbacks: Any,
) -> Iterator[World]:
    write_model(tmp_path / "team-a" / "tiny")
    write_model(tmp_path / "team-b" / "other")
    model = reinspect(registered_model(team_a, tmp_path, "tiny"))  # fingerprint, config
    other = reinspect(registered_model(team_b, tmp_path, "other"))
    host = host_with_gpus(count=4)
    image = EngineImage.objects.create(name="vllm", reference="vllm/vllm-openai:v0.11.0")
    running = Deployment.objects.create(
        name="running", team=team_a, model=model, host=host, image=image, gpu_count=1,
        state=State.READY,
    )  # fmt: skip
    clients = {}
    for person in (alice, bob):
        clients[person.username] = Client()
        clients[person.username].force_login(person)
    redis_client.flushdb()
    with mock.patch("gpus.collectors.docker_client", autospec=True) as adapter:
        yield World(
            tmp_path, team_a, model, other, host, image, running, clients["alice"],
            clients["bob"], adapter, settings, django_capture_on_commit_callbacks,
        )  # fmt: skip


def queued_jobs(redis: Redis) -> int:
    return sum(queue.count for queue in Queue.all(connection=redis))


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_input_is_refused_without_a_job_or_a_docker_call(
    name: str, world: World, redis_client: Redis
) -> None:
    before = set(Deployment.objects.values_list("pk", flat=True))
    audited_before = AuditEvent.objects.filter(outcome="denied").count()
    with world.capture(execute=True):
        outcome = CASES[name](world)
    if outcome.response is not None:
        status = outcome.response.status_code
        assert status in (200, 400, 403, 404, 409, 413, 415, 429), status
    if outcome.field is not None:
        errors = errors_of(outcome.response)
        named = [key for key, text in errors.items() if outcome.field in (key, *text.split("'"))]
        assert named, f"no error names {outcome.field!r}: {errors}"
        assert all(text.strip() for text in errors.values())
    created = Deployment.objects.exclude(pk__in=before).count()
    assert created == outcome.deployments
    assert queued_jobs(redis_client) == outcome.jobs
    if not outcome.docker_ok:
        world.adapter.assert_not_called()
    if outcome.audit is not None:
        denied = AuditEvent.objects.filter(outcome="denied", action=outcome.audit)
        assert denied.exists(), list(AuditEvent.objects.values_list("action", "outcome"))
        assert AuditEvent.objects.filter(outcome="denied").count() > audited_before


def test_every_row_of_the_table_has_a_case() -> None:
    rows = {int(name.split("-")[1]) for name in CASES}
    assert rows == set(range(1, 32)), sorted(set(range(1, 32)) - rows)


# --- row 12 on the real Docker engine, with the stand-in image ----------------------------------


@pytest.fixture
def pinned_launch(
    team_a: Team, tmp_path: Path, docker_client: Any, engine_image: str
) -> Iterator[Callable[[str], Deployment]]:
    """Launch a queued CPU deployment of a real tiny model with an image pinned as given;
    its containers and cache volume are removed afterwards."""

    write_model(tmp_path / "team-a" / "tiny")
    model = reinspect(registered_model(team_a, tmp_path, "tiny"))
    host = host_with_gpus(count=0)
    made: list[Deployment] = []

    def launch(reference: str) -> Deployment:
        image = EngineImage(
            name=f"pinned-{len(made)}", reference=reference, gpu_capable=False,
            cpu_capable=True, is_stand_in=True, environment={"ENGINE_LOAD_SECONDS": "1"},
        )  # fmt: skip
        image.full_clean()
        image.save()
        deployment = Deployment.objects.create(
            name=f"pinned-{len(made)}", team=team_a, model=model, host=host, image=image,
            gpu_count=0, state=State.QUEUED, engine_args={"max_model_len": 2048},
        )  # fmt: skip
        made.append(deployment)
        on_host(launcher.launch, deployment, deployment.generation)
        deployment.refresh_from_db()
        return deployment

    yield launch
    remove_engines(docker_client, made)


@pytest.mark.docker
def test_case_12_a_pinned_image_runs_by_its_verified_id_and_another_digest_is_refused(
    pinned_launch: Callable[[str], Deployment], docker_client: Any, engine_image: str
) -> None:
    repository = engine_image.rpartition(":")[0]
    image_id = docker_client.images.get(engine_image).id  # a local build: no registry digest
    running = pinned_launch(f"{repository}@{image_id}")
    assert running.state == State.LOADING, running.last_error
    assert docker_client.containers.get(running.container_name).attrs["Image"] == image_id

    refused = pinned_launch(f"{repository}@sha256:{'0' * 64}")
    assert refused.state == State.FAILED
    assert refused.diagnosis[0]["code"] == "image-digest-mismatch"
    assert image_id in refused.last_error  # says which digest the host has
    assert not docker_client.containers.list(all=True, filters={"name": refused.container_name})
    event = AuditEvent.objects.get(action="deployment.image_refused")
    assert (event.outcome, event.target_id) == ("denied", str(refused.pk))


def test_case_10_docker_is_given_the_resolved_directory_not_a_link(
    team_a: Team, tmp_path: Path
) -> None:
    """Docker resolves links in a bind source itself; the launcher hands it the directory the
    link points to now, so a swap after the check cannot redirect the mount."""
    write_model(tmp_path / "team-a" / "llama")
    (tmp_path / "team-a" / "alias").symlink_to("llama")
    model = registered_model(team_a, tmp_path, "alias")
    deployment = Deployment.objects.create(
        name="alias", team=team_a, model=model, host=host_with_gpus(count=0),
        image=EngineImage.objects.create(name="vllm", reference="vllm/vllm-openai:v0.11.0"),
        gpu_count=0, engine_args={"max_model_len": 2048},
    )  # fmt: skip
    spec = launcher.build_spec(deployment, [], 30000)
    assert spec.model_host_path == str(tmp_path / "team-a" / "llama")
    assert spec.model_container_path == "/models/team-a/alias"
