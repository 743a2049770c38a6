"""Capturing the real engine's own output as test fixtures (``manage.py capture_engine_fixtures``).

Each case runs the real CPU engine image (``build_engine_image vllm-cpu``) on a tiny model
written here, in a container made by Berth's own template (``launch_spec.container_kwargs``),
brings about one failure for real (a context longer than the model allows, a broken tokenizer,
a memory limit, a killed worker ...) and keeps the container's log beside the exact ``docker
run`` line and the trigger that produced it::

    captures = capture(client, image, [CASES["context-too-long"]], workdir, progress=print)

``write_fixtures`` stores them as ``<case>.log`` plus one ``captures.json`` manifest; the flag
list of ``--help=all`` is captured the same way (``capture_help``).
"""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deployments.runtime.launch_spec import LaunchSpec, container_kwargs, docker_run_line
from models_registry.tiny_model import SERVABLE_CONTEXT, write_servable_model

FIXTURES_DIR = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "engine-logs"
MODEL_TARGET = "/models/tiny"
KV_SPACE_GIB = "1"  # VLLM_CPU_KVCACHE_SPACE for the captures: small, bounded
POLL_S = 0.5
# The engine stops with SIGTERM within seconds; Docker kills it after this.
STOP_TIMEOUT_S = 20
STALL_S = 5

Prepare = Callable[[Path], None]
Action = Callable[[Any, int], str]


@dataclass(frozen=True)
class Case:
    """One real engine run: the model it gets, how it is started and what is done to it."""

    name: str
    code: str  # the diagnosis Berth should give for the log (``deployments.diagnostics``)
    trigger: str  # what brought the failure about, in words
    prepare: Prepare
    engine_args: tuple[str, ...] = ()
    environment: dict[str, str] = field(default_factory=dict)
    docker: dict[str, Any] = field(default_factory=dict)  # overrides of Berth's template
    after_ready: Action | None = None  # done once /health answers 200
    deadline_s: float = 240.0  # from start to exit (or to stopping it)
    stall_after: str = ""  # stop the engine STALL_S after this line, as Berth's stall timer does


@dataclass
class Capture:
    """A case's result: the log and how the container ended."""

    case: str
    code: str
    trigger: str
    command: str  # the docker run line of Berth's template for this container
    after_ready: str
    exit_code: int | None
    oom_killed: bool
    ready_after_s: float | None
    seconds: float
    log: str = field(repr=False, default="")

    def manifest_entry(self) -> dict[str, Any]:
        entry = asdict(self)
        entry.pop("log")
        entry["log_file"] = f"{self.case}.log"
        return entry


def servable(directory: Path) -> None:
    write_servable_model(directory)


def embedding_model(directory: Path) -> None:
    write_servable_model(directory, embedding=True)


def wrong_architecture(directory: Path) -> None:
    write_servable_model(directory)
    config = json.loads((directory / "config.json").read_text())
    config["architectures"] = ["BerthImaginaryForCausalLM"]
    (directory / "config.json").write_text(json.dumps(config))


def broken_tokenizer(directory: Path) -> None:
    """``tokenizer.json`` cut in half, as an interrupted copy leaves it."""
    write_servable_model(directory)
    raw = (directory / "tokenizer.json").read_bytes()
    (directory / "tokenizer.json").write_bytes(raw[: len(raw) // 2])


def missing_shard(directory: Path) -> None:
    """Two shards and their index, then the second shard deleted."""
    write_servable_model(directory, shards=2)
    (directory / "model-00002-of-00002.safetensors").unlink()


def chat_request(_container: Any, port: int) -> str:
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Hello!"}],
        "max_tokens": 8,
        "min_tokens": 8,
    }
    status, _ = post_json(port, "/v1/chat/completions", body, timeout=120)
    return f"POST /v1/chat/completions answered {status}"


def chat_then_stop(container: Any, port: int) -> str:
    said = chat_request(container, port)
    container.stop(timeout=STOP_TIMEOUT_S)
    return f"{said}; then docker stop"


def embed_then_stop(container: Any, port: int) -> str:
    body = {"model": "tiny", "input": ["Hello, world!", "The answer is forty-two."]}
    status, answer = post_json(port, "/v1/embeddings", body, timeout=120)
    widths = [len(item.get("embedding", [])) for item in answer.get("data", [])]
    container.stop(timeout=STOP_TIMEOUT_S)
    return f"POST /v1/embeddings answered {status} with vectors of {widths}; then docker stop"


def kill_engine_core(container: Any, port: int, signal_name: str = "SIGKILL") -> str:
    """Signal the engine's core process from inside the container, as the kernel or a crash
    would (exec runs as the container's user, which owns the process)."""
    # This script's own command line names EngineCore too: it skips itself.
    script = (
        "import os, signal\n"
        "for pid in filter(str.isdigit, os.listdir('/proc')):\n"
        "    try:\n"
        "        comm = open(f'/proc/{pid}/cmdline', 'rb').read()\n"
        "    except OSError:\n"
        "        continue\n"
        "    if b'EngineCore' in comm and int(pid) != os.getpid():\n"
        f"        print(pid, flush=True); os.kill(int(pid), signal.{signal_name})\n"
    )
    result = container.exec_run(["/opt/vllm/bin/python", "-c", script])
    pids = result.output.decode().split()
    return f"{signal_name} sent to the EngineCore process ({', '.join(pids) or 'none found'})"


def segfault_engine_core(container: Any, port: int) -> str:
    return kill_engine_core(container, port, "SIGSEGV")


CASES: dict[str, Case] = {
    case.name: case
    for case in (
        Case("healthy", "none", "a normal start, one chat completion, docker stop",
             servable, after_ready=chat_then_stop),
        # Run after "healthy" in the same capture (they share the cache volume): the engine
        # loads the compiled model it saved instead of compiling again.
        Case("healthy-warm-cache", "none",
             "the same start again with the cache volume kept, one chat completion, docker stop",
             servable, after_ready=chat_then_stop),
        Case("embedding", "none", "an embedding model (LlamaModel) with --runner pooling, as "
             "Berth launches it: start, one /v1/embeddings request, docker stop",
             embedding_model, engine_args=("--runner", "pooling"), after_ready=embed_then_stop),
        Case("context-too-long", "max-model-len-exceeds-config",
             f"--max-model-len {SERVABLE_CONTEXT * 2} for a model of {SERVABLE_CONTEXT}",
             servable, engine_args=("--max-model-len", str(SERVABLE_CONTEXT * 2))),
        Case("unsupported-architecture", "unsupported-architecture",
             "config.json names an architecture vLLM does not have", wrong_architecture),
        Case("broken-tokenizer", "tokenizer-unreadable",
             "tokenizer.json truncated to half its bytes", broken_tokenizer),
        Case("missing-shard", "weights-incomplete",
             "model.safetensors.index.json names two shards; the second is deleted",
             missing_shard),
        # vLLM 0.32 reads its cgroup's limit before it allocates the KV space, and refuses.
        Case("kv-space-over-memory-limit", "cpu-kv-space-too-large",
             "a 3 GiB container memory limit with VLLM_CPU_KVCACHE_SPACE=4 (GiB)", servable,
             environment={"VLLM_CPU_KVCACHE_SPACE": "4"}, docker={"mem_limit": "3g"}),
        # Under a limit smaller than the engine's own processes the kernel kills one of them.
        Case("memory-limit-oom-kill", "container-memory-limit",
             "a 1200 MiB container memory limit (the engine's processes need more)", servable,
             docker={"mem_limit": "1200m", "memswap_limit": "1200m"}),
        Case("worker-crash-after-ready", "engine-core-died",
             "SIGKILL to the EngineCore process once /health answered", servable,
             after_ready=kill_engine_core),
        Case("worker-signal-sigsegv", "worker-signal",
             "SIGSEGV to the EngineCore process once /health answered", servable,
             after_ready=segfault_engine_core),
        # vLLM 0.32 applies VLLM_ENGINE_READY_TIMEOUT_S only after the core's handshake (a
        # 5 s value still started in 160 s), so a start that never ends is Berth's to stop.
        Case("start-timeout", "engine-ready-timeout",
             f"no progress line for {STALL_S} s during the silent compile (a {STALL_S} s stall "
             "timer); stopped as Berth's watcher does", servable,
             stall_after="Warming up model for the compilation"),
        Case("shm-too-small", "shm-too-small", "Docker's default 64 MiB /dev/shm",
             servable, docker={"shm_size": "64m"}),
    )
}  # fmt: skip


def logs_of(container: Any) -> str:
    return container.logs(stdout=True, stderr=True).decode(errors="replace")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def post_json(port: int, path: str, body: dict, timeout: float) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        raw = response.read()
    except (OSError, http.client.HTTPException) as exc:
        return 0, {"error": str(exc)}
    finally:
        connection.close()
    try:
        return response.status, json.loads(raw)
    except ValueError:
        return response.status, {"raw": raw.decode(errors="replace")}


def health(port: int) -> int | None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", "/health")
        return connection.getresponse().status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        connection.close()


def case_kwargs(case: Case, image: str, model_dir: Path, port: int, run: str) -> dict[str, Any]:
    """Berth's container template for this case; the restart policy is off so that a failure
    is captured once, as the first start logs it."""
    environment = {"VLLM_CPU_KVCACHE_SPACE": KV_SPACE_GIB, **case.environment}
    spec = LaunchSpec(
        deployment_id=0,
        generation=int(time.time()),
        team="capture",
        image=image,
        model_host_path=str(model_dir),
        model_container_path=MODEL_TARGET,
        served_model_name="tiny",
        host_port=port,
        max_model_len=SERVABLE_CONTEXT if "--max-model-len" not in case.engine_args else None,
        engine_args=case.engine_args,
        environment=environment,
        instance=run,
    )
    kwargs = container_kwargs(spec)
    kwargs["restart_policy"] = {"Name": "no", "MaximumRetryCount": 0}
    return kwargs | case.docker


def run_case(client: Any, image: str, case: Case, workdir: Path, run: str) -> Capture:
    """Run one case to its end (exit, or stopped after its deadline) and keep its log."""
    model_dir = workdir / case.name
    shutil.rmtree(model_dir, ignore_errors=True)
    case.prepare(model_dir)
    port = free_port()
    kwargs = case_kwargs(case, image, model_dir, port, run)
    command = docker_run_line(kwargs)
    started = time.monotonic()
    container = client.containers.run(**kwargs)
    ready_after, done = None, "not ready"
    try:
        while time.monotonic() - started < case.deadline_s:
            container.reload()
            if container.status == "exited":
                break
            if case.stall_after and case.stall_after in logs_of(container):
                time.sleep(STALL_S)
                done = f"stalled {STALL_S} s after '{case.stall_after}'"
                break
            if ready_after is None and health(port) == 200:
                ready_after = round(time.monotonic() - started, 1)
                done = case.after_ready(container, port) if case.after_ready else "ready"
                if case.after_ready is None:
                    break
            time.sleep(POLL_S)
        container.reload()
        if container.status != "exited":
            container.stop(timeout=STOP_TIMEOUT_S)
            if time.monotonic() - started >= case.deadline_s:
                done += f"; stopped after {case.deadline_s:.0f} s"
            else:
                done += "; then docker stop"
        container.reload()
        state = container.attrs["State"]
        log = logs_of(container)
    finally:
        container.remove(force=True)
    return Capture(
        case=case.name, code=case.code, trigger=case.trigger, command=command,
        after_ready=done, exit_code=state.get("ExitCode"),
        oom_killed=bool(state.get("OOMKilled")), ready_after_s=ready_after,
        seconds=round(time.monotonic() - started, 1), log=log,
    )  # fmt: skip


def capture(
    client: Any,
    image: str,
    cases: list[Case],
    workdir: Path,
    progress: Callable[[str], None],
    keep: Callable[[Capture], None] = lambda result: None,
) -> list[Capture]:
    """Run ``cases`` one after another (one engine at a time) sharing one cache volume, which
    is removed at the end; ``keep`` gets each result as soon as it is there."""
    run = "berthcap" + uuid.uuid4().hex[:6]
    results = []
    try:
        for case in cases:
            progress(f"{case.name}: {case.trigger}")
            result = run_case(client, image, case, workdir, run)
            progress(
                f"{case.name}: exit {result.exit_code}, oom_killed {result.oom_killed}, "
                f"ready after {result.ready_after_s} s, {result.seconds} s in all"
            )
            results.append(result)
            keep(result)
    finally:
        for volume in client.volumes.list(filters={"name": f"{run}-cache-"}):
            volume.remove(force=True)
    return results


def capture_help(client: Any, image: str) -> str:
    """The engine's complete flag reference (``--help=all``; plain ``--help`` lists only the
    groups in current vLLM)."""
    output = client.containers.run(image, ["--help=all"], remove=True, stdout=True, stderr=False)
    return output.decode()


def write_fixtures(directory: Path, captures: list[Capture]) -> None:
    """``<case>.log`` per capture, and ``captures.json`` updated with their entries."""
    directory.mkdir(parents=True, exist_ok=True)
    manifest_path = directory / "captures.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    for result in captures:
        (directory / f"{result.case}.log").write_text(result.log)
        manifest[result.case] = result.manifest_entry()
    manifest_path.write_text(json.dumps(dict(sorted(manifest.items())), indent=1) + "\n")
    (directory / "README.md").write_text(fixtures_readme(manifest))


def fixtures_readme(manifest: dict[str, dict[str, Any]]) -> str:
    """The directory's index: each log, what brought it about, how it ended, Berth's code."""
    lines = [
        "# Real logs of vLLM 0.32 for CPUs (`docker/vllm-cpu/`)",
        "",
        "Written by `manage.py capture_engine_fixtures` (do not edit by hand): each case ran the",
        "real image in Berth's container template (`captures.json` has the exact `docker run`",
        "line), on a tiny model written by `models_registry.tiny_model`. `help-all.txt` is the",
        "engine's `--help=all`. The code is the diagnosis Berth gives",
        "(`tests/test_engine_logs.py`).",
        "",
        "| log | trigger | ended | code |",
        "|---|---|---|---|",
    ]
    for _name, entry in sorted(manifest.items()):
        ended = f"exit {entry['exit_code']}" + (", OOM-killed" if entry["oom_killed"] else "")
        if entry["ready_after_s"] is not None:
            ended += f", ready after {entry['ready_after_s']} s"
        log, code = entry["log_file"], entry["code"]
        lines.append(f"| `{log}` | {entry['trigger']} | {ended} | `{code}` |")
    return "\n".join(lines) + "\n"
