"""The audit review's query string as a form: one place that parses, validates and applies the
filters, for the review page and the exports alike.

Every filter is an equality on one indexed column, walked newest first by ``seq`` (keyset
pages: ``before=<seq>``). A time range becomes a range of ``seq`` first: ``record()`` stamps
``time`` under the chain lock, never earlier than the previous event, so the events of a time
range are one contiguous run of sequence numbers, found with two lookups on the (time, seq)
index. Every filter then stays an index range scan whatever else is combined with it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django import forms
from django.db.models import QuerySet

from audit.actions import ActorKind, Outcome, grouped_choices
from audit.models import AuditEvent

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 200
# Query parameter -> model field, for the equality filters.
EXACT_FILTERS = {
    "action": "action",
    "outcome": "outcome",
    "actor": "actor_name",
    "kind": "actor_kind",
    "team": "team_slug",
    "target_type": "target_type",
    "target_id": "target_id",
    "request": "request_id",
    "job": "job_id",
}
TIME_HELP = "a date and time in UTC, e.g. 2026-11-27T09:30 or 2026-11-27T09:30:00+01:00"


def _time_field(label: str) -> forms.DateTimeField:
    # Django's DateTimeField parses ISO 8601 (with or without seconds and offset), which covers
    # what an <input type="datetime-local"> sends ("2026-11-27T09:30"). Naive times are read in
    # TIME_ZONE (UTC unless configured), the zone the page shows times in.
    return forms.DateTimeField(
        label=label,
        required=False,
        widget=forms.DateTimeInput(attrs={"type": "datetime-local", "step": "1"}),
        error_messages={"invalid": f"{label}: enter {TIME_HELP}."},
    )


def _choices(choices: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [("", "any"), *choices]


def _named(label: str, **messages: str) -> dict[str, str]:
    """Error messages that start with the field's label, so an error names its field."""
    defaults = {
        "invalid_choice": "%(value)s is not one of the choices; pick one from the list.",
        "max_length": "at most %(limit_value)d characters.",
        "invalid": "enter a whole number.",
        "min_value": "must be at least %(limit_value)s.",
        "max_value": "must be at most %(limit_value)s.",
    }
    return {key: f"{label}: {text}" for key, text in {**defaults, **messages}.items()}


def _text(label: str, max_length: int) -> forms.CharField:
    return forms.CharField(
        label=label, required=False, max_length=max_length, error_messages=_named(label)
    )


def _choice(label: str, choices: list[tuple[str, str]]) -> forms.ChoiceField:
    return forms.ChoiceField(
        label=label, required=False, choices=_choices(choices), error_messages=_named(label)
    )


class ReviewFilterForm(forms.Form):
    since = _time_field("From")
    until = _time_field("Until")
    actor = _text("Actor", 150)
    kind = _choice("Actor kind", ActorKind.choices)
    team = _text("Team", 64)
    action = _choice("Action", grouped_choices())
    outcome = _choice("Outcome", Outcome.choices)
    target_type = _text("Target type", 100)
    target_id = _text("Target id", 64)
    request = _text("Request id", 64)
    job = _text("Job id", 64)
    before = forms.IntegerField(
        label="Before sequence",
        required=False,
        min_value=1,
        widget=forms.HiddenInput,
        error_messages=_named("Before sequence"),
    )
    size = forms.IntegerField(
        label="Per page",
        required=False,
        min_value=1,
        max_value=MAX_PAGE_SIZE,
        error_messages=_named("Per page"),
    )

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        since, until = data.get("since"), data.get("until")
        if since and until and since >= until:
            self.add_error("until", "Until: must be later than From.")
        return data

    # --- reading the validated values ---------------------------------------------------------

    def active(self) -> dict[str, str]:
        """The filters in use (not ``before``/``size``) as query-string values, for links to the
        exports and for the audit record of an export."""
        values: dict[str, str] = {}
        for name in (*EXACT_FILTERS, "since", "until"):
            value = self.cleaned_data.get(name)
            if value in (None, ""):
                continue
            values[name] = value.isoformat() if isinstance(value, datetime) else str(value)
        return values

    @property
    def page_size(self) -> int:
        return self.cleaned_data.get("size") or DEFAULT_PAGE_SIZE

    @property
    def before_seq(self) -> int | None:
        return self.cleaned_data.get("before")

    def events(self) -> QuerySet[AuditEvent]:
        """The filtered events, newest first (without ``before``). At most two queries run here
        (the time range's bounds); the result is lazy."""
        data = self.cleaned_data
        events = AuditEvent.objects.order_by("-seq").filter(
            **{field: data[param] for param, field in EXACT_FILTERS.items() if data.get(param)}
        )
        since, until = data.get("since"), data.get("until")
        if since is not None:
            first = (
                AuditEvent.objects.filter(time__gte=since)
                .order_by("time", "seq")
                .values_list("seq", flat=True)
                .first()
            )
            if first is None:
                return events.none()
            events = events.filter(seq__gte=first, time__gte=since)
        if until is not None:
            last = (
                AuditEvent.objects.filter(time__lt=until)
                .order_by("-time", "-seq")
                .values_list("seq", flat=True)
                .first()
            )
            if last is None:
                return events.none()
            events = events.filter(seq__lte=last, time__lt=until)
        return events


def parse(query: Any) -> ReviewFilterForm:
    """A bound, validated form for a request's GET parameters (blank values are ignored)."""
    form = ReviewFilterForm({key: value.strip() for key, value in query.items() if value.strip()})
    form.is_valid()
    return form
