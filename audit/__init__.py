"""The audit trail. Everything that changes state calls ``audit.record(...)``.

The public names are imported lazily so that importing ``audit`` never touches the app registry.
"""

from __future__ import annotations

from typing import Any


def record(*args: Any, **kwargs: Any) -> Any:
    """See :func:`audit.trail.record`."""
    from audit.trail import record as _record

    return _record(*args, **kwargs)


def audited_transaction(*args: Any, **kwargs: Any) -> Any:
    """See :func:`audit.trail.audited_transaction`."""
    from audit.trail import audited_transaction as _audited_transaction

    return _audited_transaction(*args, **kwargs)


def chain_transaction(*args: Any, **kwargs: Any) -> Any:
    """See :func:`audit.trail.chain_transaction` (and the lock order written there)."""
    from audit.trail import chain_transaction as _chain_transaction

    return _chain_transaction(*args, **kwargs)
