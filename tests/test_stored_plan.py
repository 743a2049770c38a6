"""The stored plan: one typed reader of ``Deployment.plan``, versioned."""

from __future__ import annotations

import math

import pytest

from deployments.planning import GIB, PlanRequest, plan
from deployments.planning.stored import STORED_PLAN_VERSION, StoredPlan, StoredPlanError
from models_registry.tiny_model import LLAMA_CONFIG


def _stored() -> StoredPlan:
    request = PlanRequest(gpu_memory_bytes=24 * GIB, gpus_on_host=2, gpu_memory_utilization=0.9)
    result = plan(LLAMA_CONFIG, request)
    return StoredPlan.from_plan(result, gpu_memory_utilization=0.9)


def test_a_stored_plan_reads_back_what_the_planner_decided() -> None:
    stored = _stored()
    again = StoredPlan.from_json(stored.to_json())
    assert again == stored
    assert (again.version, again.tensor_parallel_size, again.fits) == (STORED_PLAN_VERSION, 1, True)
    assert again.per_gpu is not None
    assert again.per_gpu.budget_bytes == math.ceil(24 * GIB * 0.9)


def test_no_plan_reads_as_none_and_a_foreign_one_is_refused_by_name() -> None:
    assert StoredPlan.from_json({}) is None
    legacy = {key: value for key, value in _stored().to_json().items() if key != "version"}
    with pytest.raises(StoredPlanError, match="version None"):
        StoredPlan.from_json(legacy)
    broken = {**_stored().to_json()}
    del broken["startup_estimate_s"]
    with pytest.raises(StoredPlanError, match="startup_estimate_s"):
        StoredPlan.from_json(broken)
