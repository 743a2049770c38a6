"""Stored plans become versioned ``StoredPlan`` JSON (``deployments.planning.stored``).

Plans stored before were ``Plan.as_json()`` plus ``gpu_memory_utilization``, without a version;
each is rewritten with every field the typed plan reads (a missing one from the deployment's
own columns, or empty). The conversion is written out here, not imported, so this migration
keeps meaning what it meant when the code moves on.
"""

from __future__ import annotations

from django.db import migrations

VERSION = 1
DEFAULT_GPU_MEMORY_UTILIZATION = 0.92  # the planner's default when the plans were stored


def to_version_1(plan: dict, deployment) -> dict:
    startup = plan.get("startup") if isinstance(plan.get("startup"), dict) else {}
    per_gpu = plan.get("per_gpu") or None
    keys = ("budget_bytes", "weights_bytes", "kv_cache_bytes", "overhead_bytes")
    return {
        "version": VERSION,
        "parameter_count": int(plan.get("parameter_count") or 0),
        "weights_bytes": int(plan.get("weights_bytes") or 0),
        "kv_bytes_per_token": int(plan.get("kv_bytes_per_token") or 0),
        "valid_tensor_parallel_sizes": list(plan.get("valid_tensor_parallel_sizes") or []),
        "tensor_parallel_size": plan.get("tensor_parallel_size", deployment.tensor_parallel_size),
        "fits": bool(plan.get("fits", True)),
        "max_model_len": int(plan.get("max_model_len") or 0),
        "max_model_len_supported": int(plan.get("max_model_len_supported") or 0),
        "per_gpu": {key: int(per_gpu.get(key) or 0) for key in keys} if per_gpu else None,
        "reasons": list(plan.get("reasons") or []),
        "suggestions": list(plan.get("suggestions") or []),
        "startup_estimate_s": int(plan.get("startup_estimate_s") or startup.get("total_s") or 0),
        "health_start_period_s": int(
            plan.get("health_start_period_s") or deployment.health_start_period_s
        ),
        "gpu_memory_utilization": float(
            plan.get("gpu_memory_utilization") or DEFAULT_GPU_MEMORY_UTILIZATION
        ),
    }


def forwards(apps, schema_editor) -> None:
    Deployment = apps.get_model("deployments", "Deployment")
    for deployment in Deployment.objects.exclude(plan={}).iterator():
        if deployment.plan and deployment.plan.get("version") != VERSION:
            deployment.plan = to_version_1(deployment.plan, deployment)
            deployment.save(update_fields=["plan"])


def backwards(apps, schema_editor) -> None:
    Deployment = apps.get_model("deployments", "Deployment")
    for deployment in Deployment.objects.exclude(plan={}).iterator():
        if deployment.plan.get("version") == VERSION:
            deployment.plan = {k: v for k, v in deployment.plan.items() if k != "version"}
            deployment.save(update_fields=["plan"])


class Migration(migrations.Migration):
    dependencies = [("deployments", "0002_engine_key")]

    operations = [migrations.RunPython(forwards, backwards)]
