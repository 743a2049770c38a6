"""Launching, watching and stopping engine containers (the I/O edge: Docker SDK and HTTP).

Each function takes a deployment and the generation it was asked for, so a job that runs late
or twice is harmless: a stale generation does nothing, and a second launch of the same
generation adopts the container the first one created (the name is deterministic). On any
failure the container this launch created is removed, the GPUs are released and the error is
stored with its diagnosis — nothing is left behind.
"""

from __future__ import annotations

import dataclasses
import http.client
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

import audit
import docker
from audit.actions import Action
from core import naming
from deployments.changes import publish
from deployments.models import Deployment, DeploymentEvent, EventKind
from deployments.runtime import allocation, host_checks, model_source
from deployments.runtime.cache_seed import seed_cache
from deployments.runtime.diagnosis_rules import RULES_BY_CODE
from deployments.runtime.diagnostics import Finding, diagnose
from deployments.runtime.engine_args import SchemaError, parse_engine_args, parse_environment
from deployments.runtime.engine_host import EngineHost, gone, remove_quietly
from deployments.runtime.launch_spec import (
    LaunchSpec,
    container_kwargs,
    engine_version,
    load_strategy,
)
from deployments.runtime.milestones import milestone
from deployments.runtime.placement import choose_gpus
from deployments.runtime.prewarm import cancel as cancel_prewarm
from deployments.runtime.prewarm import start as start_prewarm
from deployments.states import State
from deployments.validation import still_allowed
from models_registry.inspection import inspect_directory
from models_registry.tasks import EMBED

LOG_TAIL_LINES = 200
PORT_ATTEMPTS = 5  # host ports tried when other programs hold them
ENGINE_KEY_BYTES = 32
RESTART_LOOP = 2  # Docker restarted the engine this often: it will not come up by itself
HEALTH_TIMEOUT_S = 2.0


class LaunchFailure(Exception):
    """A launch step failed; ``findings`` says why and how to fix it."""

    def __init__(self, message: str, findings: Sequence[Finding] = ()):
        super().__init__(message)
        self.findings = list(findings)


@dataclass(frozen=True)
class Health:
    state: str  # "healthy", "refused" (loading), "unhealthy"
    detail: str = ""


# --- launch ---------------------------------------------------------------------------------


def launch(
    engine: EngineHost, deployment: Deployment, generation: int, *, gpus: Sequence[Any] = ()
) -> str:
    """Create (or adopt) and start the container; ``loading`` on success, ``failed`` with a
    diagnosis otherwise. Returns what happened, for the job's result."""
    if deployment.generation != generation:
        return "stale generation: nothing to do"
    if deployment.state == State.QUEUED and not deployment.transition(State.LAUNCHING):
        deployment.refresh_from_db()
    if deployment.state != State.LAUNCHING:
        return f"deployment is {deployment.state}: nothing to do"
    spec = None
    try:
        source = _check_model_on_host(deployment)
        still_allowed(deployment)  # the rules of a new request, again
        start_prewarm(deployment)  # reads the weights into the page cache while the engine starts
        image = host_checks.pinned_image(engine.client, deployment)
        seed_cache(engine, deployment, image)  # a further replica: no compile on start
        held = _hold_gpus(deployment, gpus)
        model_source.run_hooks(deployment, source)
        spec, container = _start_on_a_free_port(engine, deployment, held, image, source.host)
        model_source.verify_mount(container, source, deployment)
    except (LaunchFailure, host_checks.Refused) as exc:
        _fail_launch(engine, deployment, spec, exc)
        return f"failed: {exc}"
    except BaseException:  # the job fails (and is retried): no prewarm for a launch not made
        cancel_prewarm(deployment.pk)
        raise
    with transaction.atomic():
        deployment.store(container_id=container.id, last_progress_at=timezone.now())
        deployment.transition(
            State.LOADING,
            message=f"container {spec.container_name} started",
            container=container.id,
            model_source=source.host,
            model_identity=source.identity,
        )
    return "loading"


def _check_model_on_host(deployment: Deployment) -> model_source.ModelSource:
    """Resolve the model directory once (no link below the mount root), inspect exactly that
    path again here, and refuse when it is not what was registered."""
    source = model_source.resolve(deployment.model)
    report = inspect_directory(
        Path(source.local),
        storage_root=deployment.model.mount.confinement_for(deployment.model.translation()),
        display_path=deployment.model.path,
    )
    if report.fingerprint != source.fingerprint:
        report.add("path-changed", "error", "the directory changed while it was checked", "Retry.")
    host_checks.check_model_unchanged(deployment, report)
    return source


def _hold_gpus(deployment: Deployment, gpus: Sequence[Any]) -> list[Any]:
    """The GPUs of this generation: those already held (a retried job), or reserve ``gpus``."""
    held = [
        a.gpu
        for a in deployment.allocations.filter(
            active=True, generation=deployment.generation
        ).select_related("gpu")
    ]
    if held or deployment.gpu_count == 0:
        return sorted(held, key=lambda gpu: gpu.index)
    if not gpus:
        gpus, why_not = choose_gpus(deployment)
        if not gpus:
            raise LaunchFailure(f"no suitable GPUs on {deployment.host.name}: {why_not}")
    if len(gpus) != deployment.gpu_count:
        raise LaunchFailure(f"{deployment.gpu_count} GPUs are needed but {len(gpus)} were selected")
    try:
        allocation.reserve(deployment, gpus)
    except allocation.AllocationConflict as exc:
        raise LaunchFailure(str(exc)) from None
    return sorted(gpus, key=lambda gpu: gpu.index)


def _start_on_a_free_port(
    engine: EngineHost,
    deployment: Deployment,
    gpus: list[Any],
    image: str | None = None,
    model_host_path: str | None = None,
) -> tuple:
    """Create and start the container; when another program holds the chosen host port, remove
    the container and try the next port (Berth only knows its own engines' ports)."""
    taken: set[int] = set()
    ensure_engine_key(deployment)
    for _attempt in range(PORT_ATTEMPTS):
        try:
            labels = host_checks.image_labels(engine.client, image or deployment.image.reference)
            spec = build_spec(deployment, gpus, _port(deployment, taken), labels, model_host_path)
        except SchemaError as exc:  # e.g. remote-code approval revoked since the request
            raise LaunchFailure(f"the deployment's settings are no longer allowed: {exc}") from None
        if image:  # pinned: create from the verified image id, not a name that could move
            spec = dataclasses.replace(spec, image=image)
        try:
            return spec, _create_or_adopt(engine.client, spec)
        except LaunchFailure as exc:
            if not any(finding.code == "port-in-use" for finding in exc.findings):
                raise
            engine.remove_container(spec.container_name)
            taken.add(spec.host_port)
            deployment.store(host_port=None)
    raise LaunchFailure(
        f"ports {sorted(taken)} on {deployment.host.name} are all held by other programs"
    )


def _port(deployment: Deployment, taken: set[int] = frozenset()) -> int:
    """The deployment's host port: kept across retries, else the lowest free one in the range."""
    if deployment.host_port:
        return deployment.host_port
    used = taken | set(
        Deployment.objects.active()
        .filter(host=deployment.host)
        .exclude(pk=deployment.pk)
        .values_list("host_port", flat=True)
    )
    for port in range(settings.BERTH_ENGINE_PORT_MIN, settings.BERTH_ENGINE_PORT_MAX + 1):
        if port not in used:
            deployment.store(host_port=port)
            return port
    raise LaunchFailure(
        f"no free engine port left on {deployment.host.name} "
        f"({settings.BERTH_ENGINE_PORT_MIN}-{settings.BERTH_ENGINE_PORT_MAX})"
    )


def ensure_engine_key(deployment: Deployment) -> None:
    """Give the deployment its engine key once (kept across generations, so a retried launch
    that adopts its container finds the key it was created with)."""
    if not deployment.engine_key:
        Deployment.objects.filter(pk=deployment.pk, engine_key="").update(
            engine_key=secrets.token_urlsafe(ENGINE_KEY_BYTES)
        )
        deployment.engine_key = (
            Deployment.objects.filter(pk=deployment.pk).values_list("engine_key", flat=True).get()
        )


def gpu_device_ids(gpus: Sequence[Any]) -> tuple[str, ...]:
    """How the container names its GPUs: by UUID where the inventory has one (indexes shift
    when a GPU drops off the bus), else by index."""
    return tuple(gpu.uuid or str(gpu.index) for gpu in gpus)


def build_spec(
    deployment: Deployment,
    gpus: Sequence[Any],
    port: int,
    image_labels: dict[str, str] | None = None,
    model_host_path: str | None = None,
) -> LaunchSpec:
    """The launch spec from the deployment's validated fields, its plan and the labels of the
    host's copy of the image (the engine version a built image states); a launch passes the
    bind source it checked (``model_source``), the page shows the resolved one."""
    where = deployment.model.translation()
    # Checked again here: an approval revoked after the request stops the launch.
    args = parse_engine_args(
        deployment.engine_args, trust_remote_code_allowed=deployment.model.remote_code_approved
    )
    plan = deployment.stored_plan or deployment.cpu_plan
    max_model_len = args.max_model_len or (plan.max_model_len if plan else None)
    utilization = args.gpu_memory_utilization or getattr(plan, "gpu_memory_utilization", None)
    extra = _drop_values(args.as_argv(), ("--max-model-len", "--gpu-memory-utilization"))
    return LaunchSpec(
        deployment_id=deployment.pk,
        generation=deployment.generation,
        team=deployment.team.slug,
        image=deployment.image.reference,
        model_host_path=model_host_path or host_checks.resolved_host_path(deployment.model),
        model_container_path=where.container,
        served_model_name=deployment.name,
        host_port=port,
        bind_ip=settings.BERTH_ENGINE_BIND,
        gpu_device_ids=gpu_device_ids(gpus),
        tensor_parallel_size=deployment.tensor_parallel_size,
        max_model_len=max_model_len,
        gpu_memory_utilization=utilization,
        load_args=load_strategy(
            deployment.model.mount.kind,
            engine_version(deployment.image.reference, image_labels),
            deployment.tensor_parallel_size,
            streamer=deployment.gpu_count > 0,  # CPU engines have no Run:ai streamer
        ).argv,
        engine_args=tuple(extra),
        environment={**deployment.image.environment, **parse_environment(deployment.environment)},
        health_command=tuple(deployment.image.health_command) or LaunchSpec.health_command,
        health_start_period_s=deployment.health_start_period_s,
        engine_ready_timeout_s=deployment.engine_ready_timeout_s,
        instance=settings.BERTH_INSTANCE,
        engine_key=deployment.engine_key,
        runner="pooling" if deployment.model.task == EMBED else None,
        **_cpu_limits(deployment),
    )


def _cpu_limits(deployment: Deployment) -> dict[str, int]:
    """A CPU plan's memory limit and KV space (``deployments.planning.cpu``); none otherwise."""
    plan = deployment.cpu_plan
    if deployment.gpu_count or plan is None:
        return {}
    return {
        "memory_limit_bytes": plan.memory_limit_bytes,
        "cpu_kv_cache_space_gib": plan.kv_cache_space_gib,
    }


def _drop_values(argv: list[str], flags: Sequence[str]) -> list[str]:
    kept, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token in flags:
            skip = True
        else:
            kept.append(token)
    return kept


def _create_or_adopt(client: docker.DockerClient, spec: LaunchSpec) -> Any:
    """Start the generation's container, creating it unless a previous attempt already did."""
    try:
        try:
            container = client.containers.get(spec.container_name)
        except docker.errors.NotFound:
            container = client.containers.create(**container_kwargs(spec))
        if container.status not in ("running", "restarting"):
            container.start()
        container.reload()
    except docker.errors.ImageNotFound:
        raise LaunchFailure(
            f"the image {spec.image} is not on this host; pull it there first "
            f"(docker pull {spec.image}) or fix the allow-list entry"
        ) from None
    except docker.errors.APIError as exc:
        raise _docker_failure(exc, spec) from None
    return container


def _docker_failure(exc: docker.errors.APIError, spec: LaunchSpec) -> LaunchFailure:
    message = str(getattr(exc, "explanation", "") or exc)
    findings = [f for f in diagnose(message) if f.code not in ("none", "unrecognized-error")]
    if findings and findings[0].code == "no-nvidia-runtime":
        return LaunchFailure(
            "this host has no NVIDIA container runtime, so Docker cannot give the container GPUs "
            f"(Docker said: {message})",
            findings,
        )
    if "port is already allocated" in message or "address already in use" in message.lower():
        findings = [f for f in diagnose("Address already in use") if f.code == "port-in-use"]
    return LaunchFailure(f"Docker refused to start {spec.container_name}: {message}", findings)


def _fail_launch(
    engine: EngineHost,
    deployment: Deployment,
    spec: LaunchSpec | None,
    exc: LaunchFailure | host_checks.Refused,
) -> None:
    engine.remove_container(spec.container_name if spec else deployment.container_name)
    fail(deployment, str(exc), [finding.as_json() for finding in exc.findings], release=True)


def fail(
    deployment: Deployment, error: str, diagnosis: list[dict[str, Any]], *, release: bool = False
) -> None:
    """Store the error and diagnosis, then move to ``failed`` (with a diagnosis event); with
    ``release``, the deployment's GPUs are released in the same transaction."""
    cancel_prewarm(deployment.pk)
    with transaction.atomic():
        if release:
            allocation.release(deployment, reason=f"failed: {error}"[:200])
        deployment.store(last_error=error[:4000], diagnosis=diagnosis)
        if diagnosis:
            DeploymentEvent.objects.create(
                deployment=deployment,
                generation=deployment.generation,
                kind=EventKind.DIAGNOSIS,
                message=diagnosis[0]["title"],
                data=diagnosis[0],
            )
        deployment.transition(
            State.FAILED, message=error[:500], diagnosis=[d["code"] for d in diagnosis]
        )


# --- watching ---------------------------------------------------------------------------------


def watch(engine: EngineHost, deployment: Deployment, generation: int) -> bool:
    """One look at the engine: logs, milestones, container state, health. Returns whether to
    look again (the job re-enqueues itself; nothing sleeps for minutes)."""
    if deployment.generation != generation or deployment.state not in (
        State.LOADING,
        State.READY,
        State.UNHEALTHY,
    ):
        return False
    container = engine.container(deployment.container_id or deployment.container_name)
    try:
        if container is not None:
            _read_new_logs(deployment, container)
    except docker.errors.APIError as exc:
        if not gone(exc):
            raise
        container = None  # docker rm -f under way: Docker answers 409, not 404
    if container is None:
        fail(deployment, f"the container {deployment.container_name} disappeared", [], release=True)
        return False
    restarts = int(container.attrs.get("RestartCount") or 0)
    state = container.attrs.get("State", {})
    if state.get("Status") in ("exited", "dead") or restarts >= RESTART_LOOP:
        _engine_died(deployment, container, state, restarts)
        return False
    return _check_health(engine, deployment)


def _read_new_logs(deployment: Deployment, container: Any) -> list[str]:
    since = deployment.logs_read_until
    raw = container.logs(stdout=True, stderr=True, timestamps=True, since=since or None).decode(
        errors="replace"
    )
    lines, newest = [], since
    for entry in raw.splitlines():
        stamp, _, text = entry.partition(" ")
        moment = _docker_time(stamp)
        if moment is not None and moment <= since:
            continue
        newest = max(newest, moment or newest)
        lines.append(text)
    if lines:
        _record_progress(deployment, lines)
        tail = (deployment.log_tail + lines)[-LOG_TAIL_LINES:]
        deployment.store(logs_read_until=newest, log_tail=tail)
        publish(deployment.pk, "log")
    return lines


def _docker_time(stamp: str) -> float | None:
    """Docker's RFC 3339 nanosecond timestamp as Unix seconds."""
    match = re.match(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?Z$", stamp)
    if match is None:
        return None
    whole = datetime.strptime(match.group(1), "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC).timestamp()
    return whole + float(f"0.{match.group(2) or 0}")


def _record_progress(deployment: Deployment, lines: list[str]) -> None:
    milestones = [message for line in lines if (message := milestone(line)) is not None]
    if not milestones:
        return
    now = timezone.now()
    DeploymentEvent.objects.bulk_create(
        [
            DeploymentEvent(
                deployment=deployment,
                generation=deployment.generation,
                kind=EventKind.PROGRESS,
                message=message,
                time=now,
            )
            for message in dict.fromkeys(milestones)
        ]
    )
    deployment.store(last_progress_at=now)


def _engine_died(deployment: Deployment, container: Any, state: dict, restarts: int) -> None:
    exit_code = state.get("ExitCode")
    findings = diagnose(
        deployment.log_tail,
        exit_code=exit_code,
        oom_killed=bool(state.get("OOMKilled")),
        memory_limited=bool(container.attrs.get("HostConfig", {}).get("Memory")),
    )
    findings = [f for f in findings if f.code != "none"]
    what = (
        f"the engine restarted {restarts} times without becoming healthy"
        if restarts >= RESTART_LOOP
        else f"the engine exited with code {exit_code}"
    )
    remove_quietly(container)
    fail(
        deployment,
        what + (f": {findings[0].title}" if findings else ""),
        [f.as_json() for f in findings],
        release=True,
    )


def _check_health(engine: EngineHost, deployment: Deployment) -> bool:
    health = probe(settings.BERTH_ENGINE_BIND, deployment.host_port)
    now = timezone.now()
    if deployment.state == State.LOADING:
        if health.state == "healthy":
            deployment.store(ready_at=now)
            cancel_prewarm(deployment.pk)  # the engine has read its weights
            deployment.transition(State.READY, message="the engine answers /health")
            return True
        stalled_for = (now - (deployment.last_progress_at or deployment.updated)).total_seconds()
        if stalled_for > deployment.stall_timeout_s:
            _stalled(engine, deployment, stalled_for)
            return False
        return True
    if health.state == "healthy" and deployment.state == State.UNHEALTHY:
        deployment.transition(State.READY, message="the engine answers /health again")
    elif health.state != "healthy" and deployment.state == State.READY:
        deployment.transition(State.UNHEALTHY, message=f"/health: {health.detail}")
    return True


def _stalled(engine: EngineHost, deployment: Deployment, seconds: float) -> None:
    findings = [f for f in diagnose(deployment.log_tail) if f.code != "none"]
    if not findings:  # a silent engine says nothing: the timer is the diagnosis
        findings = [stalled_finding(deployment)]
    engine.remove_container(deployment.container_name)
    message = (
        f"no loading progress for {seconds:.0f} s (stall timeout {deployment.stall_timeout_s} s); "
        "the last log lines are on this page"
    )
    fail(deployment, message, [f.as_json() for f in findings], release=True)


def stalled_finding(deployment: Deployment) -> Finding:
    """``engine-ready-timeout``, on the last milestone the engine reached."""
    rule = RULES_BY_CODE["engine-ready-timeout"]
    last = deployment.events.filter(kind=EventKind.PROGRESS, generation=deployment.generation)
    reached = last.order_by("-time", "-pk").values_list("message", flat=True).first()
    return Finding(rule.code, rule.title, rule.remedy, None, f"last progress: {reached or 'none'}")


def probe(address: str, port: int | None) -> Health:
    """GET /health. A refused connection means vLLM is still loading (it binds the port but
    listens only once the model is ready), not that it is down."""
    if port is None:
        return Health("refused", "no port")
    connection = http.client.HTTPConnection(address, port, timeout=HEALTH_TIMEOUT_S)
    try:
        connection.request("GET", "/health")
        status = connection.getresponse().status
    except ConnectionRefusedError:
        return Health("refused", "connection refused (still loading)")
    except (TimeoutError, OSError, http.client.HTTPException) as exc:
        return Health("unhealthy", f"{type(exc).__name__}: {exc}")
    finally:
        connection.close()
    return Health("healthy") if status == 200 else Health("unhealthy", f"HTTP {status}")


# --- stopping ---------------------------------------------------------------------------------


def stop(engine: EngineHost, deployment: Deployment, generation: int) -> str:
    """Stop gracefully (SIGTERM, then kill after the timeout), keep the log tail, remove the
    container, release the GPUs. A first replica its scaler took to zero replicas ends ``idle``
    (the gateway still routes its name and wakes it), any other ``stopped``."""
    if deployment.generation != generation or deployment.state != State.STOPPING:
        return "nothing to do"
    cancel_prewarm(deployment.pk)
    container = engine.container(deployment.container_id or deployment.container_name)
    if container is not None:
        container.stop(timeout=settings.BERTH_STOP_TIMEOUT_S)
        _read_new_logs(deployment, container)
        container.remove(force=True)
    if not deployment.is_replica and deployment.replicas == 0:
        allocation.release(deployment, reason="scaled to zero")
        deployment.transition(State.IDLE, message="scaled to zero: container stopped and removed")
        return "idle"
    allocation.release(deployment, reason="stopped")
    deployment.transition(State.STOPPED, message="container stopped and removed")
    return "stopped"


def delete(engine: EngineHost, deployment: Deployment, generation: int) -> str:
    """Remove the deployment's leftovers on the host (any generation's container, the cache
    volume), then the record itself; only for a failed or stopped deployment."""
    if deployment.generation != generation or deployment.state not in (State.FAILED, State.STOPPED):
        return "nothing to do: the deployment was restarted meanwhile"
    removed, volume_name = remove_leftovers(engine, deployment.pk)
    with transaction.atomic():
        allocation.release(deployment, reason="deleted")
        audit.record(
            Action.DEPLOYMENT_DELETED,
            target=deployment,
            public_id=str(deployment.public_id),  # what a deleted deployment's URL is told by
            containers_removed=removed,
            volume=volume_name,
            generation=deployment.generation,
            model=deployment.model.path,
        )
        pk = deployment.pk
        deployment.delete()
        publish(pk, "deleted")  # open pages say it was deleted, and by whom
    return "deleted"


def remove_leftovers(engine: EngineHost, deployment_id: int) -> tuple[list[str], str]:
    """Remove every container (any generation) and the cache volume of ``deployment_id`` on
    the host; returns the containers' names and the volume's. Needs no record: a further
    replica's row goes with its first replica's, perhaps before its own host's agent runs."""
    removed = []
    for container in engine.containers():
        if naming.deployment_of(container.labels) == str(deployment_id):
            container.remove(force=True)
            removed.append(container.name)
    volume_name = naming.cache_volume(deployment_id, settings.BERTH_INSTANCE)
    engine.remove_volume(volume_name)
    return removed, volume_name
