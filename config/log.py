"""Log records carry the request id (or the job id inside a worker) on every line."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

from core import context


class ContextFilter(logging.Filter):
    """Adds ``request_id`` and ``job_id`` from the current audit context to each record."""

    def filter(self, record: logging.LogRecord) -> bool:
        current = context.current()
        record.request_id = current.request_id or "-"
        record.job_id = current.job_id or "-"
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers (``LOG_FORMAT=json``)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, tz=UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
            "job_id": getattr(record, "job_id", "-"),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)
