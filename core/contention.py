"""Database contention: recognising it, retrying the unit of work, and saying "busy" when the
retries run out — never a 500.

PostgreSQL breaks a deadlock by failing one transaction (``40P01``), a serializable conflict
fails with ``40001`` and a lock wait past ``lock_timeout`` with ``55P03``; SQLite says "database
is locked" after its busy timeout. Each means "nothing was done, try again"::

    deployment = retrying(lambda: create_it(...))   # up to ATTEMPTS runs of the whole unit
    except Contended: answer 503 with Retry-After

A retry only makes sense for a whole transaction: inside an enclosing ``atomic()`` block the
transaction is already aborted, so ``retrying`` re-raises at once there.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable

from django.db import DEFAULT_DB_ALIAS, OperationalError, connections

logger = logging.getLogger(__name__)

# PostgreSQL SQLSTATEs that mean "rolled back because of another transaction".
CONTENTION_SQLSTATES = frozenset({"40P01", "40001", "55P03"})
ATTEMPTS = 4
FIRST_PAUSE_S = 0.05  # doubled each retry, with jitter: 0.05, 0.1, 0.2 s
RETRY_AFTER_S = 2  # what a refused client is told to wait


class Contended(Exception):
    """The work was rolled back by contention on every attempt; nothing was done."""

    retry_after_s = RETRY_AFTER_S


def is_contention(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is a deadlock, serialization failure or lock wait
    that rolled the transaction back."""
    for error in (exc, exc.__cause__):
        if error is None:
            continue
        if getattr(error, "sqlstate", None) in CONTENTION_SQLSTATES:
            return True
        if isinstance(error, OperationalError) and "database is locked" in str(error):
            return True
    return False


def retrying[T](
    work: Callable[[], T], *, attempts: int = ATTEMPTS, using: str = DEFAULT_DB_ALIAS
) -> T:
    """Run ``work`` (one whole transaction) again when contention rolled it back; raise
    :class:`Contended` when every attempt was. Other errors pass through untouched."""
    pause = FIRST_PAUSE_S
    for attempt in range(1, attempts + 1):
        try:
            return work()
        except Exception as exc:
            if not is_contention(exc):
                raise
            if connections[using].in_atomic_block:
                raise  # the enclosing transaction is aborted: only its owner can retry
            logger.warning("contention (attempt %d of %d): %s", attempt, attempts, exc)
            if attempt == attempts:
                raise Contended(str(exc)) from exc
            time.sleep(pause * (1 + random.random()))  # noqa: S311 (jitter, not security)
            pause *= 2
    raise AssertionError("unreachable")
