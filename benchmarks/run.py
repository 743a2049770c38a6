"""Run every benchmark, keep each one's JSON line, and write ``benchmarks/results/latest.json``.

::

    .venv/bin/python benchmarks/run.py            # the full suite (under 15 min on 2 cores)
    .venv/bin/python benchmarks/run.py --quick    # smaller sizes, passed through to each script
    .venv/bin/python benchmarks/run.py --only allocation_race --only streaming
    .venv/bin/python benchmarks/run.py --markdown benchmarks/results/latest.json  # table only

Each script runs as a child process with this interpreter, in the order of ``SUITE``, with its
own time budget (killed with its children when it overruns). Its output streams to the console;
its last JSON line is kept. ``latest.json`` holds the machine (CPU, cores, RAM, OS, versions,
commit, date) and, per script, its JSON or its failure with the tail of its stderr. The run
ends with a summary of every target (from each payload's ``targets``) and exits non-zero if
any script failed or any target was missed.

PostgreSQL runs use ``$BENCH_POSTGRES_URL`` (default ``postgres://postgres@127.0.0.1:5432/
berth_bench``; a ``test_`` copy is created and dropped), Redis ``$BENCH_REDIS_URL`` (default
database 15 on the local server); see ``benchmarks/_common.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import machine_info, print_table

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "latest.json"
STDERR_TAIL_LINES = 40


@dataclass(frozen=True)
class Bench:
    """One run of one script: its arguments and how long it may take (seconds)."""

    script: str
    args: tuple[str, ...] = ()
    budget_s: int = 120

    @property
    def label(self) -> str:
        return " ".join([Path(self.script).stem, *self.args])


# Budgets are caps for a loaded 2-core machine; the whole run also stops at --total-budget
# (default 60 min: 25 of them the real engine's, 20 the scaling benchmark's): a script that
# would start without time left is recorded as skipped.
# Typical full-size times on the reference machine are in benchmarks/README.md.
SUITE = (
    Bench("planner.py", budget_s=20),
    Bench("gpu_selection.py", budget_s=75),
    Bench("allocation_race.py", ("--database", "sqlite"), budget_s=45),
    Bench("allocation_race.py", ("--database", "postgres"), budget_s=45),
    Bench("inventory_ingest.py", ("--database", "sqlite"), budget_s=90),
    Bench("inventory_ingest.py", ("--database", "postgres"), budget_s=90),
    Bench("nvml_read.py", budget_s=30),  # records nothing where NVML finds no GPU
    Bench("audit_append.py", budget_s=60),
    Bench("audit_review.py", budget_s=150),
    Bench("model_sync.py", budget_s=75),
    Bench("launch_overhead.py", budget_s=75),
    Bench("streaming.py", budget_s=120),
    Bench("pages_at_scale.py", budget_s=120),
    Bench("time_to_ready.py", budget_s=90),
    # One round here (the full two-round run is ~10 min on its own); installs LiteLLM into
    # var/bench/litellm-venv on its first run (a few minutes, once).
    Bench("gateway.py", ("--rounds", "1"), budget_s=540),
    # The real CPU vLLM: several engine starts and a 1 GiB checkpoint (skipped without its image).
    Bench("real_engine.py", budget_s=1500),
    # Scale to zero, wake, a load step and the recorded bursty trace on the real CPU vLLM.
    Bench("scaling.py", budget_s=1200),
)
TOTAL_BUDGET_S = 60 * 60
MIN_START_S = 10  # do not start a script with less time than this left
TERM_GRACE_S = 10  # SIGTERM first, so the script drops its throw-away database; then SIGKILL


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="pass --quick to every script")
    parser.add_argument(
        "--only", action="append", default=[], help="run only scripts with this stem (repeat)"
    )
    parser.add_argument("--output", type=Path, default=RESULTS, help="where to write the JSON")
    parser.add_argument(
        "--total-budget", type=int, default=TOTAL_BUDGET_S, help="seconds for the whole run"
    )
    parser.add_argument(
        "--markdown", type=Path, help="print a results file's summary as a Markdown table; no run"
    )
    return parser.parse_args()


def _pump(stream: Any, sink: Any, keep: list[str]) -> None:
    for line in iter(stream.readline, ""):
        sink.write(line)
        sink.flush()
        keep.append(line)


def run_one(bench: Bench, quick: bool, budget_s: float) -> dict[str, Any]:
    """Run one script with a deadline; its result entry for latest.json."""
    path = HERE / bench.script
    entry: dict[str, Any] = {"script": bench.script, "args": list(bench.args)}
    if not path.exists():
        return entry | {"ok": False, "seconds": 0, "error": f"{bench.script} does not exist"}
    args = list(bench.args)
    if quick and "--quick" in path.read_text():
        args.append("--quick")
    # Each script in its own session, so a script that overruns is killed with its children
    # (uvicorn, workers). Exec-style: this interpreter, a script of this folder, no shell.
    process = subprocess.Popen(
        [sys.executable, str(path), *args],
        cwd=HERE.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    out: list[str] = []
    err: list[str] = []
    pumps = [
        threading.Thread(target=_pump, args=(process.stdout, sys.stdout, out), daemon=True),
        threading.Thread(target=_pump, args=(process.stderr, sys.stderr, err), daemon=True),
    ]
    for pump in pumps:
        pump.start()
    started = time.monotonic()
    timed_out = False
    try:
        process.wait(timeout=budget_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=TERM_GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    for pump in pumps:
        pump.join(timeout=5)
    entry["seconds"] = round(time.monotonic() - started, 1)
    entry["returncode"] = process.returncode
    entry["result"] = last_json(out)
    entry["ok"] = process.returncode == 0 and entry["result"] is not None
    if not entry["ok"]:
        why = f"stopped after its {budget_s:.0f} s budget" if timed_out else "failed"
        if process.returncode == 0 and entry["result"] is None:
            why = "printed no JSON line"
        entry["error"] = why
        entry["stderr_tail"] = "".join(err[-STDERR_TAIL_LINES:])
    return entry


def last_json(lines: Iterable[str]) -> dict[str, Any] | None:
    """The last line that parses as a JSON object."""
    for line in reversed(list(lines)):
        text = line.strip()
        if text.startswith("{"):
            try:
                value = json.loads(text)
            except ValueError:
                continue
            if isinstance(value, dict):
                return value
    return None


def summary_rows(entries: list[dict[str, Any]]) -> list[tuple]:
    rows = []
    for entry in entries:
        name = " ".join([Path(entry["script"]).stem, *entry["args"]])
        result = entry.get("result") or {}
        targets = result.get("targets") or []
        seconds = f"{entry['seconds']:.0f}"
        if not entry["ok"]:
            rows.append((name, entry.get("error", "failed"), "", "FAIL", seconds))
        elif not targets:
            rows.append((name, "(no targets declared)", "", "ran", seconds))
        for check in targets if entry["ok"] else ():
            verdict = {True: "pass", False: "FAIL", None: "-"}[check.get("ok")]
            rows.append(
                (
                    f"{name}: {check['what']}",
                    check["figure"],
                    check["goal"],
                    verdict,
                    seconds,
                )
            )
    return rows


def markdown(path: Path) -> None:
    """The summary of a results file as Markdown (for benchmarks/README.md)."""
    report = json.loads(path.read_text())
    machine = report["machine"]
    print(
        f"Run of {report['started']} ({report['seconds']:.0f} s, quick={report['quick']}) at "
        f"commit {str(machine['git_commit'])[:10]}: {machine['cpu']}, {machine['cores']} cores, "
        f"{machine['ram_gib']} GiB RAM, {machine['os']}; Python {machine['python']}, Django "
        f"{machine['django']}, SQLite {machine['sqlite']}, PostgreSQL {machine['postgresql']}, "
        f"Redis {machine['redis']}, Docker {machine['docker']}.\n"
    )
    print("| benchmark: figure | value | target | result | script s |")
    print("|---|---:|---|---|---:|")
    for row in summary_rows(report["results"]):
        cells = [_markdown_cell(cell) for cell in row]
        print("| " + " | ".join(cells) + " |")


def _markdown_cell(value: Any) -> str:
    if isinstance(value, float):
        if value.is_integer():
            value = int(value)
        else:
            value = f"{value:,.3f}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        value = f"{value:,}"
    return str(value).replace("|", "\\|")


def main() -> None:
    args = parse_args()
    if args.markdown:
        markdown(args.markdown)
        return
    os.environ.pop("DATABASE_URL", None)  # each script picks its own throw-away database
    suite = [b for b in SUITE if not args.only or Path(b.script).stem in args.only]
    started_at = datetime.now(UTC)
    started = time.monotonic()
    entries = []
    for bench in suite:
        left = args.total_budget - (time.monotonic() - started)
        if left < MIN_START_S:
            skipped = {"script": bench.script, "args": list(bench.args), "seconds": 0}
            entries.append(skipped | {"ok": False, "error": "skipped: the total budget is spent"})
            continue
        budget = min(bench.budget_s, left)
        print(f"\n=== {bench.label} (budget {budget:.0f} s) ===", flush=True)
        entries.append(run_one(bench, args.quick, budget))
    report = {
        "machine": machine_info(),
        "quick": args.quick,
        "started": started_at.isoformat(timespec="seconds"),
        "seconds": round(time.monotonic() - started, 1),
        "results": entries,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2, default=str) + "\n")
    rows = summary_rows(entries)
    print(f"\n=== summary ({report['seconds']:.0f} s, written to {args.output}) ===")
    machine = report["machine"]
    print(f"{machine['cpu']}, {machine['cores']} cores, {machine['ram_gib']} GiB, {machine['os']}")
    print_table(rows, ("benchmark: figure", "value", "target", "result", "script s"))
    failed = [r for r in rows if r[3] == "FAIL"]
    if failed:
        raise SystemExit(f"{len(failed)} failed (see FAIL above)")


if __name__ == "__main__":
    main()
