"""Per-key requests and tokens per minute, and each team's monthly token budget, in Redis.

Counters live in Redis so that they hold across every gateway process. One Lua script checks
all three and, only when all pass, counts the request and reserves its tokens — atomically, so
two gateways cannot both take the last slot. Tokens are reserved up front (``max_tokens`` plus
an estimate of the prompt) and settled when the engine reports its real ``usage``.

Windows are calendar minutes and calendar months in UTC: ``Retry-After`` is the time to the next
one. A request that could never fit (its reservation alone exceeds the key's TPM) is refused
without a retry time.
"""

from __future__ import annotations

import calendar
import math
import time
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from core import naming
from gateway.cache import KeyEntry

# Characters per token for the prompt estimate: ~4 for English text with the common BPE
# tokenizers; a reservation is settled on the engine's own count anyway.
CHARS_PER_TOKEN = 4
# Reserved for the completion when the request states no max_tokens (vLLM's own default is the
# rest of the context, which would block a whole TPM window for one request).
DEFAULT_COMPLETION_RESERVE = 256
MINUTE_TTL_S = 120
MONTH_TTL_S = 40 * 86400

OK, RPM, TPM, BUDGET, TOO_LARGE = 0, 1, 2, 3, 4

_RESERVE = """
local rpm, tpm, budget = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tokens = tonumber(ARGV[4])
if tpm > 0 and tokens > tpm then return 4 end
if rpm > 0 and tonumber(redis.call('GET', KEYS[1]) or '0') >= rpm then return 1 end
if tpm > 0 and tonumber(redis.call('GET', KEYS[2]) or '0') + tokens > tpm then return 2 end
if budget > 0 and tonumber(redis.call('GET', KEYS[3]) or '0') + tokens > budget then return 3 end
if rpm > 0 then
  redis.call('INCR', KEYS[1]); redis.call('EXPIRE', KEYS[1], ARGV[5])
end
if tpm > 0 then
  redis.call('INCRBY', KEYS[2], tokens); redis.call('EXPIRE', KEYS[2], ARGV[5])
end
redis.call('INCRBY', KEYS[3], tokens); redis.call('EXPIRE', KEYS[3], ARGV[6])
return 0
"""


@dataclass(frozen=True, slots=True)
class Reservation:
    """What a request holds: settled (corrected by the real token count) when it ends."""

    tpm_key: str | None
    budget_key: str
    tokens: int


@dataclass(frozen=True, slots=True)
class Refusal:
    code: int
    retry_after_s: int | None


def estimate_tokens(payload: dict[str, Any], body_size: int) -> int:
    """Tokens to reserve: the completion limit asked for (or a default) plus the prompt
    estimated from the request's size."""
    wanted = payload.get("max_completion_tokens", payload.get("max_tokens"))
    completion = wanted if isinstance(wanted, int) and wanted > 0 else DEFAULT_COMPLETION_RESERVE
    if "input" in payload and "messages" not in payload and "prompt" not in payload:
        completion = 0  # embeddings produce no tokens
    return completion + max(1, body_size // CHARS_PER_TOKEN)


class Limiter:
    """Reserve and settle against the shared counters (one instance per gateway process)."""

    def __init__(self, redis: Redis, instance: str):
        self.redis = redis
        self.instance = instance
        self._reserve = redis.register_script(_RESERVE)

    def _names(self, key: KeyEntry, now: float) -> tuple[str, str, str]:
        minute = int(now // 60)
        month = time.strftime("%Y%m", time.gmtime(now))
        return (
            naming.gateway_key(self.instance, "rpm", key.prefix, minute),
            naming.gateway_key(self.instance, "tpm", key.prefix, minute),
            naming.gateway_key(self.instance, "budget", key.team_id, month),
        )

    async def reserve(
        self, key: KeyEntry, tokens: int, now: float
    ) -> tuple[Reservation | None, Refusal | None]:
        rpm_name, tpm_name, budget_name = self._names(key, now)
        code = int(
            await self._reserve(
                keys=[rpm_name, tpm_name, budget_name],
                args=[
                    key.rpm or 0,
                    key.tpm or 0,
                    key.team_budget or 0,
                    tokens,
                    MINUTE_TTL_S,
                    MONTH_TTL_S,
                ],
            )
        )
        if code == OK:
            return Reservation(tpm_name if key.tpm else None, budget_name, tokens), None
        if code == TOO_LARGE:
            return None, Refusal(code, None)
        retry = seconds_to_next_month(now) if code == BUDGET else 60 - int(now) % 60
        return None, Refusal(code, max(1, retry))

    async def settle(self, reservation: Reservation, used_tokens: int) -> None:
        """Replace the reservation by the tokens really used (may be negative: given back)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            settle_into(pipe, reservation, used_tokens)
            await pipe.execute()

    async def month_used(self, team_id: int, now: float) -> int:
        month = time.strftime("%Y%m", time.gmtime(now))
        value = await self.redis.get(naming.gateway_key(self.instance, "budget", team_id, month))
        return int(value or 0)


def settle_into(pipe: Any, reservation: Reservation, used_tokens: int) -> None:
    """Queue the settling of ``reservation`` on a pipeline (see :meth:`Limiter.settle`)."""
    delta = used_tokens - reservation.tokens
    if delta == 0:
        return
    # INCRBY recreates a key that expired meanwhile (a request longer than the TTL): give it
    # its TTL again so nothing outlives its window.
    if reservation.tpm_key is not None:
        pipe.incrby(reservation.tpm_key, delta).expire(reservation.tpm_key, MINUTE_TTL_S)
    pipe.incrby(reservation.budget_key, delta).expire(reservation.budget_key, MONTH_TTL_S)


def seconds_to_next_month(now: float) -> int:
    moment = time.gmtime(now)
    year, month = moment.tm_year + moment.tm_mon // 12, moment.tm_mon % 12 + 1
    return math.ceil(calendar.timegm((year, month, 1, 0, 0, 0)) - now)
