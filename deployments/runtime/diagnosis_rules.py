"""The failure signatures ``diagnostics.diagnose`` recognises: one rule per root cause, each with
its remedy.

A rule matches a log line in two ways. Its ``patterns`` are the message texts that name the cause,
collected across vLLM, torch, transformers, Docker and the NVIDIA container toolkit versions
(``tests/fixtures/diagnosis-corpus`` holds a real log for each). Its ``raised`` signatures match on
structure instead of wording: the exception type of a traceback's last line and the frame that
raised it, so a new sentence from the same place still points at the same cause::

    Raised(("TypeError",), r"tokeniz|sentencepiece")   # any TypeError out of tokenizer code
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import IntEnum


class Rank(IntEnum):
    """How directly a signature names the cause (lower sorts first)."""

    ROOT = 0  # names the cause itself
    CONSEQUENCE = 1  # a downstream symptom of a cause usually printed earlier
    WRAPPER = 2  # says only "something above failed"


@dataclass(frozen=True)
class Raised:
    """An exception of one of ``types`` raised in a frame whose ``File "path", line n, in
    function`` text matches ``frame``."""

    types: tuple[str, ...]
    frame: re.Pattern[str]


@dataclass(frozen=True)
class Rule:
    code: str
    title: str
    remedy: str
    patterns: tuple[re.Pattern[str], ...]
    rank: Rank = Rank.ROOT
    raised: tuple[Raised, ...] = ()
    supersedes: tuple[str, ...] = ()  # codes this cause explains when both appear


def _rule(
    code: str,
    title: str,
    remedy: str,
    *patterns: str,
    rank: Rank = Rank.ROOT,
    raised: tuple[tuple[tuple[str, ...], str], ...] = (),
    supersedes: tuple[str, ...] = (),
) -> Rule:
    return Rule(
        code,
        title,
        remedy,
        tuple(re.compile(p, re.IGNORECASE) for p in patterns),
        rank,
        tuple(Raised(types, re.compile(frame, re.IGNORECASE)) for types, frame in raised),
        supersedes,
    )


_CONTAINER_HOST = (
    _rule(
        "no-nvidia-runtime",
        "The host's Docker has no NVIDIA container runtime",
        "Install nvidia-container-toolkit on the host, run `nvidia-ctk runtime configure "
        "--runtime=docker` and restart dockerd; until then the host can only run CPU images.",
        r'could not select device driver "[^"]*" with capabilities: \[\[gpu\]\]',
        r"unknown or invalid runtime name: nvidia",
        r"Unknown runtime specified nvidia",
    ),
    _rule(
        "gpu-request-conflict",
        "The GPU request set both a count and device ids",
        "Request GPUs by device id only (Berth does); check a hand-written compose file.",
        r"cannot set both Count and DeviceIDs on device request",
    ),
    _rule(
        "gpu-index-unknown",
        "The requested GPU does not exist on this host",
        "Request only GPUs the host has: Berth places deployments on GPUs from the host's "
        "inventory, so refresh the inventory if GPUs were removed or renumbered.",
        r"nvidia-container-cli: device error: \S+: unknown device",
    ),
    _rule(
        "host-driver-unavailable",
        "The host's NVIDIA driver is not loaded or does not match its libraries",
        "On the GPU host, make `nvidia-smi` work first: install or reload the driver, and reboot "
        "after a driver or kernel update so the kernel module matches the user-space libraries. "
        "The container toolkit only passes the host's driver through.",
        r"nvidia-container-cli: initialization error: (load library failed|nvml error|driver "
        r"error|cuda error)",
        r"nvidia-container-cli: detection error: nvml error",
        r"Failed to initialize NVML: Driver/library version mismatch",
    ),
    _rule(
        "cuda-driver-mismatch",
        "The host's NVIDIA driver is too old for the image's CUDA",
        "Upgrade the host driver, or use an older vLLM image built for the host's CUDA version.",
        r"Error 803",
        r"unsupported display driver / cuda driver combination",
        r"CUDA driver version is insufficient for CUDA runtime version",
        r"cudaErrorInsufficientDriver",
        r"The NVIDIA driver on your system is too old",
        r"requirement error: unsatisfied condition: cuda ?>=",
        r"please update your driver to a newer version, or use an earlier cuda container",
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
        "image-lacks-gpu-arch",
        "The image was not built for this GPU's architecture",
        "Use a vLLM image built for this GPU generation (a CUDA 12.8+ image for Blackwell, "
        "sm_120), or build one with the architecture in TORCH_CUDA_ARCH_LIST.",
        r"no kernel image is available for execution on the device",
        r"sm_\d+ is not compatible with the current PyTorch installation",
    ),
    _rule(
        "gpu-unsupported",
        "The GPU is older than this vLLM supports",
        "Use GPUs of compute capability 7.0 or newer, or an image built for older GPUs.",
        r"GPUs with compute capability below [\d.]+ are not supported",
        supersedes=("bf16-unsupported",),
    ),
)

_GPU_AND_MEMORY = (
    _rule(
        "nccl-shm",
        "NCCL could not create shared memory (/dev/shm too small)",
        "Run the container with --ipc=host or a shm_size of several GiB (Berth sets --ipc=host).",
        r"Error while (creating|attaching to) shared memory segment",
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
        r"peer access is not supported between these two devices",
        r"cudaErrorPeerAccessUnsupported",
    ),
    _rule(
        "tp-heads-not-divisible",
        "The tensor-parallel size does not divide the attention heads",
        "Choose a tensor-parallel size that divides the number of attention heads (the planner "
        "lists the valid sizes).",
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
        "quant-unsupported-gpu",
        "The checkpoint's quantization needs a newer GPU",
        "Use a checkpoint in a format this GPU supports (for example GPTQ instead of AWQ or FP8 "
        "on older cards), or place the deployment on newer GPUs.",
        r"quantization method \S+ is not supported for the current GPU",
        r"Quantization scheme is not supported for",
    ),
    _rule(
        "pp-unsupported",
        "The model does not support pipeline parallelism in this vLLM",
        "Use tensor parallelism only (Berth plans a tensor-parallel size), or a vLLM version "
        "whose implementation of the model supports pipeline parallelism.",
        r"Pipeline parallelism is (only|not) supported",
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
        "larger tensor-parallel size.",
        r"No available memory for the cache blocks",
        r"# GPU blocks: 0,",
    ),
    _rule(
        "kv-cache-max-model-len",
        "The KV cache cannot hold one sequence of max_model_len",
        "Lower --max-model-len to what the plan says fits, use --kv-cache-dtype fp8, or more GPUs.",
        r"To serve at least one request with the model'?s'? max seq len",
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
        "host-oom-killed",
        "The host ran out of memory (the kernel killed the engine)",
        "Give the host more RAM or free it, or lower the number of GPUs loading at once; exit "
        "code 137 with no Python error means the kernel's OOM killer ended it.",
        r"^\s*Killed\s*$",
        r"line \d+: +\d+ Killed ",
        r"unable to mmap \d+ bytes from file .*Cannot allocate memory",
        r"killed by SIGKILL by OOM killer",
        r"(?<!cgroup )Out of memory: Killed process",  # a cgroup's is container-memory-limit
    ),
)

_MODEL_FILES = (
    _rule(
        "missing-tokenizer",
        "The tokenizer files are missing or placeholders",
        "Copy the checkpoint's tokenizer.model/tokenizer.json and tokenizer_config.json into the "
        "model directory (Berth's inspection lists what is missing).",
        r"TypeError: not a string",
        r"Can't load tokenizer for",
        # A tokenizer constructor handed None for a vocabulary file that is not there.
        raised=((("TypeError",), r"tokeniz|sentencepiece|tiktoken"),),
    ),
    _rule(
        "tokenizer-unreadable",
        "A tokenizer file is corrupt or truncated",
        "Copy the tokenizer files from the checkpoint again (a partial download or copy leaves "
        "invalid JSON); Berth's inspection parses tokenizer.json before registration.",
        raised=((("JSONDecodeError",), r"tokeniz"),),
    ),
    _rule(
        "weights-incomplete",
        "Weight files are missing or truncated",
        "Copy the checkpoint again: a shard named in model.safetensors.index.json is missing or "
        "cut short (Berth's inspection checks every shard the index names).",
        r"Weight files referenced in index but missing",
        r"Error while deserializing header: (MetadataIncompleteBuffer|HeaderTooLarge)",
        r"incomplete metadata, file not fully covered",
    ),
    _rule(
        "config-invalid",
        "The model's config.json is not a usable Hugging Face config",
        "Point the deployment at a directory holding the checkpoint's real config.json (with "
        "model_type), not a placeholder, a GGUF file or a LoRA adapter (Berth's inspection "
        "refuses such directories).",
        r"Should have a `model_type` key in its config\.json",
        r"It looks like the config file at .* is not a valid JSON file",
        raised=((("JSONDecodeError",), r"configuration_utils|transformers_utils/config"),),
    ),
    _rule(
        "trust-remote-code-required",
        "The model needs its own Python code (trust_remote_code)",
        "Ask an admin to review the model's code and approve --trust-remote-code for it.",
        r"(consider setting|set the option|passing the argument|pass the argument) "
        r"`?trust_remote_code=True",
        r"--trust-remote-code flag",
        r"contains custom code which must be executed",
        r"requires you to execute the configuration file",
    ),
    _rule(
        "unsupported-architecture",
        "This vLLM version does not support the model's architecture",
        "Use a newer vLLM image from the allow-list, or the architecture's plugin.",
        r"Model architectures \[.*\] are not supported",
        r"is not supported in-tree anymore",
        r"GGUF model with architecture \S+ is not supported",
    ),
    _rule(
        "transformers-too-old",
        "The image's transformers does not know this model type",
        "Use a newer vLLM image (its transformers must know the model type).",
        r"but Transformers does not recognize this architecture",
        # transformers' CONFIG_MAPPING[model_type] lookup: the model type is newer than it.
        raised=((("KeyError",), r"configuration_auto"),),
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
)

_ENVIRONMENT = (
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
        "disk-full",
        "A disk the engine writes to is full",
        "Free space on the volume the message names (model download or compile cache) or give "
        "the container a larger one; for /dev/shm use --ipc=host or a larger shm_size.",
        r"No space left on device",
        r"kind: StorageFull",
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
        "broken-install",
        "The image's vLLM installation is broken or hidden",
        "Use the unmodified official image; do not mount volumes over its Python packages or "
        "working directory; rebuild custom images with torch and extension builds that match.",
        r"No module named 'vllm'",
        r"The vLLM package was not found, so its version could not be inspected",
        raised=((("ImportError",), r""),),
    ),
    _rule(
        "engine-args-rejected",
        "vLLM rejected its command line",
        "An argument is unknown to this image's vLLM: check the image's entrypoint (do not "
        "repeat `vllm serve` when the image already runs it) and the flags against its version.",
        r"^usage: (vllm|api_server\.py) \[-h\]",
        r"^(vllm|api_server\.py|\S+): error: (unrecognized arguments|argument |the following)",
    ),
    _rule(
        "hf-gated-repo",
        "The model is gated on Hugging Face and no valid token was given",
        "Register the model from local storage (Berth serves local directories), or provide "
        "HF_TOKEN after accepting the licence.",
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
        r"Failed to resolve \\?'huggingface\.co",
        r"We couldn't connect to 'https://huggingface\.co'",
        r"host=\\?'huggingface\.co\\?', port=443\): Max retries exceeded",
    ),
    _rule(
        "engine-ready-timeout",
        "The engine did not become ready in time",
        "Raise VLLM_ENGINE_READY_TIMEOUT_S (Berth derives it from the model size) and check the "
        "storage's read speed.",
        r"Timed out waiting for engine core processes to start",
        r"Timed out waiting for engines to send initial message",
        rank=Rank.CONSEQUENCE,
    ),
    _rule(
        "engine-core-failed",
        "The engine failed to start (see the first error above)",
        "Read the first error above this line; if there is none, the process was likely killed for "
        "using too much host memory.",
        r"Engine core initialization failed",
        r"EngineDeadError",
        r"Engine process failed to start",
        rank=Rank.WRAPPER,
    ),
)

# Signatures of vLLM's CPU engine (vLLM 0.32, docker/vllm-cpu/), each from a real log in
# tests/fixtures/engine-logs/vllm-0.32-cpu/ (captures.json names the command that produced it).
_CPU_ENGINE = (
    _rule(
        "shm-too-small",
        "The container's /dev/shm is too small for the engine's shared memory",
        "Give the container a larger /dev/shm: Berth's containers get --shm-size 8g; a "
        "hand-written docker run needs --shm-size (Docker's default is 64 MiB) or --ipc=host.",
        r"Insufficient space in /dev/shm for shared-memory allocation",
    ),
    _rule(
        "cpu-kv-space-too-large",
        "The CPU engine's KV cache space does not fit in the container's memory",
        "Lower VLLM_CPU_KVCACHE_SPACE (or --max-model-len), or give the container more memory; "
        "Berth's CPU plan sizes both from the host's memory.",
        r"Available memory on node \d+ \([0-9.]+/[0-9.]+ GiB\) on kv cache allocation is less "
        r"than requested memory for kv",
    ),
    _rule(
        "container-memory-limit",
        "The engine exceeded its container's memory limit (the kernel killed it)",
        "Berth's CPU plan sets the limit to weights + KV space + the engine's own memory: a "
        "shorter --max-model-len or a smaller VLLM_CPU_KVCACHE_SPACE lowers what it needs; a "
        "hand-set docker --memory must leave room for the engine's processes (about 3 GiB).",
        r"Memory cgroup out of memory: Killed process",
    ),
    _rule(
        "worker-signal",
        "An engine process crashed with a signal (segmentation fault or illegal instruction)",
        "A crash in native code: check that the image was built for this CPU (an illegal "
        "instruction means the build uses instructions this CPU lacks) and restart; report the "
        "stack printed here if it repeats.",
        r"!!!!!!! Segfault encountered !!!!!!!",
        r"Fatal Python error: (?:Segmentation fault|Illegal instruction|Bus error)",
        r"Illegal instruction \(core dumped\)",
        supersedes=("engine-core-died",),
    ),
    _rule(
        "engine-core-died",
        "The engine's core process died (killed, not a Python error)",
        "The process was killed from outside: the kernel's OOM killer (check the host's and the "
        "container's memory), an operator, or a crash without a message. Restart the deployment; "
        "if it repeats, read the host's kernel log (dmesg).",
        r"engine core exited unexpectedly",
        r"Engine core proc \S+ died unexpectedly",
    ),
)

RULES: tuple[Rule, ...] = (
    _CONTAINER_HOST + _GPU_AND_MEMORY + _MODEL_FILES + _ENVIRONMENT + _CPU_ENGINE
)
RULES_BY_CODE = {rule.code: rule for rule in RULES}
