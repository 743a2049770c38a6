"""The register form: a team the user belongs to and a path (normalized once, by the register
service, which names the field in its refusal)."""

from __future__ import annotations

from typing import Any

from django import forms

from accounts.access import visible_teams
from accounts.models import Team
from models_registry import paths


class RegisterModelForm(forms.Form):
    team = forms.ModelChoiceField(queryset=Team.objects.none(), empty_label=None)
    path = forms.CharField(
        max_length=paths.MAX_PATH_LENGTH,
        strip=False,  # surrounding spaces are an error the user should see, not silently fixed
        help_text="The canonical path everyone uses, e.g. /ceph/models/team-a/Llama-3.1-8B",
        widget=forms.TextInput(attrs={"autocomplete": "off", "spellcheck": "false"}),
    )

    def __init__(self, *args: Any, user: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.fields["team"].queryset = visible_teams(user)
