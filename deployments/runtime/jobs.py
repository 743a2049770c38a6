"""RQ entry points for deployments: load by primary key, call the launcher, return.

Jobs run on the deployment host's queue (``host:<name>``), where that host's agent works; the
watcher re-books itself every ``BERTH_MONITOR_INTERVAL_S`` under one job id per generation, so a
duplicate cannot fork the chain.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.conf import settings
from rq import get_current_job

import docker
from core.queues import enqueue, get_queue
from deployments.models import Deployment
from deployments.runtime import launcher
from deployments.states import State

LAUNCH_TIMEOUT_S = 900  # creating and starting a container; the load itself is watched
STOP_TIMEOUT_S = 600


def _enqueue_for(deployment: Deployment, kind: str, timeout_s: int) -> str:
    """Queue ``<kind>_job`` for the deployment's current generation on its host's queue (on
    commit), under the id reconcile looks for: ``<kind>-<pk>-<generation>``."""
    return enqueue(
        get_queue(deployment.host.queue_name),
        f"deployments.runtime.jobs.{kind}_job",
        deployment.pk,
        deployment.generation,
        job_id=f"{kind}-{deployment.pk}-{deployment.generation}",
        job_timeout=timeout_s,
    )


def enqueue_launch(deployment: Deployment) -> str:
    return _enqueue_for(deployment, "launch", LAUNCH_TIMEOUT_S)


def enqueue_stop(deployment: Deployment) -> str:
    return _enqueue_for(deployment, "stop", STOP_TIMEOUT_S)


def enqueue_delete(deployment: Deployment) -> str:
    return _enqueue_for(deployment, "delete", STOP_TIMEOUT_S)


def launch_job(deployment_pk: int, generation: int) -> str:
    deployment = Deployment.objects.select_related("host", "model__mount", "team", "image").get(
        pk=deployment_pk
    )
    result = launcher.launch(deployment, generation)
    if deployment.state == State.LOADING:
        book_watch(deployment, delay_s=0)
    return result


def watch_job(deployment_pk: int, generation: int) -> bool:
    deployment = Deployment.objects.select_related("host", "model__mount", "team", "image").get(
        pk=deployment_pk
    )
    again = launcher.watch(deployment, generation)
    if again:
        book_watch(deployment)
    return again


def delete_job(deployment_pk: int, generation: int) -> str:
    deployment = Deployment.objects.filter(pk=deployment_pk).select_related("host", "team").first()
    if deployment is None:
        return "already deleted"
    return launcher.delete(deployment, generation)


def stop_job(deployment_pk: int, generation: int) -> str:
    deployment = Deployment.objects.select_related("host").get(pk=deployment_pk)
    return launcher.stop(deployment, generation)


def gc_job(host_pk: int) -> dict:
    """Garbage-collect one host's Docker engine, keeping what live deployments use."""
    from deployments.runtime.gc import collect
    from gpus.models import Host

    host = Host.objects.get(pk=host_pk)
    live_ids = Deployment.objects.active().filter(host=host).values_list("pk", flat=True)
    live = {str(pk) for pk in live_ids}
    client = _host_client(host)
    try:
        result = collect(client, live_deployments=live, host=host.name)
    finally:
        client.close()
    return {"bytes_reclaimed": result.bytes_reclaimed, "errors": result.errors}


def reconcile_job(host_pk: int) -> dict:
    """Reconcile one host's containers with the records (on agent start and on a schedule)."""
    from dataclasses import asdict

    from deployments.runtime.reconcile import reconcile_host
    from gpus.models import Host

    host = Host.objects.get(pk=host_pk)
    client = _host_client(host)
    try:
        return asdict(reconcile_host(host, client))
    finally:
        client.close()


def _host_client(host: Any) -> docker.DockerClient:
    from gpus.collectors import docker_client

    return docker_client(host.docker_endpoint)


def book_watch(deployment: Deployment, delay_s: float | None = None) -> None:
    """Schedule the next look at the engine on the same queue."""
    job = get_current_job()
    queue = get_queue(job.origin) if job is not None else get_queue(deployment.host.queue_name)
    delay = settings.BERTH_MONITOR_INTERVAL_S if delay_s is None else delay_s
    queue.enqueue_in(
        timedelta(seconds=delay),
        "deployments.runtime.jobs.watch_job",
        deployment.pk,
        deployment.generation,
        job_id=f"watch-{deployment.pk}-{deployment.generation}",
        meta=dict(job.meta) if job is not None else {},
        job_timeout=120,
    )
