"""The deploy form. Only typed fields: engine flags are parsed by ``engine_args``, environment
variables come as KEY=VALUE lines checked against the allow-list."""

from __future__ import annotations

from typing import Any

from django import forms

from accounts.access import visible_teams
from accounts.models import slug_validator
from deployments.models import EngineImage
from deployments.planning import DEFAULT_GPU_MEMORY_UTILIZATION
from deployments.runtime.engine_args import DTYPES, KV_CACHE_DTYPES
from gpus.models import Gpu, Host
from models_registry.models import Model, ModelStatus

MAX_ENV_LINES = 32


class DeployForm(forms.Form):
    name = forms.CharField(
        max_length=64,
        validators=[slug_validator],
        help_text="Lowercase letters, digits, hyphens; also the served model name",
    )
    team = forms.ModelChoiceField(queryset=None, empty_label=None)
    model = forms.ModelChoiceField(queryset=None, help_text="Only models whose inspection passed")
    host = forms.ModelChoiceField(queryset=None, empty_label=None)
    image = forms.ModelChoiceField(
        queryset=EngineImage.objects.filter(enabled=True), empty_label=None
    )
    gpu_count = forms.IntegerField(
        label="GPUs",
        required=False,
        min_value=0,
        max_value=16,
        help_text=(
            "Empty: the planner picks the smallest that fits; 0 for a CPU engine (what empty "
            "means on a host without GPUs)"
        ),
    )
    max_model_len = forms.IntegerField(
        label="Context length (tokens)",
        required=False,
        min_value=16,
        max_value=10_000_000,
        help_text="Empty: the model's own maximum, as vLLM does",
    )
    gpu_memory_utilization = forms.DecimalField(
        label="GPU memory utilization",
        required=False,
        min_value=0.1,
        max_value=0.98,
        decimal_places=3,
        help_text=(
            "Share of each GPU's memory vLLM may take "
            f"(empty: {DEFAULT_GPU_MEMORY_UTILIZATION}, vLLM's default)"
        ),
    )
    kv_cache_dtype = forms.ChoiceField(
        label="KV cache dtype", choices=[(c, c) for c in KV_CACHE_DTYPES], initial="auto"
    )
    dtype = forms.ChoiceField(
        label="Weights dtype", choices=[(c, c) for c in DTYPES], initial="auto"
    )
    enforce_eager = forms.BooleanField(
        label="Eager mode",
        required=False,
        help_text="Skip CUDA graphs: faster start, slower decode",
    )
    trust_remote_code = forms.BooleanField(
        label="Trust remote code",
        required=False,
        help_text="Run the model's own Python code; only for models an admin approved",
    )
    environment = forms.CharField(
        label="Environment variables",
        required=False,
        widget=forms.Textarea(attrs={"rows": 3}),
        help_text="KEY=VALUE per line, from the allow-list (e.g. NCCL_P2P_DISABLE=1)",
    )
    override_reason = forms.CharField(
        required=False,
        max_length=500,
        help_text="Admins only: launch although the plan does not fit, and say why",
    )

    def __init__(self, *args: Any, user: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        teams = visible_teams(user)
        self.fields["team"].queryset = teams
        self.fields["model"].queryset = (
            Model.objects.visible_to(user)
            .filter(status__in=[ModelStatus.OK, ModelStatus.WARNINGS])
            .select_related("team")
        )
        self.fields["host"].queryset = Host.objects.order_by("name")
        if not Gpu.objects.filter(present=True, memory_total_mib__gt=0).exists():
            self.fields["gpu_count"].initial = 0  # no GPU anywhere: only a CPU engine can run
        if not getattr(user, "is_admin", False):
            del self.fields["override_reason"]

    def unknown_fields(self, data: Any) -> list[str]:
        """Keys of a POST that are not fields of this form (the CSRF token aside): nothing
        outside the typed fields may reach a deployment, so such a request is refused whole."""
        return sorted(set(data) - set(self.fields) - {"csrfmiddlewaretoken"})

    @staticmethod
    def unknown_fields_message(unknown: list[str]) -> str:
        shown = ", ".join(repr(key[:40]) for key in unknown[:10])
        more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
        return (
            f"Unknown field(s) {shown}{more}: Berth sets container options itself; remove them "
            "and use the form's fields."
        )

    def clean_environment(self) -> dict[str, str]:
        lines = [
            line.strip() for line in self.cleaned_data["environment"].splitlines() if line.strip()
        ]
        if len(lines) > MAX_ENV_LINES:
            raise forms.ValidationError(f"at most {MAX_ENV_LINES} variables")
        variables = {}
        for line in lines:
            name, separator, value = line.partition("=")
            if not separator:
                raise forms.ValidationError(f"{line[:40]!r}: write KEY=VALUE")
            variables[name.strip()] = value.strip()
        return variables

    def engine_args(self) -> dict[str, Any]:
        data = self.cleaned_data
        args = {
            "max_model_len": data.get("max_model_len"),
            "gpu_memory_utilization": str(data["gpu_memory_utilization"])
            if data.get("gpu_memory_utilization")
            else None,
            "kv_cache_dtype": None
            if data.get("kv_cache_dtype") in (None, "auto")
            else data["kv_cache_dtype"],
            "dtype": None if data.get("dtype") in (None, "auto") else data["dtype"],
            "enforce_eager": True if data.get("enforce_eager") else None,
            "trust_remote_code": True if data.get("trust_remote_code") else None,
        }
        return {key: value for key, value in args.items() if value is not None}
