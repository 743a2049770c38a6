"""RQ entry points for deployments: load by primary key, call the launcher, return.

Jobs run on the deployment host's queue (``host:<name>``), where that host's agent works; the
watcher re-books itself every ``BERTH_MONITOR_INTERVAL_S`` under one job id per generation, so a
duplicate cannot fork the chain (while the engine loads, one run stays with it for up to
``loading_watch.HOLD_S``: ``deployments.runtime.loading_watch``).
"""

from __future__ import annotations

from dataclasses import asdict
from datetime import timedelta

from django.conf import settings
from redis.exceptions import RedisError
from rq import Queue, get_current_job

import audit
from audit.actions import Action
from core import naming
from core.periodic import Scope, system_job
from core.queues import enqueue, get_queue
from deployments.models import Deployment
from deployments.runtime import launcher
from deployments.runtime.engine_host import EngineHost
from deployments.runtime.gc import collect
from deployments.runtime.loading_watch import watch_while_loading
from deployments.runtime.reconcile import reconcile_host
from deployments.states import State
from gpus.models import Host

LAUNCH_TIMEOUT_S = 900  # creating and starting a container; the load itself is watched
STOP_TIMEOUT_S = 600


def _enqueue_for(deployment: Deployment, kind: str, timeout_s: int, *extra: int) -> str:
    """Queue the ``kind`` job for the deployment's current generation on its host's queue (on
    commit), under the id reconcile looks for (``core.naming.deployment_job_id``)."""
    return enqueue(
        get_queue(deployment.host.queue_name),
        DEPLOYMENT_JOBS[kind],
        deployment.pk,
        deployment.generation,
        *extra,
        job_id=naming.deployment_job_id(kind, deployment.pk, deployment.generation),
        job_timeout=timeout_s,
    )


def enqueue_launch(deployment: Deployment) -> str:
    return _enqueue_for(deployment, "launch", LAUNCH_TIMEOUT_S)


def enqueue_stop(deployment: Deployment) -> str:
    return _enqueue_for(deployment, "stop", STOP_TIMEOUT_S)


def enqueue_delete(deployment: Deployment) -> str:
    # The host travels with the job: a further replica's row goes with its first replica's
    # (another host's agent may delete that one first), and its leftovers are still here.
    return _enqueue_for(deployment, "delete", STOP_TIMEOUT_S, deployment.host_id)


def resume(kind: str, deployment: Deployment) -> None:
    """Enqueue a deployment's lost ``launch``/``stop``/``watch`` job again (for reconcile)."""
    if kind == "watch":
        book_watch(deployment, delay_s=0)
    elif kind == "delete":
        enqueue_delete(deployment)
    else:
        _enqueue_for(deployment, kind, LAUNCH_TIMEOUT_S if kind == "launch" else STOP_TIMEOUT_S)


def launch_job(deployment_pk: int, generation: int) -> str:
    deployment = Deployment.objects.select_related("host", "model__mount", "team", "image").get(
        pk=deployment_pk
    )
    with EngineHost.of(deployment.host) as engine:
        result = launcher.launch(engine, deployment, generation)
    if deployment.state == State.LOADING:
        book_watch(deployment, delay_s=0)
    return result


def watch_job(deployment_pk: int, generation: int) -> bool:
    deployment = Deployment.objects.select_related("host", "model__mount", "team", "image").get(
        pk=deployment_pk
    )
    queue = _own_queue(deployment)
    with EngineHost.of(deployment.host) as engine:
        again = watch_while_loading(
            engine, deployment, generation, others_waiting=lambda: _others_waiting(queue)
        )
    if again:
        book_watch(deployment)
    return again


def delete_job(deployment_pk: int, generation: int, host_pk: int | None = None) -> str:
    deployment = Deployment.objects.filter(pk=deployment_pk).select_related("host", "team").first()
    if deployment is None:
        host = Host.objects.filter(pk=host_pk).first() if host_pk is not None else None
        return "already deleted" if host is None else _remove_leftovers(host, deployment_pk)
    with EngineHost.of(deployment.host) as engine:
        return launcher.delete(engine, deployment, generation)


def _remove_leftovers(host: Host, deployment_pk: int) -> str:
    """A replica whose record its first replica's deletion took: its container and cache
    volume on ``host`` go all the same (audited like a deletion)."""
    with EngineHost.of(host) as engine:
        removed, volume = launcher.remove_leftovers(engine, deployment_pk)
    audit.record(
        Action.DEPLOYMENT_DELETED,
        host=host.name,
        deployment=deployment_pk,
        containers_removed=removed,
        volume=volume,
        reason="its record went with its first replica's",
    )
    return f"already deleted; removed {len(removed)} containers and the volume {volume}"


def stop_job(deployment_pk: int, generation: int) -> str:
    deployment = Deployment.objects.select_related("host").get(pk=deployment_pk)
    with EngineHost.of(deployment.host) as engine:
        return launcher.stop(engine, deployment, generation)


DEPLOYMENT_JOBS = {
    "launch": launch_job,
    "watch": watch_job,
    "stop": stop_job,
    "delete": delete_job,
}


def _gc_interval_s() -> float:
    return settings.BERTH_GC_INTERVAL_H * 3600


# Not at the agent's start: engines that were running settle first.
@system_job(every=_gc_interval_s, scope=Scope.HOST, first_after_s=None)
def gc_job(host_pk: int) -> dict:
    """Garbage-collect one host's Docker engine, keeping what live deployments use."""
    host = Host.objects.get(pk=host_pk)
    live_ids = Deployment.objects.active().filter(host=host).values_list("pk", flat=True)
    live = {str(pk) for pk in live_ids}
    with EngineHost.of(host) as engine:
        result = collect(engine, live_deployments=live, host=host.name)
    return {"bytes_reclaimed": result.bytes_reclaimed, "errors": result.errors}


@system_job(every=lambda: settings.BERTH_RECONCILE_INTERVAL_S, scope=Scope.HOST)
def reconcile_job(host_pk: int) -> dict:
    """Reconcile one host's containers with the records (on agent start and on a schedule)."""
    host = Host.objects.get(pk=host_pk)
    with EngineHost.of(host) as engine:
        return asdict(reconcile_host(host, engine, resume=resume))


def _others_waiting(queue: Queue) -> bool:
    """Whether another job waits on ``queue``; True when Redis does not answer (the run ends
    and its re-booking meets the outage, as before)."""
    try:
        return queue.count > 0
    except RedisError:
        return True


def _own_queue(deployment: Deployment) -> Queue:
    """The queue the current job came from, else the deployment's host's."""
    job = get_current_job()
    return get_queue(job.origin) if job is not None else get_queue(deployment.host.queue_name)


def book_watch(deployment: Deployment, delay_s: float | None = None) -> None:
    """Schedule the next look at the engine on the same queue."""
    job = get_current_job()
    queue = _own_queue(deployment)
    delay = settings.BERTH_MONITOR_INTERVAL_S if delay_s is None else delay_s
    options = {
        "job_id": naming.deployment_job_id("watch", deployment.pk, deployment.generation),
        "meta": dict(job.meta) if job is not None else {},
        "job_timeout": 120,
    }
    if delay <= 0:
        # Due now: straight onto the queue, so a first look (or one reconcile resumes because
        # no scheduler moved the last booking) does not itself wait for a scheduler.
        queue.enqueue(watch_job, deployment.pk, deployment.generation, **options)
        return
    queue.enqueue_in(
        timedelta(seconds=delay), watch_job, deployment.pk, deployment.generation, **options
    )
