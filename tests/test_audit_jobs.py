"""Events recorded inside RQ jobs, run by a real worker process, join the request behind them."""

from __future__ import annotations

import pytest
from django.db import transaction
from django.test import Client
from rq import Queue

from accounts.models import User
from audit.jobs import verify_chain
from audit.models import AuditEvent
from core.queues import enqueue, get_queue
from tests.conftest import run_manage, subprocess_env

pytestmark = [pytest.mark.redis, pytest.mark.django_db(transaction=True)]


def test_event_in_a_job_carries_the_requesting_user_and_request_id(carol: User) -> None:
    client = Client()
    client.force_login(carol)
    response = client.post("/audit/verify/")
    assert response.status_code == 302
    request_id = response["X-Request-ID"]
    requested = AuditEvent.objects.get(action="audit.verify_requested")
    job_id = requested.payload["job_id_queued"]
    assert (requested.actor_name, requested.request_id) == ("carol", request_id)

    worker = run_manage("berth_worker", "default", "--burst", env=subprocess_env())

    assert worker.returncode == 0, worker.stdout + worker.stderr
    verified = AuditEvent.objects.get(action="audit.verified")
    assert verified.actor_id == carol.pk
    assert (verified.actor_name, verified.actor_kind) == ("carol", "job")
    assert (verified.request_id, verified.job_id) == (request_id, job_id)
    assert verified.client_ip == "127.0.0.1"
    assert verified.outcome == "ok"
    assert verified.payload["checked"] >= 2  # the login and the request, at least


def _enqueue_then_fail(queue: Queue) -> None:
    with transaction.atomic():
        enqueue(queue, verify_chain)
        raise RuntimeError("abort")


def test_nothing_is_enqueued_when_the_transaction_rolls_back() -> None:
    queue = get_queue("rollback-check")
    with pytest.raises(RuntimeError, match="abort"):
        _enqueue_then_fail(queue)
    assert queue.count == 0
    job_id = enqueue(queue, verify_chain)
    assert queue.job_ids == [job_id]
    queue.empty()
