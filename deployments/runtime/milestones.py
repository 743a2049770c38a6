"""The engine's start-up milestones, read from its log: each resets the watcher's stall timer
and becomes a line on the deployment's timeline.

The patterns are vLLM's own lines, as the real engines print them: the CPU engine of
``docker/vllm-cpu/`` (``tests/fixtures/engine-logs/vllm-0.32-cpu/``) and GPU engines (the real
logs of ``tests/fixtures/diagnosis-corpus/``); a test checks each against those captures, and
that the stand-in engine prints nothing the real ones do not::

    milestone("(EngineCore pid=21) INFO ... CPU KV cache size: 1,048,576 tokens, ...")
    # "KV cache holds 1,048,576 tokens"
"""

from __future__ import annotations

import re

MILESTONES: tuple[tuple[re.Pattern[str], str], ...] = (
    (
        re.compile(r"Loading safetensors checkpoint shards:\s+(\d+)% Completed"),
        "loading weights: {0}%",
    ),
    (re.compile(r"Loading weights took ([0-9.]+) seconds"), "weights loaded in {0} s"),
    (re.compile(r"Model loading took ([0-9.]+) GiB"), "model uses {0} GiB per GPU"),
    # CPU (vLLM 0.32): the fixed KV space of VLLM_CPU_KVCACHE_SPACE, of the host's memory.
    (
        re.compile(r"Explicitly set \(([0-9.]+)/([0-9.]+)\) GiB for KV cache"),
        "CPU KV cache space: {0} GiB of {1} GiB",
    ),
    (re.compile(r"Available KV cache memory: ([0-9.]+) GiB"), "KV cache: {0} GiB"),
    (re.compile(r"(?:GPU|CPU) KV cache size: ([0-9,]+) tokens"), "KV cache holds {0} tokens"),
    (re.compile(r"Capturing CUDA graphs|Graph capturing finished"), "capturing CUDA graphs"),
    # CPU: torch.compile runs during the warm-up, silently for tens of seconds on 2 cores.
    (re.compile(r"Warming up model for the compilation"), "compiling the model"),
    (re.compile(r"Warming up done"), "compiled and warmed up"),
    (re.compile(r"saved AOT compiled function to"), "compiled model saved to the cache volume"),
    (re.compile(r"torch\.compile takes ([0-9.]+) s in total"), "torch.compile took {0} s"),
    (
        re.compile(r"init engine \(profile, create kv cache, warmup model\) took ([0-9.]+)"),
        "engine initialised in {0} s",
    ),
    (re.compile(r"Application startup complete"), "server started"),
)


def milestone(line: str) -> str | None:
    """The timeline message for a log line, or None when it marks no progress."""
    for pattern, template in MILESTONES:
        match = pattern.search(line)
        if match:
            return template.format(*match.groups())
    return None
