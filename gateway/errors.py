"""The gateway's refusals, shaped like OpenAI's so that client libraries handle them as theirs:
``{"error": {"message", "type", "param", "code"}}`` (and the documented extra fields of
``model_not_ready``)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class GatewayError(Exception):
    """A refusal: the status, OpenAI's error body, and headers such as ``Retry-After``."""

    status: int
    type: str
    message: str
    code: str | None = None
    param: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    headers: tuple[tuple[bytes, bytes], ...] = ()

    def body(self) -> bytes:
        error = {
            "message": self.message,
            "type": self.type,
            "param": self.param,
            "code": self.code,
            **self.extra,
        }
        return json.dumps({"error": error}).encode()


def invalid_key(message: str = "Incorrect API key provided.") -> GatewayError:
    return GatewayError(401, "invalid_request_error", message, code="invalid_api_key")


def model_not_found(model: str) -> GatewayError:
    """Also for models that exist elsewhere: the answer must not tell them apart."""
    return GatewayError(
        404,
        "invalid_request_error",
        f"The model `{model}` does not exist or you do not have access to it.",
        code="model_not_found",
        param="model",
    )


def bad_request(message: str, param: str | None = None) -> GatewayError:
    return GatewayError(400, "invalid_request_error", message, code="invalid_request", param=param)


def rate_limited(what: str, retry_after_s: int | None) -> GatewayError:
    headers = ((b"retry-after", str(retry_after_s).encode()),) if retry_after_s else ()
    wait = f" Try again in {retry_after_s} s." if retry_after_s else ""
    return GatewayError(
        429,
        "requests" if what == "requests" else "tokens",
        f"Rate limit reached for this key on {what} per minute.{wait}",
        code="rate_limit_exceeded",
        headers=headers,
    )


def request_too_large(tpm: int) -> GatewayError:
    return GatewayError(
        429,
        "tokens",
        f"This request reserves more tokens than the key's limit of {tpm} per minute; "
        "lower max_tokens.",
        code="rate_limit_exceeded",
        param="max_tokens",
    )


def budget_exhausted(retry_after_s: int) -> GatewayError:
    return GatewayError(
        429,
        "insufficient_quota",
        "Your team has used its monthly token budget; it renews on the 1st (UTC).",
        code="insufficient_quota",
        headers=((b"retry-after", str(retry_after_s).encode()),),
    )


def model_not_ready(
    model: str,
    state: str,
    expected_ready_in_s: float | None,
    diagnosis: list[dict[str, str]],
    why: str = "",
) -> GatewayError:
    """``diagnosis``: the deployment's findings, root cause first (code, title, remedy)."""
    message = (
        f"The model `{model}` failed: {why}"
        if state == "failed"
        else f"The model `{model}` is not ready yet ({state}{': ' + why if why else ''})."
    )
    return GatewayError(
        503,
        "model_not_ready",
        message,
        code="model_not_ready",
        extra={"state": state, "expected_ready_in_s": expected_ready_in_s, "diagnosis": diagnosis},
        headers=((b"retry-after", b"10"),) if state != "failed" else (),
    )


def overloaded(model: str, code: str, blocked: str = "") -> GatewayError:
    """Every replica is full and the gateway's queue for the model is full (``queue_full``) or
    was waited in for ``BERTH_GATEWAY_HOLD_S`` (``model_overloaded``); ``blocked``: why the
    deployment's scaler cannot add a replica now."""
    more = f" Scaling up is blocked: {blocked}" if blocked else ""
    return GatewayError(
        503,
        "server_error",
        f"Every replica of `{model}` is busy; try again shortly.{more}",
        code=code,
        headers=((b"retry-after", b"5"),),
    )


def upstream_failed(message: str) -> GatewayError:
    return GatewayError(502, "upstream_error", message, code="upstream_unavailable")


def not_found_route() -> GatewayError:
    return GatewayError(404, "invalid_request_error", "Unknown route.", code="unknown_url")


def method_not_allowed() -> GatewayError:
    return GatewayError(405, "invalid_request_error", "Method not allowed.", code="bad_method")
