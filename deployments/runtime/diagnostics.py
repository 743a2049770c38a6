"""Diagnosing a failed (or stalled) engine from its log and container state.

Rules (``diagnosis_rules``) map a signature to a code, a title and a remedy. A line matches a rule
by its message or by its structure: the exception type of a traceback and the frame that raised
it. Generic wrappers such as "Engine core initialization failed. See root cause above" are not
causes: the diagnosis looks past them to the first real error, and lists the most likely root
cause first::

    findings = diagnose(log_text, exit_code=1)
    findings[0].code      # "cuda-oom"

Memory errors are read for their numbers, not only their words: an out-of-memory error on a GPU
whose memory is mostly held by another process is ``gpu-memory-in-use``, not ``cuda-oom``. The
container state counts too: Docker's OOMKilled flag with no Python error means the kernel killed
the engine for memory; exit code 137 without that flag means it was killed from outside.

A healthy log — harmless warnings included — gives one finding, ``none``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from deployments.runtime.diagnosis_rules import RULES, RULES_BY_CODE, Raised, Rank, Rule

__all__ = ["RULES", "RULES_BY_CODE", "Finding", "Rank", "Rule", "diagnose"]

MAX_LINE = 500  # characters of a log line kept in a finding
# Memory on the GPU that is not this engine's, above which an OOM is blamed on the neighbours:
# a CUDA context and NCCL buffers of the engine itself stay well under 2 GiB, and a share of the
# card this large is another tenant (torch prints the numbers since 2.0).
FOREIGN_MIN_GIB = 2.0
FOREIGN_MIN_SHARE = 0.15
OOM_MESSAGE_LINES = 10  # torch's OOM message may be wrapped over several lines


@dataclass(frozen=True)
class Finding:
    code: str
    title: str
    remedy: str
    line_number: int | None  # 1-based; None for findings from container state
    line: str

    def as_json(self) -> dict[str, object]:
        return asdict(self)


HOST_OOM = Finding(
    "host-oom-killed",
    RULES_BY_CODE["host-oom-killed"].title,
    RULES_BY_CODE["host-oom-killed"].remedy,
    None,
    "exit code 137",
)
CONTAINER_OOM = Finding(
    "container-memory-limit",
    RULES_BY_CODE["container-memory-limit"].title,
    RULES_BY_CODE["container-memory-limit"].remedy,
    None,
    "OOMKilled: the container reached its memory limit",
)
# SIGKILL (exit 137) without Docker's OOMKilled flag: ``docker kill``, ``docker stop`` past its
# timeout, or another process — not the kernel's OOM killer, which sets the flag.
KILLED_FROM_OUTSIDE = Finding(
    "killed-from-outside",
    "The engine was killed from outside (SIGKILL, not out of memory)",
    "Someone or something ended the container: check `docker events` and the host's audit for "
    "a docker kill / docker stop, a supervisor or a script; Docker did not report an "
    "out-of-memory kill (OOMKilled is false). Restart the deployment when the cause is gone.",
    None,
    "exit code 137, OOMKilled false",
)
NONE = Finding("none", "No failure found in the log", "Nothing to fix.", None, "")
# An exception line names its type first; one quoted inside a sentence (a warning that says
# "errors like `OSError: ...`") is not one.
_EXCEPTION = re.compile(
    r"(?<![`'\"(])\b((?:[a-z_]\w*\.)*([A-Z]\w*(?:Error|Exception)|KeyboardInterrupt))\b: "
)
_PYDANTIC_VALUE_ERROR = re.compile(r"^\s*(?:\([\w-]+ pid=\d+\)\s*)*Value error, ")
# A vLLM warning quotes an error it may lead to ("... fd limit errors like `OSError: [Errno 24]
# Too many open files`" when the container's nofile limit cannot be raised); it reports none.
_WARNING = re.compile(r"^\s*(?:\([\w-]+ pid=\d+\)\s*)?WARNING \d\d-\d\d ")
_FRAME = re.compile(r'(?P<path>[^"\s]*\.py)", line \d+, in (?P<function>[\w<>]+)')


def diagnose(
    log: str | Iterable[str],
    *,
    exit_code: int | None = None,
    oom_killed: bool | None = None,
    memory_limited: bool = False,
) -> list[Finding]:
    """Findings for a log (and the container's exit), most likely root cause first. With
    ``memory_limited`` (the container had a memory limit) and Docker's ``OOMKilled`` the limit is
    the cause, whatever the log says the dying engine did next. ``oom_killed`` is Docker's flag
    from ``docker inspect``, None when unknown (a log from elsewhere): exit code 137 without the
    flag was a kill from outside, and with it unknown is still read as host out-of-memory."""
    lines = log.splitlines() if isinstance(log, str) else [line.rstrip("\n") for line in log]
    found: dict[str, tuple[Rank, Finding]] = {}
    first_exception: tuple[int, str] | None = None  # not matched by any rule
    frames: list[str] = []  # "path function" of the traceback being read, outermost first
    for number, line in enumerate(lines, start=1):
        exception = _exception_type(line)
        rule = _match(line, exception, frames)
        if rule is not None and rule.code not in found:
            found[rule.code] = (rule.rank, _finding(rule, number, line))
        if (
            first_exception is None
            and rule is None
            and exception is not None
            and not (_WARNING.search(line))
        ):
            first_exception = (number, line.strip()[:MAX_LINE])
        if (where := _FRAME.search(line)) is not None:
            frames.append(f"{where['path']} {where['function']}")
        elif exception is not None or "Traceback (most recent call last)" in line:
            frames = []
    _blame_neighbours(found, lines)
    for code in [c for _, f in found.values() for c in RULES_BY_CODE[f.code].supersedes]:
        found.pop(code, None)
    findings = [f for _, f in sorted(found.values(), key=lambda i: (i[0], i[1].line_number))]
    roots = [finding for finding in findings if RULES_BY_CODE[finding.code].rank == Rank.ROOT]
    if oom_killed and memory_limited:
        return [CONTAINER_OOM, *(f for f in findings if f.code != CONTAINER_OOM.code)]
    killed = exit_code == 137 or oom_killed
    if killed and not roots and first_exception is None:
        return [KILLED_FROM_OUTSIDE if oom_killed is False else HOST_OOM, *findings]
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


def _finding(rule: Rule, number: int, line: str) -> Finding:
    return Finding(rule.code, rule.title, rule.remedy, number, line.strip()[:MAX_LINE])


def _exception_type(line: str) -> str | None:
    """The short type name of the exception a traceback's last line reports, if it is one."""
    if _PYDANTIC_VALUE_ERROR.search(line):
        return "ValueError"  # pydantic's rendering of a ValueError raised in a validator
    match = _EXCEPTION.search(line)
    return match.group(2) if match else None


def _match(line: str, exception: str | None, frames: list[str]) -> Rule | None:
    text = line.strip()
    for rule in RULES:
        if any(pattern.search(text) for pattern in rule.patterns):
            return rule
        raised = rule.raised if exception is not None else ()
        if any(_raised_by(signature, exception or "", frames) for signature in raised):
            return rule
    return None


def _raised_by(raised: Raised, exception: str, frames: list[str]) -> bool:
    """The exception is one of ``raised.types`` and a frame of its traceback matches: the
    raising frame, or the library call it happened in (a JSON error inside tokenizer loading)."""
    if exception not in raised.types:
        return False
    return any(raised.frame.search(frame) for frame in frames) or raised.frame.pattern == ""


# --- memory accounting ------------------------------------------------------------------------

_GIB = {"bytes": 1 / 2**30, "kib": 1 / 2**20, "mib": 1 / 2**10, "gib": 1.0}
_SIZE = r"([\d.]+) (bytes|KiB|MiB|GiB)"
_TOTAL = re.compile(rf"total capac\w* of {_SIZE} of which {_SIZE} is free", re.IGNORECASE)
_THIS = re.compile(rf"this process has {_SIZE} memory in use", re.IGNORECASE)
_PROCESS = re.compile(rf"Process \d+ has {_SIZE} memory in use", re.IGNORECASE)
_ALLOCATED = re.compile(rf"{_SIZE} is allocated by PyTorch", re.IGNORECASE)
_RESERVED = re.compile(rf"{_SIZE} is reserved by PyTorch", re.IGNORECASE)
# torch < 2.0: "(GPU 0; 44.56 GiB total capacity; 27.91 GiB already allocated; 565.31 MiB free;
# 27.93 GiB reserved in total by PyTorch)"
_OLD = re.compile(
    rf"{_SIZE} total capacity; {_SIZE} already allocated; {_SIZE} free; {_SIZE} reserved",
    re.IGNORECASE,
)
# vLLM 0.6 profiling: "total_gpu_memory=79.15GiB initial_memory_usage=68.01GiB"
_PROFILE = re.compile(r"total_gpu_memory=([\d.]+)GiB initial_memory_usage=([\d.]+)GiB")
_WEIGHTS = re.compile(r"(?:Loading model weights took|model weights take) ([\d.]+) ?Gi?B")


def _gib(number: str, unit: str) -> float:
    return float(number) * _GIB[unit.lower()]


def _blame_neighbours(found: dict[str, tuple[Rank, Finding]], lines: list[str]) -> None:
    """Turn a memory failure into ``gpu-memory-in-use`` when the numbers in the log show that
    other processes hold a large share of the GPU."""
    for code in ("cuda-oom", "kv-cache-no-memory"):
        if code not in found or "gpu-memory-in-use" in found:
            continue
        rank, finding = found[code]
        start = (finding.line_number or 1) - 1
        text = " ".join(lines[start : start + OOM_MESSAGE_LINES])
        total_foreign = _foreign_from_oom(text) if code == "cuda-oom" else _foreign_profile(lines)
        if total_foreign is not None and _is_large(*total_foreign):
            in_use = RULES_BY_CODE["gpu-memory-in-use"]
            found["gpu-memory-in-use"] = (rank, _finding(in_use, start + 1, finding.line))
            del found[code]


def _is_large(total: float, foreign: float, *, share: float = FOREIGN_MIN_SHARE) -> bool:
    return foreign > max(FOREIGN_MIN_GIB, share * total)


def _foreign_from_oom(text: str) -> tuple[float, float] | None:
    """(total, GiB held by others) from torch's out-of-memory message, when it carries numbers."""
    if (old := _OLD.search(text)) is not None:
        total, _, free, reserved = (_gib(*old.groups()[i : i + 2]) for i in range(0, 8, 2))
        return total, total - free - reserved
    if (capacity := _TOTAL.search(text)) is None:
        return None
    total, free = _gib(*capacity.groups()[:2]), _gib(*capacity.groups()[2:])
    torch_held = sum(_gib(*m.groups()) for p in (_ALLOCATED, _RESERVED) for m in p.finditer(text))
    entries = [_gib(*m.groups()) for m in _PROCESS.finditer(text)]
    if (this := _THIS.search(text)) is not None:
        own = _gib(*this.groups())
    elif entries:
        # In a container torch cannot tell its own PID: its entry is the one that holds at least
        # what PyTorch allocated; the others belong to other processes.
        own = min((e for e in entries if e >= torch_held), default=max(entries))
    else:
        return None
    return total, total - free - max(own, torch_held)


def _foreign_profile(lines: list[str]) -> tuple[float, float] | None:
    """(total, GiB held before this engine loaded) from vLLM 0.6's memory profiling line."""
    text = "\n".join(lines)
    if (profile := _PROFILE.search(text)) is None:
        return None
    total, initial = float(profile[1]), float(profile[2])
    if (weights := _WEIGHTS.search(text)) is not None:
        return total, initial - float(weights[1])
    # Without the weights' size only a card mostly full before profiling is clearly shared.
    return (total, initial) if initial > 0.5 * total else None
