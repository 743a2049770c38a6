"""Whether a job a deployment waits for will still run, asked of RQ's registries and of the
worker running it — not of the job's status alone.

Three ways the status lies, each met in an attack on a running console (issue 15):

* a watcher books its next run under its own id while it runs, then finishes: the id's status
  reads ``finished`` although the next run waits in the scheduled registry (a false "lost");
* a worker killed with SIGKILL leaves its job ``started`` until RQ's own cleanup, 15 minutes or
  more later: the job is lost as soon as the worker stops beating (a false "alive");
* a scheduled job nobody moves to its queue (the scheduler died with a Redis restart) stays
  ``scheduled`` forever: it is lost once it is overdue by more than a few of its intervals.

Every Berth worker beats at least every ``BERTH_AGENT_INTERVAL_S`` seconds, also while a job
runs (the agent from its heartbeat thread, ``berth_worker`` through RQ's job monitoring), so
``WORKER_SILENT_BEATS`` missed beats mean the process is gone::

    verdict = job_liveness(queue, "launch-12-1")
    if verdict.lost: forget(queue, "launch-12-1"); enqueue it again
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from django.conf import settings
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.worker import Worker

WORKER_SILENT_BEATS = 3
# A scheduled run this late was not moved to its queue: its scheduler is not running. The
# watchers are due every BERTH_MONITOR_INTERVAL_S; a minute leaves room for a busy worker.
OVERDUE_AFTER_S = 60.0


@dataclass(frozen=True)
class Liveness:
    """``pending``: it will run (queued, scheduled, or started by a live worker); ``lost``: it
    will not, although RQ still lists it; ``absent``: RQ holds no run of it."""

    state: str
    why: str = ""

    @property
    def pending(self) -> bool:
        return self.state == "pending"

    @property
    def lost(self) -> bool:
        return self.state == "lost"


def worker_silent_after_s() -> float:
    return WORKER_SILENT_BEATS * settings.BERTH_AGENT_INTERVAL_S


def job_liveness(queue: Queue, job_id: str, *, now: datetime | None = None) -> Liveness:
    """Whether ``job_id`` on ``queue`` will still run (see the module docstring)."""
    now = now or datetime.now(UTC)
    scheduled = queue.scheduled_job_registry
    if job_id in scheduled:
        due = scheduled.get_scheduled_time(job_id)
        late = (now - due).total_seconds()
        if late > OVERDUE_AFTER_S:
            return Liveness("lost", f"scheduled for {due:%H:%M:%S} UTC, {late:.0f} s overdue")
        return Liveness("pending", "scheduled")
    try:
        job = Job.fetch(job_id, connection=queue.connection)
    except NoSuchJobError:
        return Liveness("absent")
    status = job.get_status()
    if status in (JobStatus.QUEUED, JobStatus.DEFERRED):
        return Liveness("pending", str(status))
    if status == JobStatus.STARTED or job_id in queue.started_job_registry:
        return _started(queue, job, now)
    return Liveness("absent", str(status))


def _started(queue: Queue, job: Job, now: datetime) -> Liveness:
    name = job.worker_name or ""
    key = Worker.redis_worker_namespace_prefix + name
    worker = Worker.find_by_key(key, connection=queue.connection) if name else None
    beat = worker.last_heartbeat if worker is not None else None
    if beat is not None:
        beat = beat if beat.tzinfo else beat.replace(tzinfo=UTC)
        silent = (now - beat).total_seconds()
        if silent <= worker_silent_after_s():
            return Liveness("pending", f"started by {name}")
        return Liveness("lost", f"its worker {name} has not beaten for {silent:.0f} s")
    return Liveness("lost", f"its worker {name or '(unknown)'} is gone")


def forget(queue: Queue, job_id: str) -> None:
    """Take a lost run out of RQ's registries before it is enqueued again, so RQ's own cleanup
    cannot later mark the new run failed (it reads the same job id)."""
    started = queue.started_job_registry
    connection = queue.connection
    entries = connection.zrange(started.key, 0, -1)
    stale = [entry for entry in entries if started.parse_job_id(entry) == job_id]
    if stale:
        connection.zrem(started.key, *stale)
    queue.scheduled_job_registry.remove(job_id)
