"""The form that makes a key on a team's gateway page (checked again by ``accounts.keys``)."""

from __future__ import annotations

from django import forms

from accounts.keys import MAX_EXPIRES_DAYS, KeySettings
from accounts.models import KeyScope


class KeyForm(forms.Form):
    name = forms.CharField(max_length=100, help_text="What the key is for, e.g. ci or notebook")
    scope = forms.ChoiceField(choices=KeyScope.choices, initial=KeyScope.INFERENCE)
    models = forms.CharField(
        required=False,
        help_text="Served model names (deployment names), comma-separated; empty: all of the "
        "team's models",
    )
    expires_days = forms.IntegerField(
        required=False, min_value=1, max_value=MAX_EXPIRES_DAYS, label="Expires after (days)"
    )
    rpm = forms.IntegerField(required=False, min_value=1, label="Requests per minute")
    tpm = forms.IntegerField(required=False, min_value=1, label="Tokens per minute")

    def settings(self) -> KeySettings:
        data = self.cleaned_data
        names = tuple(name.strip() for name in data["models"].split(",") if name.strip())
        return KeySettings(
            name=data["name"],
            scope=data["scope"],
            model_names=names,
            expires_days=data["expires_days"],
            rpm=data["rpm"],
            tpm=data["tpm"],
        )
