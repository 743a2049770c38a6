"""RQ entry points of the GPU inventory; each loads its row and calls a service.

::

    audit.jobs.enqueue(get_queue(host.queue_name), "gpus.jobs.collect_host", host.pk)
"""

from __future__ import annotations

from typing import Any

from gpus import inventory, rounds
from gpus.models import Host


def collect_host(host_id: int) -> dict[str, Any]:
    """Collect and store the inventory of the host whose agent runs this job."""
    host = Host.objects.get(pk=host_id)
    collection = rounds.collect_round(host)
    return {"ok": collection.ok, "source": host.inventory_source, "errors": host.inventory_errors}


def compact_host_history(host_id: int) -> dict[str, int]:
    """Roll up and expire the host's GPU history (scheduled hourly by its agent)."""
    return inventory.compact_history(Host.objects.get(pk=host_id))
