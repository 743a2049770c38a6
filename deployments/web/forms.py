"""The deploy form. Only typed fields: engine flags are parsed by ``engine_args``, environment
variables come as KEY=VALUE lines checked against the allow-list."""

from __future__ import annotations

from typing import Any

from django import forms

from accounts.access import visible_teams
from accounts.models import slug_validator
from deployments.models import MAX_REPLICAS, EngineImage
from deployments.planning import DEFAULT_GPU_MEMORY_UTILIZATION
from deployments.runtime.engine_args import (
    DTYPES,
    KV_CACHE_DTYPES,
    SchemaError,
    parse_engine_args,
)
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
    host = forms.ModelChoiceField(
        queryset=None,
        required=False,
        empty_label="Any host (Berth places each replica)",
        help_text="Empty: each replica goes to an online host whose GPUs fit it, spread over hosts",
    )
    replicas = forms.IntegerField(
        required=False,
        min_value=1,
        max_value=MAX_REPLICAS,
        initial=1,
        help_text="Engines serving this name behind the gateway, each on GPUs of its own",
    )
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
    # Engine settings are text here: ``parse_engine_args`` (run by clean()) is their one parser,
    # with the bounds the deploy service and the launcher apply again.
    max_model_len = forms.CharField(
        label="Context length (tokens)",
        required=False,
        widget=forms.NumberInput,
        help_text="Empty: the model's own maximum, as vLLM does",
    )
    gpu_memory_utilization = forms.CharField(
        label="GPU memory utilization",
        required=False,
        widget=forms.NumberInput(attrs={"step": "0.01"}),
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

    def clean(self) -> dict[str, Any]:
        """The engine settings through the one engine-args parser (remote code is allowed
        here: whether this model may run it is the deploy service's check)."""
        cleaned = super().clean()
        try:
            parse_engine_args(self.engine_args(), trust_remote_code_allowed=True)
        except SchemaError as exc:
            for field, message in exc.errors.items():
                self.add_error(field if field in self.fields else None, message)
        return cleaned

    def engine_args(self) -> dict[str, Any]:
        """The engine settings as the user typed them (empty ones left out), for
        ``parse_engine_args``."""
        data = self.cleaned_data
        args = {
            "max_model_len": data.get("max_model_len") or None,
            "gpu_memory_utilization": data.get("gpu_memory_utilization") or None,
            "kv_cache_dtype": None
            if data.get("kv_cache_dtype") in (None, "auto")
            else data["kv_cache_dtype"],
            "dtype": None if data.get("dtype") in (None, "auto") else data["dtype"],
            "enforce_eager": True if data.get("enforce_eager") else None,
            "trust_remote_code": True if data.get("trust_remote_code") else None,
        }
        return {key: value for key, value in args.items() if value is not None}


class ApiDeployForm(DeployForm):
    """The deploy form bound to a JSON request: the same choices, limits and filters, with the
    team, host and image named by slug or name instead of by primary key. Engine settings and
    environment come as JSON objects, parsed by the same schema the deploy service applies."""

    NATURAL_KEYS = {"team": "slug", "host": "name", "image": "name"}
    BOUND = ("team", "model", "host", "image", "name", "gpu_count", "replicas")

    def __init__(self, *args: Any, user: Any, **kwargs: Any):
        super().__init__(*args, user=user, **kwargs)
        for name in set(self.fields) - set(self.BOUND):
            del self.fields[name]
        for name, key in self.NATURAL_KEYS.items():
            self.fields[name].to_field_name = key
        for name in ("team", "model", "host", "image"):
            key = self.NATURAL_KEYS.get(name, "id")
            self.fields[name].error_messages["invalid_choice"] = (
                f"no {name} with that {key} that you may use"
            )
