"""RQ entry points of the GPU inventory; each loads its row and calls a service.

::

    enqueue(get_queue(host.queue_name), collect_host, host.pk)
"""

from __future__ import annotations

from typing import Any

from core.periodic import Scope, system_job
from gpus import inventory, rounds
from gpus.models import Host

COMPACT_EVERY_S = 3600


def collect_host(host_id: int) -> dict[str, Any]:
    """Collect and store the inventory of the host whose agent runs this job."""
    host = Host.objects.get(pk=host_id)
    collection = rounds.collect_round(host)
    return {"ok": collection.ok, "source": host.inventory_source, "errors": host.inventory_errors}


@system_job(every=COMPACT_EVERY_S, scope=Scope.HOST)
def compact_host_history(host_id: int) -> dict[str, int]:
    """Roll up and expire the host's GPU history (hourly, by the host's agent)."""
    return inventory.compact_history(Host.objects.get(pk=host_id))
