"""The one registry of audit verbs. ``record()`` refuses any action not listed here, so the
review page's filter and the exports always know every verb that can appear."""

from __future__ import annotations

from django.db import models


class Action(models.TextChoices):
    # Authentication and accounts
    AUTH_LOGIN = "auth.login", "Signed in"
    AUTH_LOGOUT = "auth.logout", "Signed out"
    AUTH_LOGIN_FAILED = "auth.login_failed", "Sign-in failed"
    AUTH_LOCKED_OUT = "auth.locked_out", "Sign-in locked after repeated failures"
    ACCOUNT_ADMIN_CREATED = "account.admin_created", "First admin account created"
    ACCOUNT_CREATED = "account.created", "Account created"
    ACCOUNT_ROLE_CHANGED = "account.role_changed", "Account role changed"
    TEAM_CREATED = "team.created", "Team created"
    TEAM_MEMBER_ADDED = "team.member_added", "Team member added"
    TEAM_MEMBER_REMOVED = "team.member_removed", "Team member removed"
    TEAM_QUOTA_CHANGED = "team.quota_changed", "Team GPU quota changed"
    TEAM_BUDGET_CHANGED = "team.budget_changed", "Team monthly token budget changed"
    TEAM_MEMORY_QUOTA_CHANGED = "team.memory_quota_changed", "Team host memory quota changed"
    API_KEY_CREATED = "apikey.created", "API key created"
    API_KEY_ROTATED = "apikey.rotated", "API key rotated"
    API_KEY_REVOKED = "apikey.revoked", "API key revoked"
    API_KEY_EXPIRED = "apikey.expired", "API key expired"
    API_KEY_DENIED = "apikey.denied", "Request with an API key refused"
    # The audit trail itself
    AUDIT_VERIFY_REQUESTED = "audit.verify_requested", "Chain verification requested"
    AUDIT_VERIFIED = "audit.verified", "Chain verified"
    AUDIT_EXPORTED = "audit.exported", "Audit events exported"
    AUDIT_PRUNED = "audit.pruned", "Old audit events pruned (checkpoint)"
    REQUEST_CONTENDED = "request.contended", "Request refused: the database stayed busy"
    # Models, GPUs and deployments (written by their apps)
    MODEL_REGISTERED = "model.registered", "Model registered"
    MODEL_INSPECTED = "model.inspected", "Model inspected"
    MODEL_REMOVED = "model.removed", "Model removed"
    MODEL_MISSING = "model.missing", "Model vanished from disk"
    MODEL_REMOTE_CODE_APPROVED = "model.remote_code_approved", "Remote code approved"
    MODEL_REMOTE_CODE_REVOKED = "model.remote_code_revoked", "Remote-code approval revoked"
    MODELS_SYNCED = "models.synced", "Storage mount synced"
    MODEL_SYNC_FAILED = "model.sync_failed", "A directory could not be synced"
    MODELS_SYNC_REQUESTED = "models.sync_requested", "Storage sync requested"
    STORAGE_MOUNT_SAVED = "storage.mount_saved", "Storage mount saved"
    HOST_REGISTERED = "host.registered", "Host registered"
    HOST_UPDATED = "host.updated", "Host updated"
    HOST_INVENTORY_UNAVAILABLE = "host.inventory_unavailable", "Host inventory unavailable"
    HOST_INVENTORY_RESTORED = "host.inventory_restored", "Host inventory restored"
    GPU_APPEARED = "gpu.appeared", "GPU appeared"
    GPU_DISAPPEARED = "gpu.disappeared", "GPU disappeared"
    GPU_RESERVED = "gpu.reserved", "GPUs reserved"
    GPU_RELEASED = "gpu.released", "GPUs released"
    DEPLOYMENT_LAUNCH_REQUESTED = "deployment.launch_requested", "Launch requested"
    DEPLOYMENT_STATE_CHANGED = "deployment.state_changed", "Deployment state changed"
    DEPLOYMENT_STOP_REQUESTED = "deployment.stop_requested", "Stop requested"
    DEPLOYMENT_RESTART_REQUESTED = "deployment.restart_requested", "Restart requested"
    DEPLOYMENT_DELETE_REQUESTED = "deployment.delete_requested", "Delete requested"
    DEPLOYMENT_DELETED = "deployment.deleted", "Deployment deleted"
    DEPLOYMENT_PLAN_OVERRIDDEN = "deployment.plan_overridden", "Plan overridden by an admin"
    DEPLOYMENT_PREWARMED = "deployment.prewarmed", "Model files prewarmed into the page cache"
    DEPLOYMENT_PATH_CHANGED = "deployment.path_changed", "Model directory changed before launch"
    DEPLOYMENT_IMAGE_REFUSED = "deployment.image_refused", "Host image does not match its pin"
    DEPLOYMENT_LAUNCH_REFUSED = (
        "deployment.launch_refused",
        "Launch refused: the request no longer passes the rules",
    )
    DEPLOYMENT_SCALED = "deployment.scaled", "Replicas changed by the scaler"
    DEPLOYMENT_SCALE_BLOCKED = (
        "deployment.scale_blocked",
        "Scale-up or wake blocked (quota, GPUs or host memory)",
    )
    DEPLOYMENT_SCALING_POLICY_CHANGED = (
        "deployment.scaling_policy_changed",
        "Scaling policy changed",
    )
    ENGINE_IMAGE_SAVED = "image.saved", "Engine image allow-list changed"
    GC_RAN = "gc.ran", "Garbage collection ran"
    GC_REQUESTED = "gc.requested", "Garbage collection requested"
    RECONCILE_RAN = "reconcile.ran", "Host reconciled"
    RECONCILE_ORPHAN_REMOVED = "reconcile.orphan_removed", "Orphan engine container removed"
    RECONCILE_JOB_RESUMED = "reconcile.job_resumed", "Lost job enqueued again"


# The subject each action's prefix belongs to, in the order the review's filter lists them.
SUBJECTS: dict[str, str] = {
    "auth": "Sign-in",
    "account": "Accounts and teams",
    "team": "Accounts and teams",
    "apikey": "API keys",
    "deployment": "Deployments",
    "image": "Deployments",
    "model": "Models and storage",
    "models": "Models and storage",
    "storage": "Models and storage",
    "host": "Hosts and GPUs",
    "gpu": "Hosts and GPUs",
    "gc": "Maintenance",
    "reconcile": "Maintenance",
    "request": "Maintenance",
    "audit": "The audit trail",
}

OTHER_SUBJECT = "Other"


def grouped_choices() -> list[tuple[str, list[tuple[str, str]]]]:
    """Every action as ``(value, label)``, grouped by subject (for an ``<optgroup>`` select)."""
    groups: dict[str, list[tuple[str, str]]] = {subject: [] for subject in SUBJECTS.values()}
    groups[OTHER_SUBJECT] = []
    for action in Action:
        subject = SUBJECTS.get(action.value.split(".", 1)[0], OTHER_SUBJECT)
        groups[subject].append((action.value, action.label))
    return [(subject, choices) for subject, choices in groups.items() if choices]


class Outcome(models.TextChoices):
    OK = "ok", "OK"
    FAILED = "failed", "Failed"
    DENIED = "denied", "Denied"


class ActorKind(models.TextChoices):
    USER = "user", "User"
    SYSTEM = "system", "System"
    JOB = "job", "Job"
    KEY = "key", "API key"
