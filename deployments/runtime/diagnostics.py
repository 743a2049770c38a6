"""Diagnosing a failed (or stalled) engine from its log and container state.

Rules map a log signature to a code, a title and a remedy (signatures from vLLM's own messages,
``shared/reference/vllm.md`` §5). Generic wrappers such as "Engine core initialization failed.
See root cause above" are not causes: the diagnosis looks past them to the first real error, and
lists the most likely root cause first::

    findings = diagnose(log_text, exit_code=1)
    findings[0].code      # "cuda-oom"

A healthy log — harmless warnings included — gives one finding, ``none``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from enum import IntEnum

MAX_LINE = 500  # characters of a log line kept in a finding


class Rank(IntEnum):
    """How directly a signature names the cause (lower sorts first)."""

    ROOT = 0  # names the cause itself
    CONSEQUENCE = 1  # a downstream symptom of a cause usually printed earlier
    WRAPPER = 2  # says only "something above failed"


@dataclass(frozen=True)
class Rule:
    code: str
    title: str
    remedy: str
    patterns: tuple[re.Pattern[str], ...]
    rank: Rank = Rank.ROOT


@dataclass(frozen=True)
class Finding:
    code: str
    title: str
    remedy: str
    line_number: int | None  # 1-based; None for findings from container state
    line: str

    def as_json(self) -> dict[str, object]:
        return asdict(self)


def _rule(code: str, title: str, remedy: str, *patterns: str, rank: Rank = Rank.ROOT) -> Rule:
    return Rule(code, title, remedy, tuple(re.compile(p, re.IGNORECASE) for p in patterns), rank)


RULES: tuple[Rule, ...] = (
    _rule(
        "no-nvidia-runtime",
        "The host's Docker has no NVIDIA container runtime",
        "Install nvidia-container-toolkit on the host, run `nvidia-ctk runtime configure "
        "--runtime=docker` "
        "and restart dockerd; until then the host can only run CPU images.",
        r'could not select device driver "[^"]*" with capabilities: \[\[gpu\]\]',
    ),
    _rule(
        "gpu-request-conflict",
        "The GPU request set both a count and device ids",
        "Request GPUs by device id only (Berth does); check a hand-written compose file.",
        r"cannot set both Count and DeviceIDs on device request",
    ),
    _rule(
        "no-gpu-visible",
        "The container sees no GPU",
        "Check GPU passthrough: run nvidia-smi in a container on this host with the NVIDIA "
        "runtime.",
        r"Failed to infer device type",
        r"No platform detected, vLLM is running on UnspecifiedPlatform",
        r"Found no NVIDIA driver on your system",
        r"No CUDA GPUs are available",
    ),
    _rule(
        "cuda-driver-mismatch",
        "The host's NVIDIA driver is too old for the image's CUDA",
        "Upgrade the host driver, or use an older vLLM image built for the host's CUDA version.",
        r"Error 803",
        r"unsupported display driver / cuda driver combination",
        r"CUDA driver version is insufficient for CUDA runtime version",
    ),
    _rule(
        "nccl-shm",
        "NCCL could not create shared memory (/dev/shm too small)",
        "Run the container with --ipc=host or a shm_size of several GiB (Berth sets --ipc=host).",
        r"Error while creating shared memory segment",
        r"ncclSystemError",
        r"NCCL error.*unhandled system error",
    ),
    _rule(
        "nccl-p2p",
        "GPU peer-to-peer communication failed",
        "Set NCCL_P2P_DISABLE=1 and pass --disable-custom-all-reduce (common on PCIe consumer "
        "GPUs and VMs).",
        r"NCCL error.*unhandled cuda error",
        r"ncclUnhandledCudaError",
    ),
    _rule(
        "tp-heads-not-divisible",
        "The tensor-parallel size does not divide the attention heads",
        "Choose a tensor-parallel size that divides the number of attention heads (the planner "
        "lists the "
        "valid sizes).",
        r"attention heads \(\d+\) must be divisible by tensor parallel size",
        r"must be divisible by tensor parallel size",
    ),
    _rule(
        "quant-tp-misaligned",
        "The quantized weights do not split evenly at this tensor-parallel size",
        "Lower the tensor-parallel size, or use a checkpoint whose quantization group size fits "
        "it.",
        r"(input|output) size is not aligned with the quantized weight shape",
    ),
    _rule(
        "cuda-oom",
        "The GPU ran out of memory while loading the model",
        "Use a larger tensor-parallel size, a quantized checkpoint, or GPUs with more memory.",
        r"CUDA out of memory",
        r"torch\.OutOfMemoryError",
        r"CUDA error: out of memory",
    ),
    _rule(
        "gpu-memory-in-use",
        "Other processes hold memory on the GPU",
        "Free the GPU (see the GPU page for the foreign process) or lower "
        "--gpu-memory-utilization.",
        r"Free memory on device .* is less than desired GPU memory utilization",
        r"Error in memory profiling",
    ),
    _rule(
        "kv-cache-no-memory",
        "No memory is left for the KV cache",
        "Raise --gpu-memory-utilization, lower --max-num-seqs/--max-num-batched-tokens, or use a "
        "larger "
        "tensor-parallel size.",
        r"No available memory for the cache blocks",
    ),
    _rule(
        "kv-cache-max-model-len",
        "The KV cache cannot hold one sequence of max_model_len",
        "Lower --max-model-len to what the plan says fits, use --kv-cache-dtype fp8, or more GPUs.",
        r"To serve at least one request with the model's max seq len",
        r"is larger than the maximum number of tokens that can be stored in KV cache",
    ),
    _rule(
        "max-model-len-exceeds-config",
        "max_model_len is larger than the model supports",
        "Lower --max-model-len to the model's max_position_embeddings (or configure rope scaling "
        "knowingly).",
        r"User-specified max_model_len \(\d+\) is greater than the derived max_model_len",
    ),
    _rule(
        "bf16-unsupported",
        "The GPU does not support bfloat16",
        "Deploy with --dtype half (compute capability below 8.0, e.g. V100 or T4).",
        r"Bfloat16 is only supported on GPUs with compute capability of at least 8\.0",
    ),
    _rule(
        "missing-tokenizer",
        "The tokenizer files are missing or placeholders",
        "Copy the checkpoint's tokenizer.model/tokenizer.json and tokenizer_config.json into the "
        "model "
        "directory (Berth's inspection lists what is missing).",
        r"TypeError: not a string",
        r"Can't load tokenizer for",
    ),
    _rule(
        "trust-remote-code-required",
        "The model needs its own Python code (trust_remote_code)",
        "Ask an admin to review the model's code and approve --trust-remote-code for it.",
        r"trust_remote_code=True",
        r"--trust-remote-code flag",
    ),
    _rule(
        "unsupported-architecture",
        "This vLLM version does not support the model's architecture",
        "Use a newer vLLM image from the allow-list, or the architecture's plugin.",
        r"Model architectures \[.*\] are not supported",
        r"is not supported in-tree anymore",
    ),
    _rule(
        "transformers-too-old",
        "The image's transformers does not know this model type",
        "Use a newer vLLM image (its transformers must know the model type).",
        r"but Transformers does not recognize this architecture",
    ),
    _rule(
        "port-in-use",
        "The server's port is already in use",
        "Pick another port (Berth assigns free ones) and stop stale engine processes.",
        r"Address already in use",
        r"EADDRINUSE",
    ),
    _rule(
        "cache-dir-unwritable",
        "vLLM cannot create its cache directory (~/.cache)",
        "Mount a writable cache volume and set HOME/XDG_CACHE_HOME to it (Berth mounts one per "
        "deployment); VLLM_USE_V1=0 is not the fix and no longer exists.",
        r"<frozen os>",
        r"Permission denied: '[^']*\.cache",
        r"No such file or directory: '[^']*\.cache",
    ),
    _rule(
        "missing-compiler",
        "Triton needs a C compiler the image lacks",
        "Use the official vLLM image, or install gcc (build-essential) in the custom image.",
        r"Failed to find C compiler",
    ),
    _rule(
        "cuda-fork",
        "CUDA was initialized before the workers forked",
        "Set VLLM_WORKER_MULTIPROC_METHOD=spawn.",
        r"Cannot re-initialize CUDA in forked subprocess",
    ),
    _rule(
        "hf-gated-repo",
        "The model is gated on Hugging Face and no valid token was given",
        "Register the model from local storage (Berth serves local directories), or provide "
        "HF_TOKEN "
        "after accepting the licence.",
        r"GatedRepoError",
        r"access a gated repo",
        r"Cannot access gated repo",
    ),
    _rule(
        "hf-offline",
        "vLLM tried to reach Hugging Face but the host is offline",
        "Point the deployment at the model's local directory; nothing should be downloaded at "
        "launch.",
        r"OfflineModeIsEnabled",
        r"LocalEntryNotFoundError",
        r"Failed to resolve 'huggingface\.co'",
        r"We couldn't connect to 'https://huggingface\.co'",
    ),
    _rule(
        "model-path-not-found",
        "vLLM could not find the model directory",
        "Check the storage mount's host path on this GPU host (Berth re-inspects the path before "
        "launch).",
        r"Incorrect path_or_model_id",
        r"Repo id must be in the form",
        r"No supported config format found",
        r"Invalid repository ID or local directory",
    ),
    _rule(
        "chat-template-missing",
        "The tokenizer has no chat template",
        "Use /v1/completions, or deploy with an approved --chat-template.",
        r"default chat template is no longer allowed",
        r"ChatTemplateResolutionError",
    ),
    _rule(
        "engine-ready-timeout",
        "The engine did not become ready in time",
        "Raise VLLM_ENGINE_READY_TIMEOUT_S (Berth derives it from the model size) and check the "
        "storage's "
        "read speed.",
        r"Timed out waiting for engine core processes to start",
        rank=Rank.CONSEQUENCE,
    ),
    _rule(
        "engine-core-failed",
        "The engine failed to start (see the first error above)",
        "Read the first error above this line; if there is none, the process was likely killed for "
        "using too much host memory.",
        r"Engine core initialization failed",
        r"EngineDeadError",
        rank=Rank.WRAPPER,
    ),
)
RULES_BY_CODE = {rule.code: rule for rule in RULES}

HOST_OOM = Finding(
    "host-oom-killed",
    "The container was killed by the kernel (out of host memory)",
    "Give the host more RAM or free it, or lower the number of GPUs loading at once; exit code "
    "137 with no "
    "Python error means the kernel's OOM killer ended it.",
    None,
    "exit code 137",
)
NONE = Finding("none", "No failure found in the log", "Nothing to fix.", None, "")
_TRACEBACK = re.compile(r"^(?:\([\w-]+ pid=\d+\)\s*)?(?:\S+ )?Traceback \(most recent call last\)")
_EXCEPTION = re.compile(r"\b([A-Z]\w*(?:Error|Exception)|KeyboardInterrupt)\b:")


def diagnose(
    log: str | Iterable[str], *, exit_code: int | None = None, oom_killed: bool = False
) -> list[Finding]:
    """Findings for a log (and the container's exit), most likely root cause first."""
    lines = log.splitlines() if isinstance(log, str) else [line.rstrip("\n") for line in log]
    found: dict[str, tuple[Rank, Finding]] = {}
    first_exception: tuple[int, str] | None = None  # not matched by any rule
    for number, line in enumerate(lines, start=1):
        rule = _match(line)
        if rule is not None and rule.code not in found:
            found[rule.code] = (
                rule.rank,
                Finding(rule.code, rule.title, rule.remedy, number, line.strip()[:MAX_LINE]),
            )
        if first_exception is None and rule is None and _EXCEPTION.search(line):
            first_exception = (number, line.strip()[:MAX_LINE])
    findings = [
        finding
        for _, finding in sorted(found.values(), key=lambda item: (item[0], item[1].line_number))
    ]
    roots = [finding for finding in findings if RULES_BY_CODE[finding.code].rank == Rank.ROOT]
    if (exit_code == 137 or oom_killed) and not roots and first_exception is None:
        return [HOST_OOM, *findings]
    if not roots and first_exception is not None:
        number, line = first_exception
        unknown = Finding(
            "unrecognized-error",
            "The engine failed with an error Berth does not recognise",
            "Read the error line and the lines above it; report the signature so a rule can be "
            "added.",
            number,
            line,
        )
        return [unknown, *findings]
    return findings or [NONE]


def _match(line: str) -> Rule | None:
    return next(
        (rule for rule in RULES if any(pattern.search(line) for pattern in rule.patterns)), None
    )
