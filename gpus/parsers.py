"""Parsers for what NVIDIA's tools print: pure functions from text to :mod:`gpus.readings`.

Three formats, each taken from real captures (``tests/fixtures/gpu/``)::

    parse_smi_xml(text)              # nvidia-smi -q -x
    parse_query_csv(text, apps=...)  # nvidia-smi --query-gpu=... --format=csv (header required)
    parse_nvml_json(text)            # the NVML dump written by gpus.collectors.nvml_dump
    parse_any(text)                  # the above, detected from the text

The rules every parser keeps: ``[N/A]``, ``[Not Supported]`` and other bracketed or textual
placeholders become ``None``; a missing field is ``None``; nothing is ever filled in from a
count or a position that the source did not state. A headerless CSV is refused, because its
columns cannot be known from the text.
"""

from __future__ import annotations

import ast
import csv
import io
import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from typing import Any

from gpus.readings import GpuReading, Inventory, ProcessReading, Source, bytes_to_mib


class ParseError(ValueError):
    """The text is not something Berth can read GPUs from; the message says what it is."""


# Placeholders nvidia-smi prints instead of a value.
_PLACEHOLDERS = frozenset(
    {"", "n/a", "not supported", "unknown error", "none", "not available", "unknown", "-"}
)
_NUMBER = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(?:[A-Za-z%]+)?\s*$")


def clean_text(value: str | None) -> str | None:
    """The text, or None for a placeholder (``[N/A]``, ``N/A``, ``[Not Supported]``...)."""
    if value is None:
        return None
    text = value.strip()
    if text.startswith("[") and text.endswith("]"):
        return None
    if text.lower() in _PLACEHOLDERS:
        return None
    return text


def parse_number(value: str | None) -> float | None:
    """``"687.73 W"``, ``"100 %"``, ``"81559 MiB"``, ``"70"`` -> the number; placeholders ->
    None."""
    text = clean_text(value)
    if text is None:
        return None
    match = _NUMBER.match(text)
    return float(match.group(1)) if match else None


def parse_int(value: str | None) -> int | None:
    number = parse_number(value)
    return None if number is None else round(number)


def parse_mig(value: str | None) -> bool | None:
    """``Enabled``/``Disabled`` -> True/False; ``N/A`` (a GPU without MIG) -> False only when the
    source says so explicitly, otherwise None."""
    text = clean_text(value)
    if text is None:
        return False if value is not None and value.strip().upper() == "N/A" else None
    lowered = text.lower()
    if lowered == "enabled":
        return True
    if lowered == "disabled":
        return False
    return None


# --- nvidia-smi -q -x ------------------------------------------------------------------------


def parse_smi_xml(text: str) -> Inventory:
    """Read ``nvidia-smi -q -x``.

    The XML has no GPU index. nvidia-smi lists devices in NVML index order, so the position
    *is* the index, but only when the document lists every attached GPU (``attached_gpus``
    equals the number of ``<gpu>`` elements; ``nvidia-smi -q -i 2`` lists one of eight). When
    it does not, indices are left unknown rather than guessed. ``minor_number`` (the
    ``/dev/nvidiaN`` node) is not the index and is never used as one.
    """
    try:
        root = ET.fromstring(text)  # noqa: S314 - trusted tool output, no entity expansion in stdlib
    except ET.ParseError as exc:
        raise ParseError(f"not valid nvidia-smi XML: {exc}") from None
    if root.tag != "nvidia_smi_log":
        raise ParseError(f"XML root is <{root.tag}>, not <nvidia_smi_log> (nvidia-smi -q -x)")
    elements = root.findall("gpu")
    attached = parse_int(root.findtext("attached_gpus"))
    complete = attached is not None and attached == len(elements)
    notes = () if complete else ("the XML does not list every attached GPU: indices unknown",)
    gpus = tuple(
        _xml_gpu(element, position if complete else None)
        for position, element in enumerate(elements)
    )
    return Inventory(
        source=Source.SMI_XML,
        gpus=gpus,
        driver_version=clean_text(root.findtext("driver_version")),
        notes=notes,
    )


def _xml_gpu(gpu: ET.Element, position: int | None) -> GpuReading:
    explicit_index = parse_int(gpu.findtext("index"))
    power = _first_number(
        gpu,
        "gpu_power_readings/power_draw",
        "gpu_power_readings/instant_power_draw",
        "gpu_power_readings/average_power_draw",
        "power_readings/power_draw",
        "power_readings/instant_power_draw",
        "power_readings/average_power_draw",
    )
    limit = _first_number(
        gpu,
        "gpu_power_readings/current_power_limit",
        "gpu_power_readings/power_limit",
        "power_readings/current_power_limit",
        "power_readings/power_limit",
        "power_readings/enforced_power_limit",
    )
    # Direct children only: <mig_devices> nests its own <fb_memory_usage> per MIG slice.
    return GpuReading(
        index=explicit_index if explicit_index is not None else position,
        uuid=clean_text(gpu.findtext("uuid")),
        name=clean_text(gpu.findtext("product_name")),
        memory_total_mib=parse_int(gpu.findtext("fb_memory_usage/total")),
        memory_used_mib=parse_int(gpu.findtext("fb_memory_usage/used")),
        memory_reserved_mib=parse_int(gpu.findtext("fb_memory_usage/reserved")),
        memory_free_mib=parse_int(gpu.findtext("fb_memory_usage/free")),
        utilization_gpu_pct=parse_int(gpu.findtext("utilization/gpu_util")),
        temperature_c=parse_int(gpu.findtext("temperature/gpu_temp")),
        power_w=None if power is None else round(power, 2),
        power_limit_w=limit,
        compute_capability=None,
        mig_enabled=parse_mig(gpu.findtext("mig_mode/current_mig")),
        pci_bus_id=clean_text(gpu.get("id")) or clean_text(gpu.findtext("pci/pci_bus_id")),
        processes=_xml_processes(gpu.find("processes")),
    )


def _first_number(element: ET.Element, *paths: str) -> float | None:
    for path in paths:
        number = parse_number(element.findtext(path))
        if number is not None:
            return number
    return None


def _xml_processes(processes: ET.Element | None) -> tuple[ProcessReading, ...] | None:
    if processes is None:
        return None
    found = []
    for info in processes.findall("process_info"):
        pid = parse_int(info.findtext("pid"))
        if pid is None:
            continue
        found.append(
            ProcessReading(
                pid=pid,
                used_memory_mib=parse_int(info.findtext("used_memory")),
                name=clean_text(info.findtext("process_name")) or "",
            )
        )
    return tuple(found)


# --- nvidia-smi --query-gpu / --query-compute-apps --------------------------------------------

# The query Berth's own collector runs (``--format=csv``, header and units included).
QUERY_GPU_FIELDS = (
    "index",
    "uuid",
    "name",
    "pci.bus_id",
    "memory.total",
    "memory.reserved",
    "memory.used",
    "memory.free",
    "utilization.gpu",
    "temperature.gpu",
    "power.draw",
    "power.limit",
    "compute_cap",
    "mig.mode.current",
)
QUERY_APPS_FIELDS = ("gpu_uuid", "gpu_bus_id", "pid", "process_name", "used_memory")
_KNOWN_GPU_COLUMNS = frozenset(QUERY_GPU_FIELDS) | {
    "power.draw.instant",
    "power.draw.average",
    "enforced.power.limit",
    "timestamp",
}


def _csv_rows(text: str) -> tuple[list[str], list[dict[str, str]]]:
    rows = [row for row in csv.reader(io.StringIO(text.strip()), skipinitialspace=True) if row]
    if not rows:
        raise ParseError("the CSV is empty")
    # "memory.used [MiB]" -> "memory.used": units are stripped from values anyway.
    header = [re.sub(r"\s*\[[^\]]*\]$", "", cell.strip()) for cell in rows[0]]
    return header, [dict(zip(header, row, strict=False)) for row in rows[1:]]


def _require_header(header: list[str], known: Iterable[str], what: str) -> None:
    if not set(header) & set(known):
        raise ParseError(
            f"the CSV has no header naming {what} fields (first row: {', '.join(header)[:120]}); "
            "run nvidia-smi with --format=csv (not noheader) so the columns are known"
        )


def parse_query_csv(text: str, apps: str | None = None) -> Inventory:
    """Read ``nvidia-smi --query-gpu=... --format=csv[,nounits]`` (header required), and the
    processes from ``--query-compute-apps`` when ``apps`` is given (otherwise processes are
    unknown: the GPU query does not list them)."""
    header, rows = _csv_rows(text)
    if "pid" in header:
        raise ParseError(
            "this is a --query-compute-apps CSV (processes); pass the --query-gpu CSV and give "
            "this one as the processes"
        )
    _require_header(header, _KNOWN_GPU_COLUMNS, "GPU")
    gpus = [_csv_gpu(row) for row in rows]
    if apps is not None:
        gpus = attach_processes(gpus, parse_compute_apps_csv(apps))
    return Inventory(source=Source.SMI_CSV, gpus=tuple(gpus))


def _csv_gpu(row: dict[str, str]) -> GpuReading:
    power = _first_value(row, "power.draw", "power.draw.instant", "power.draw.average")
    return GpuReading(
        index=parse_int(row.get("index")),
        uuid=clean_text(row.get("uuid")),
        name=clean_text(row.get("name")),
        memory_total_mib=parse_int(row.get("memory.total")),
        memory_used_mib=parse_int(row.get("memory.used")),
        memory_reserved_mib=parse_int(row.get("memory.reserved")),
        memory_free_mib=parse_int(row.get("memory.free")),
        utilization_gpu_pct=parse_int(row.get("utilization.gpu")),
        temperature_c=parse_int(row.get("temperature.gpu")),
        power_w=power,
        power_limit_w=_first_value(row, "power.limit", "enforced.power.limit"),
        compute_capability=clean_text(row.get("compute_cap")),
        mig_enabled=parse_mig(row["mig.mode.current"]) if "mig.mode.current" in row else None,
        pci_bus_id=clean_text(row.get("pci.bus_id")),
        processes=None,
    )


def _first_value(row: dict[str, str], *keys: str) -> float | None:
    for key in keys:
        number = parse_number(row.get(key))
        if number is not None:
            return number
    return None


def parse_compute_apps_csv(text: str) -> list[tuple[str | None, str | None, ProcessReading]]:
    """Read ``nvidia-smi --query-compute-apps=gpu_uuid,gpu_bus_id,pid,process_name,used_memory
    --format=csv``: ``(gpu_uuid, gpu_bus_id, process)`` per row."""
    header, rows = _csv_rows(text)
    _require_header(header, {"pid"}, "process")
    found = []
    for row in rows:
        pid = parse_int(row.get("pid"))
        if pid is None:
            continue
        memory = row.get("used_memory", row.get("used_gpu_memory"))
        process = ProcessReading(
            pid=pid,
            used_memory_mib=parse_int(memory),
            name=clean_text(row.get("process_name", row.get("name"))) or "",
        )
        found.append((clean_text(row.get("gpu_uuid")), clean_text(row.get("gpu_bus_id")), process))
    return found


def attach_processes(
    gpus: list[GpuReading], apps: list[tuple[str | None, str | None, ProcessReading]]
) -> list[GpuReading]:
    """Give each GPU the processes whose GPU UUID (else PCI bus id) matches it; every GPU then
    has a known process list (empty when none matched). A process matching no GPU is dropped
    rather than pinned on a guessed one."""
    found: list[list[ProcessReading]] = [[] for _gpu in gpus]
    for uuid, bus_id, process in apps:
        for position, gpu in enumerate(gpus):
            if (uuid and gpu.uuid == uuid) or (bus_id and _same_bus(gpu.pci_bus_id, bus_id)):
                found[position].append(process)
                break
    return [gpu.with_processes(tuple(procs)) for gpu, procs in zip(gpus, found, strict=True)]


def _same_bus(left: str | None, right: str) -> bool:
    # 00000000:00:06.0 and 0000:00:06.0 name the same device.
    return left is not None and left.lower().split(":", 1)[-1] == right.lower().split(":", 1)[-1]


# --- NVML JSON dump ----------------------------------------------------------------------------


def parse_nvml_json(text: str | dict[str, Any]) -> Inventory:
    """Read the NVML dump (``tests/fixtures/gpu/h100-80gb/nvml-busy.json`` is one).

    Memory comes from ``memory_info_v2`` when present: the v1 call counts the driver's reserve
    as used (the H100 capture: v1 says 21,933 MiB used, v2 and nvidia-smi say 21,453).
    """
    data = json.loads(text) if isinstance(text, str) else text
    devices = data.get("devices") if isinstance(data, dict) else None
    if not isinstance(devices, list):
        raise ParseError("JSON without a 'devices' list is not an NVML dump")
    return Inventory(
        source=Source.NVML,
        gpus=tuple(_nvml_gpu(device) for device in devices),
        driver_version=data.get("driver_version"),
    )


def _nvml_gpu(device: dict[str, Any]) -> GpuReading:
    memory = device.get("memory_info_v2") or device.get("memory_info") or {}
    utilization = device.get("utilization") or {}
    capability = device.get("cuda_compute_capability")
    mig = device.get("mig_mode")
    power_mw = device.get("power_usage_mw")
    limit_mw = device.get("power_limit_mw")
    bus = device.get("pci_bus_id")
    processes = device.get("compute_processes")
    return GpuReading(
        index=device.get("index"),
        uuid=device.get("uuid"),
        name=device.get("name"),
        memory_total_mib=bytes_to_mib(memory.get("total")),
        memory_used_mib=bytes_to_mib(memory.get("used")),
        memory_reserved_mib=bytes_to_mib(memory.get("reserved")),
        memory_free_mib=bytes_to_mib(memory.get("free")),
        utilization_gpu_pct=utilization.get("gpu"),
        temperature_c=device.get("temperature_c"),
        power_w=None if power_mw is None else round(power_mw / 1000, 2),
        power_limit_w=None if limit_mw is None else round(limit_mw / 1000, 2),
        compute_capability=f"{capability[0]}.{capability[1]}" if capability else None,
        mig_enabled=None if not mig else bool(mig[0]),
        pci_bus_id=bus.get("busId") if isinstance(bus, dict) else bus,
        processes=None if processes is None else tuple(_nvml_process(p) for p in processes),
    )


def _nvml_process(raw: str | dict[str, Any]) -> ProcessReading:
    # The dump keeps pynvml's process structs as their repr: a Python dict literal.
    info = ast.literal_eval(raw) if isinstance(raw, str) else raw
    used = info.get("usedGpuMemory")
    return ProcessReading(
        pid=int(info["pid"]),
        used_memory_mib=bytes_to_mib(used),
        name=info.get("name", ""),
    )


# --- detection -----------------------------------------------------------------------------------


def parse_any(text: str, apps: str | None = None) -> Inventory:
    """Detect the format and parse it; ParseError says what the text is when it cannot."""
    stripped = text.lstrip("\ufeff \t\r\n")
    if not stripped:
        raise ParseError("the input is empty")
    if stripped.startswith("<"):
        return parse_smi_xml(stripped)
    if stripped.startswith("{"):
        try:
            return parse_nvml_json(stripped)
        except json.JSONDecodeError as exc:
            raise ParseError(f"not valid JSON: {exc}") from None
    if "NVIDIA-SMI" in stripped[:2000] and "+--" in stripped[:2000]:
        raise ParseError(
            "this is nvidia-smi's human table; give nvidia-smi -q -x or "
            "--query-gpu=... --format=csv output instead"
        )
    return parse_query_csv(stripped, apps=apps)
