"""Reading usage out of an engine's event stream while passing it through unbuffered.

The gateway asks every streamed request for ``stream_options.include_usage``, so vLLM ends the
stream with one chunk whose ``choices`` is empty and whose ``usage`` holds the token counts.
When the client did not ask for it, that chunk is removed again, so the client sees exactly the
stream it asked for. Whole events are forwarded as soon as they are complete; only the tail of
an event split across network reads waits for its end (a client cannot use half an event).
"""

from __future__ import annotations

import json
from typing import Any

EVENT_END = b"\n\n"
USAGE_MARK = b'"usage"'


class StreamUsage:
    """Feed it upstream bytes; forward what :meth:`feed` returns. ``usage`` is the engine's
    count once the usage chunk went by (None if it never came)."""

    def __init__(self, strip_usage_chunk: bool):
        self.strip = strip_usage_chunk
        self.pending = b""
        self.usage: dict[str, Any] | None = None
        self.events = 0

    def feed(self, chunk: bytes) -> bytes:
        data = self.pending + chunk if self.pending else chunk
        end = data.rfind(EVENT_END)
        if end < 0:
            self.pending = data
            return b""
        complete, self.pending = data[: end + 2], data[end + 2 :]
        self.events += complete.count(EVENT_END)
        if USAGE_MARK not in complete:
            return complete
        return b"".join(
            event + EVENT_END
            for event in complete[:-2].split(EVENT_END)
            if not (USAGE_MARK in event and self._usage_only(event))
        )

    def flush(self) -> bytes:
        rest, self.pending = self.pending, b""
        return rest

    def _usage_only(self, event: bytes) -> bool:
        """Record the usage of ``event``; True when it is the usage-only chunk to remove."""
        payload = _data_of(event)
        if not isinstance(payload, dict):
            return False
        usage = payload.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
            return self.strip and not payload.get("choices")
        return False


def _data_of(event: bytes) -> Any:
    lines = [line[5:].lstrip() for line in event.split(b"\n") if line.startswith(b"data:")]
    if not lines:
        return None
    try:
        return json.loads(b"\n".join(lines))
    except ValueError:
        return None
