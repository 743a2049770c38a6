"""Per-key requests and tokens per minute, and each team's monthly token budget, in Redis.

Counters live in Redis so that they hold across every gateway process. One Lua script checks
all three and, only when all pass, counts the request and reserves its tokens — atomically, so
two gateways cannot both take the last slot, and in one round trip. Tokens are reserved up
front (``max_tokens`` plus an estimate of the prompt) and settled when the engine reports its
real ``usage``.

RPM and TPM are sliding windows, not calendar minutes (with those a burst at 12:00:59 and
another at 12:01:00 pass twice the limit): each key has a hash of per-second counts, and a
request is admitted when the counts of the last ``WINDOW_BUCKETS`` seconds, its own second
included, leave room for it. 61 buckets cover any 60-second span whole, so no 60 seconds ever
see more than the limit; the price is that a count leaves the window up to one second late.
``Retry-After`` is the time until enough of the window has left it. The budget is the calendar
month in UTC, as the product promises; its ``Retry-After`` is the time to the next month. A
request that could never fit (its reservation alone exceeds the key's TPM) is refused without
a retry time.
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
WINDOW_BUCKETS = 61  # seconds counted: this one and the 60 before it
WINDOW_TTL_S = 120
MONTH_TTL_S = 40 * 86400

OK, RPM, TPM, BUDGET, TOO_LARGE = 0, 1, 2, 3, 4

# Returns {code, the second from which the refused request would fit (0: no such second)}.
_RESERVE = """
local rpm, tpm, budget = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tokens, second, buckets = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local oldest = second - buckets + 1
-- The window's total after dropping the seconds that left it, and, when cost does not fit,
-- the first second at which enough of it will have left.
local function window(key, limit, cost)
  local flat = redis.call('HGETALL', key)
  local total, kept, stale = 0, {}, {}
  for i = 1, #flat, 2 do
    local at, count = tonumber(flat[i]), tonumber(flat[i + 1])
    if at < oldest then
      stale[#stale + 1] = flat[i]
    else
      total = total + count
      kept[#kept + 1] = {at, count}
    end
  end
  if #stale > 0 then redis.call('HDEL', key, unpack(stale)) end
  if total + cost <= limit then return nil end
  table.sort(kept, function(a, b) return a[1] < b[1] end)
  local excess = total + cost - limit
  for _, bucket in ipairs(kept) do
    excess = excess - bucket[2]
    if excess <= 0 then return bucket[1] + buckets end
  end
  return second + buckets
end
if tpm > 0 and tokens > tpm then return {4, 0} end
if rpm > 0 then
  local retry = window(KEYS[1], rpm, 1)
  if retry then return {1, retry} end
end
if tpm > 0 then
  local retry = window(KEYS[2], tpm, tokens)
  if retry then return {2, retry} end
end
if budget > 0 and tonumber(redis.call('GET', KEYS[3]) or '0') + tokens > budget then
  return {3, 0}
end
if rpm > 0 then
  redis.call('HINCRBY', KEYS[1], ARGV[5], 1); redis.call('EXPIRE', KEYS[1], ARGV[7])
end
if tpm > 0 then
  redis.call('HINCRBY', KEYS[2], ARGV[5], tokens); redis.call('EXPIRE', KEYS[2], ARGV[7])
end
redis.call('INCRBY', KEYS[3], tokens); redis.call('EXPIRE', KEYS[3], ARGV[8])
return {0, 0}
"""


@dataclass(frozen=True, slots=True)
class Reservation:
    """What a request holds: settled (corrected by the real token count) when it ends."""

    tpm_key: str | None
    second: int  # the TPM window's bucket the tokens were counted in
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
        month = time.strftime("%Y%m", time.gmtime(now))
        return (
            naming.gateway_key(self.instance, "rpm", key.prefix),
            naming.gateway_key(self.instance, "tpm", key.prefix),
            naming.gateway_key(self.instance, "budget", key.team_id, month),
        )

    async def reserve(
        self, key: KeyEntry, tokens: int, now: float
    ) -> tuple[Reservation | None, Refusal | None]:
        rpm_name, tpm_name, budget_name = self._names(key, now)
        second = int(now)
        code, fits_at = await self._reserve(
            keys=[rpm_name, tpm_name, budget_name],
            args=[
                key.rpm or 0,
                key.tpm or 0,
                key.team_budget or 0,
                tokens,
                second,
                WINDOW_BUCKETS,
                WINDOW_TTL_S,
                MONTH_TTL_S,
            ],
        )
        code = int(code)
        if code == OK:
            return Reservation(tpm_name if key.tpm else None, second, budget_name, tokens), None
        if code == TOO_LARGE:
            return None, Refusal(code, None)
        retry = seconds_to_next_month(now) if code == BUDGET else math.ceil(int(fits_at) - now)
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
    # HINCRBY may recreate a second that left the window meanwhile (a request longer than a
    # minute): the next reservation drops it; the TTL keeps an idle key from outliving it.
    if reservation.tpm_key is not None:
        pipe.hincrby(reservation.tpm_key, str(reservation.second), delta)
        pipe.expire(reservation.tpm_key, WINDOW_TTL_S)
    pipe.incrby(reservation.budget_key, delta).expire(reservation.budget_key, MONTH_TTL_S)


def seconds_to_next_month(now: float) -> int:
    moment = time.gmtime(now)
    year, month = moment.tm_year + moment.tm_mon // 12, moment.tm_mon % 12 + 1
    return math.ceil(calendar.timegm((year, month, 1, 0, 0, 0)) - now)
