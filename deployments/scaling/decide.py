"""The scaler's decision: how many replicas a deployment should have now. Pure: no clock, no
database, no network; the periodic job (``deployments.scaling.jobs``) gathers the figures, calls
:func:`decide` and acts on the answer, and tests replay recorded traces through it::

    decision = decide(policy, desired=2, load=Load(replicas=(...), queued=3), now=t, memory=m)
    decision.desired, decision.action, decision.why, decision.figures, decision.memory

The load is read in the engine's own terms, from each replica's ``/metrics``: requests waiting
in vLLM's own queue (``vllm:num_requests_waiting``) and the share of its KV cache in use
(``vllm:kv_cache_usage_perc``), plus the requests the gateways hold or queue for the model.

- **Up**: when in most looks of the last ``up_window_s`` (the median) each ready replica has
  more than ``target_waiting`` requests waiting (the gateway's queue counted in), or the KV
  cache is used past ``target_kv_cache``: by the median ratio of load to target
  (``ceil(ready * ratio)``), at least one, at most doubling, never past the maximum. Not while a
  replica is still starting: its capacity is on the way. The median, not "every look": the
  recorded trace shows a saturated engine's queue as a sawtooth (a batch ends, its clients send
  again, and one reading in four sees 0 waiting), so "pressure on every look" fired a minute
  late; and not the mean, which one reading of a large spike would carry past the target.
- **Down** (hysteresis): only when on every look for the whole ``down_window_s`` nothing waited
  anywhere and the KV cache the replicas use would have stayed under half the target on one
  replica fewer; one replica at a time, each after a full window. Between the two bands nothing
  changes.
- **Idle**: with a minimum of 0, after ``idle_after_s`` without a request and with nothing
  running or waiting, to 0 (the deployment becomes ``idle``).
- **Wake**: at 0, a request held or queued by a gateway brings it back to at least one.
- **Bounds**: a desired count outside the policy's bounds (the policy was edited) moves to the
  nearest bound at once.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field, replace
from typing import Any

# Down only when one replica fewer would stay under this share of the KV cache target: the gap
# between this band and the target is the hysteresis that keeps the count from flapping.
CALM_KV_FRACTION = 0.5
READY = "ready"
STARTING = frozenset({"pending", "queued", "launching", "loading"})


class Action:
    HOLD = "hold"
    UP = "up"
    DOWN = "down"
    IDLE = "idle"
    WAKE = "wake"
    BOUNDS = "bounds"


@dataclass(frozen=True)
class Policy:
    """A deployment's scaling policy (``Deployment``'s policy fields)."""

    min_replicas: int = 1
    max_replicas: int = 1
    target_waiting: float = 2.0
    target_kv_cache: float = 0.8
    up_window_s: float = 30.0
    down_window_s: float = 300.0
    idle_after_s: float = 900.0


@dataclass(frozen=True)
class ReplicaLoad:
    """One replica as the scaler saw it: its state and, when ready, its engine's figures (None:
    ``/metrics`` did not answer)."""

    index: int
    state: str
    waiting: float | None = None
    running: float | None = None
    kv_cache: float | None = None  # 0-1


@dataclass(frozen=True)
class Load:
    replicas: tuple[ReplicaLoad, ...] = ()
    queued: int = 0  # requests the gateways hold or queue for the model now
    last_request_at: float | None = None  # Unix time of the gateways' last request


@dataclass(frozen=True)
class Memory:
    """What the scaler carries from one look to the next (stored on the deployment): the
    looks of the last window (time, load over target, calm) and since when no request came."""

    looks: tuple[tuple[float, float, bool], ...] = ()
    quiet_since: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"looks": [list(look) for look in self.looks], "quiet_since": self.quiet_since}

    @classmethod
    def from_json(cls, data: Any) -> Memory:
        if not isinstance(data, dict):
            return cls()
        looks = []
        for look in data.get("looks") or ():
            if (
                isinstance(look, list)
                and len(look) == 3
                and all(isinstance(v, int | float) for v in look[:2])
            ):
                looks.append((float(look[0]), float(look[1]), bool(look[2])))
        quiet = data.get("quiet_since")
        return cls(tuple(looks), float(quiet) if isinstance(quiet, int | float) else None)

    def window(self, now: float, seconds: float) -> tuple[tuple[float, float, bool], ...]:
        """The looks of the last ``seconds`` (the latest one at least)."""
        return tuple(look for look in self.looks if look[0] >= now - seconds) or self.looks[-1:]

    def calm_since(self) -> float | None:
        """The first of the latest unbroken run of calm looks (None: the last was not calm)."""
        since = None
        for when, _, calm in reversed(self.looks):
            if not calm:
                break
            since = when
        return since

    def covers(self, now: float, seconds: float) -> bool:
        """The looks go back a whole window."""
        return bool(self.looks) and self.looks[0][0] <= now - seconds


MAX_LOOKS = 600


@dataclass(frozen=True)
class Decision:
    desired: int
    action: str
    why: str
    figures: dict[str, Any] = field(default_factory=dict)
    memory: Memory = field(default_factory=Memory)

    @property
    def changes(self) -> bool:
        return self.action not in (Action.HOLD,)


def figures_of(load: Load, desired: int) -> dict[str, Any]:
    """The figures a decision is made on (and recorded with)."""
    ready = [r for r in load.replicas if r.state == READY]
    readings = [r for r in ready if r.waiting is not None]
    kv = [r.kv_cache for r in ready if r.kv_cache is not None]
    waiting = sum(r.waiting or 0.0 for r in readings)
    return {
        "desired": desired,
        "ready": len(ready),
        "starting": sum(1 for r in load.replicas if r.state in STARTING),
        "waiting": round(waiting, 2),
        "running": round(sum(r.running or 0.0 for r in readings), 2),
        "queued": load.queued,
        "waiting_per_replica": round((waiting + load.queued) / max(len(ready), 1), 2),
        "kv_cache": round(sum(kv) / len(kv), 4) if kv else None,
    }


def decide(policy: Policy, desired: int, load: Load, now: float, memory: Memory) -> Decision:
    """The replicas wanted now, why, the figures behind it and the memory for the next look."""
    figures = figures_of(load, desired)
    quiet_since = _quiet_since(load, now, memory)
    if desired == 0:
        return _from_zero(policy, load, figures, replace(memory, quiet_since=quiet_since))
    high = policy.max_replicas
    if desired > high or desired < max(policy.min_replicas, 1):
        bounded = min(max(desired, max(policy.min_replicas, 1)), high)
        why = f"the policy allows {policy.min_replicas}-{high} replicas"
        return Decision(bounded, Action.BOUNDS, why, figures, Memory(quiet_since=quiet_since))
    if figures["starting"]:  # its capacity is on the way: a fresh window once it serves
        why = "a replica is starting"
        return Decision(desired, Action.HOLD, why, figures, Memory(quiet_since=quiet_since))
    keep = max(policy.up_window_s, policy.down_window_s)
    look = (now, _pressure(policy, figures), _calm(policy, figures))
    kept = [old for old in memory.looks if old[0] >= now - keep]
    before = [old for old in memory.looks if old[0] < now - keep][-1:]  # so a window is covered
    looks = (*before, *kept, look)[-MAX_LOOKS:]
    memory = Memory(looks, quiet_since)
    idle = _idle(policy, figures, now, memory)
    if idle is not None:
        return idle
    up = _up(policy, desired, figures, now, memory)
    if up is not None:
        return up
    down = _down(policy, desired, figures, now, memory)
    if down is not None:
        return down
    return Decision(desired, Action.HOLD, "load within the targets", figures, memory)


def _quiet_since(load: Load, now: float, memory: Memory) -> float:
    """Since when no request has come (the gateways' last one, or the first look without)."""
    busy = load.queued or any((r.running or 0) + (r.waiting or 0) for r in load.replicas)
    if busy:
        return now
    since = memory.quiet_since if memory.quiet_since is not None else now
    if load.last_request_at is not None:
        since = max(since, load.last_request_at)
    return since


def _from_zero(policy: Policy, load: Load, figures: dict, memory: Memory) -> Decision:
    wanted = max(policy.min_replicas, 1)
    if load.queued:
        why = f"{load.queued} request(s) waiting at the gateway for an idle deployment"
        return Decision(wanted, Action.WAKE, why, figures, Memory())
    if policy.min_replicas > 0:
        why = f"the policy's minimum is {policy.min_replicas}"
        return Decision(wanted, Action.BOUNDS, why, figures, Memory())
    return Decision(0, Action.HOLD, "idle: no request", figures, memory)


def _idle(policy: Policy, figures: dict, now: float, memory: Memory) -> Decision | None:
    if policy.min_replicas > 0 or not policy.idle_after_s:
        return None
    quiet_for = now - (memory.quiet_since if memory.quiet_since is not None else now)
    if quiet_for < policy.idle_after_s:
        return None
    why = f"no request for {quiet_for:.0f} s (idle after {policy.idle_after_s:.0f} s)"
    return Decision(0, Action.IDLE, why, {**figures, "quiet_s": round(quiet_for, 1)}, Memory())


def _pressure(policy: Policy, figures: dict) -> float:
    """Load over target: above 1 is pressure (the larger of waiting and KV cache)."""
    if not figures["ready"]:
        return 0.0
    ratio = figures["waiting_per_replica"] / policy.target_waiting if policy.target_waiting else 0
    if figures["kv_cache"] is not None and policy.target_kv_cache:
        ratio = max(ratio, figures["kv_cache"] / policy.target_kv_cache)
    return ratio


def _calm(policy: Policy, figures: dict) -> bool:
    """Nothing waits, and one replica fewer would keep the KV cache under the calm band."""
    if figures["waiting"] or figures["queued"] or not figures["ready"]:
        return False
    if figures["kv_cache"] is None or figures["ready"] < 2:
        return True
    projected = figures["kv_cache"] * figures["ready"] / (figures["ready"] - 1)
    return projected < policy.target_kv_cache * CALM_KV_FRACTION


def _up(policy: Policy, desired: int, figures: dict, now: float, memory: Memory) -> Decision | None:
    window = memory.window(now, policy.up_window_s)
    ratio = statistics.median(look[1] for look in window)
    if ratio <= 1.0:
        return None
    figures = {
        **figures,
        "pressure_ratio": round(ratio, 2),
        "window_s": policy.up_window_s,
        "looks": len(window),
    }
    if desired >= policy.max_replicas:
        return Decision(desired, Action.HOLD, "at the policy's maximum", figures, memory)
    if not memory.covers(now, policy.up_window_s):
        return Decision(desired, Action.HOLD, "pressure, within the up window", figures, memory)
    wanted = max(desired + 1, math.ceil(figures["ready"] * ratio))
    wanted = min(wanted, desired * 2, policy.max_replicas)
    why = (
        f"{ratio:.1f}x the target in most looks of the last {policy.up_window_s:g} s (now "
        f"{figures['waiting_per_replica']:g} waiting per ready replica, target "
        f"{policy.target_waiting:g}"
        + (f"; KV cache {figures['kv_cache']:.0%}" if figures["kv_cache"] is not None else "")
        + ")"
    )
    return Decision(wanted, Action.UP, why, figures, Memory(quiet_since=memory.quiet_since))


def _down(
    policy: Policy, desired: int, figures: dict, now: float, memory: Memory
) -> Decision | None:
    calm_since = memory.calm_since()
    if calm_since is None:
        return None
    floor = max(policy.min_replicas, 1)
    calm_for = now - calm_since
    figures = {**figures, "calm_for_s": round(calm_for, 1)}
    if desired <= floor:
        return Decision(desired, Action.HOLD, "calm", figures, memory)
    if calm_for < policy.down_window_s:
        return Decision(desired, Action.HOLD, "calm, within the down window", figures, memory)
    why = f"nothing waiting for {calm_for:.0f} s (down window {policy.down_window_s:g} s)"
    # The next step down needs a whole window of its own.
    return Decision(desired - 1, Action.DOWN, why, figures, Memory(quiet_since=memory.quiet_since))
