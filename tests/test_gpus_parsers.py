"""Parsers on real captures: the H100 idle/busy set taken for Berth, and public nvidia-smi outputs
(``tests/fixtures/gpu/public/SOURCES.md`` says where each comes from)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from gpus.parsers import (
    ParseError,
    clean_text,
    parse_any,
    parse_number,
    parse_nvml_json,
    parse_query_csv,
    parse_smi_xml,
)
from gpus.readings import Source
from tests.conftest import clean_environ, run_manage

FIXTURES = Path(__file__).parent / "fixtures" / "gpu"
H100 = FIXTURES / "h100-80gb"
PUBLIC = FIXTURES / "public"
H100_UUID = "GPU-c52ba79b-f39d-a388-315d-65a6606606ea"
REPORT_KEYS = {
    "index",
    "uuid",
    "name",
    "memory_total_mib",
    "memory_used_mib",
    "utilization_gpu_pct",
    "temperature_c",
    "power_w",
    "processes",
}


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def test_h100_busy_csv_shows_the_foreign_python_process_load() -> None:
    inventory = parse_query_csv(
        read(H100 / "nvidia-smi-query-busy.csv"),
        apps=read(H100 / "nvidia-smi-compute-apps-busy.csv"),
    )
    (gpu,) = inventory.gpus
    assert (gpu.index, gpu.uuid, gpu.name) == (0, H100_UUID, "NVIDIA H100 80GB HBM3")
    assert (gpu.memory_used_mib, gpu.memory_total_mib, gpu.free_mib) == (21453, 81559, 59627)
    assert (gpu.utilization_gpu_pct, gpu.temperature_c, gpu.power_w) == (100, 70, 687.73)
    assert gpu.mig_enabled is False
    (process,) = gpu.processes
    assert (process.pid, process.name, process.used_memory_mib) == (435, "python3", 21444)


def test_h100_idle_csv_and_xml_agree() -> None:
    (csv_gpu,) = parse_any(read(H100 / "nvidia-smi-query-idle.csv")).gpus
    (xml_gpu,) = parse_any(read(H100 / "nvidia-smi-q-idle.xml")).gpus
    for gpu in (csv_gpu, xml_gpu):
        assert (gpu.index, gpu.uuid) == (0, H100_UUID)
        assert (gpu.memory_used_mib, gpu.memory_total_mib, gpu.free_mib) == (0, 81559, 81079)
        assert (gpu.utilization_gpu_pct, gpu.temperature_c) == (0, 47)
    assert xml_gpu.memory_reserved_mib == 480
    assert xml_gpu.processes == ()  # the XML says: none running
    assert csv_gpu.processes is None  # the GPU query does not list processes: unknown


def test_nvml_dump_uses_the_v2_memory_call_not_v1() -> None:
    data = json.loads(read(H100 / "nvml-busy.json"))
    (gpu,) = parse_nvml_json(data).gpus
    # v2 matches nvidia-smi (21453 MiB); v1 counts the 480 MiB reserve as used (21933 MiB).
    assert gpu.memory_used_mib == 21453
    assert round(data["devices"][0]["memory_info"]["used"] / 2**20) == 21933
    assert gpu.memory_reserved_mib == 480
    assert (gpu.compute_capability, gpu.power_w, gpu.utilization_gpu_pct) == ("9.0", 688.73, 100)
    assert [(p.pid, p.used_memory_mib) for p in gpu.processes] == [(435, 21444)]
    del data["devices"][0]["memory_info_v2"]
    (v1_only,) = parse_nvml_json(data).gpus
    assert v1_only.memory_used_mib == 21933  # older drivers: overstated, never understated


def test_headerless_seed_csv_is_refused_not_guessed() -> None:
    for name in ("nvidia-smi-seed-query-busy.csv", "nvidia-smi-seed-query-idle.csv"):
        with pytest.raises(ParseError, match="no header"):
            parse_any(read(H100 / name))


@pytest.mark.parametrize(
    "value",
    ["[N/A]", "N/A", "[Not Supported]", "[Requested functionality has been deprecated]", "", None],
)
def test_placeholders_are_unknown(value: str | None) -> None:
    assert clean_text(value) is None
    assert parse_number(value) is None


def test_units_are_stripped() -> None:
    assert [parse_number(v) for v in ("687.73 W", "100 %", "81559 MiB", "70", "47 C")] == [
        687.73,
        100,
        81559,
        70,
        47,
    ]


def test_mig_h100_csv_has_unknown_utilization_and_mig_on() -> None:
    (gpu,) = parse_any(read(PUBLIC / "query-gpu-1x-h100-mig-full-na.csv")).gpus
    assert gpu.mig_enabled is True
    assert gpu.utilization_gpu_pct is None  # [N/A] under MIG
    assert (gpu.memory_used_mib, gpu.memory_reserved_mib, gpu.compute_capability) == (
        11125,
        479,
        "9.0",
    )


def test_mig_xml_reads_the_whole_gpu_not_its_slices() -> None:
    (gpu,) = parse_smi_xml(read(PUBLIC / "mig-a100-sxm4-q.xml")).gpus
    assert gpu.mig_enabled is True
    assert gpu.memory_total_mib == 40960  # not the 19968 MiB of a nested MIG slice
    assert gpu.utilization_gpu_pct is None


def test_xml_listing_only_some_gpus_leaves_indices_unknown() -> None:
    for name in ("gtx-1070-2-of-6-attached-q.xml", "mig-a100-sxm4-1-of-4-attached-q.xml"):
        inventory = parse_smi_xml(read(PUBLIC / name))
        assert [gpu.index for gpu in inventory.gpus] == [None] * len(inventory.gpus)
        assert inventory.notes


def test_xml_index_is_enumeration_order_not_minor_number() -> None:
    inventory = parse_smi_xml(read(PUBLIC / "k80-x4-out-of-order-q.xml"))
    # minor numbers are 1, 2, 3, 0 in this capture; NVML indices follow the listing (PCI order).
    assert [gpu.index for gpu in inventory.gpus] == [0, 1, 2, 3]
    assert [gpu.pci_bus_id for gpu in inventory.gpus] == sorted(
        g.pci_bus_id for g in inventory.gpus
    )


def test_p100_csv_without_index_or_total_reports_them_unknown() -> None:
    (gpu,) = parse_any(read(PUBLIC / "query-gpu-1x-p100-nounits-na.csv")).gpus
    assert gpu.index is None
    assert gpu.memory_total_mib is None
    assert gpu.free_mib == 16280


def test_compute_apps_with_na_memory_are_kept_with_unknown_memory() -> None:
    gpus = parse_query_csv(
        "index, uuid, name\n"
        "0, GPU-00000000-0000-0000-0000-000000000000, NVIDIA GeForce RTX 2080 SUPER",
        apps=read(PUBLIC / "query-compute-apps-rtx2080super-win-na.csv"),
    ).gpus
    assert gpus[0].processes
    assert {p.used_memory_mib for p in gpus[0].processes} == {None}


@pytest.mark.parametrize(
    "name",
    sorted(
        p.name for p in PUBLIC.iterdir() if p.suffix in {".xml", ".csv"} and "apps" not in p.name
    ),
)
def test_every_public_capture_parses_with_sane_values(name: str) -> None:
    inventory = parse_any(read(PUBLIC / name))
    assert inventory.gpus
    for gpu in inventory.gpus:
        assert gpu.name
        if gpu.memory_total_mib is not None and gpu.memory_used_mib is not None:
            assert 0 <= gpu.memory_used_mib <= gpu.memory_total_mib
        if gpu.utilization_gpu_pct is not None:
            assert 0 <= gpu.utilization_gpu_pct <= 100
        assert set(gpu.report()) == REPORT_KEYS


def test_human_table_is_refused_with_what_to_run_instead() -> None:
    with pytest.raises(ParseError, match="human table"):
        parse_any(read(PUBLIC / "h100-sxm-x8-table.txt"))


def test_sources_are_named() -> None:
    assert parse_any(read(H100 / "nvml-busy.json")).source == Source.NVML
    assert parse_any(read(H100 / "nvidia-smi-q-idle.xml")).source == Source.SMI_XML
    assert parse_any(read(H100 / "nvidia-smi-query-idle.csv")).source == Source.SMI_CSV


# --- manage.py gpu_report -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "used", "processes"),
    [
        ("nvml-busy.json", 21453, [{"pid": 435, "used_memory_mib": 21444}]),
        ("nvidia-smi-query-busy.csv", 21453, None),
        ("nvidia-smi-q-idle.xml", 0, []),
    ],
)
def test_gpu_report_json_shape(name: str, used: int, processes: list | None, capsys) -> None:
    call_command("gpu_report", str(H100 / name), "--json")
    report = json.loads(capsys.readouterr().out)
    (gpu,) = report["gpus"]
    assert set(gpu) == REPORT_KEYS
    assert (gpu["index"], gpu["uuid"], gpu["memory_used_mib"]) == (0, H100_UUID, used)
    assert gpu["processes"] == processes


def test_gpu_report_joins_compute_apps(capsys) -> None:
    call_command(
        "gpu_report",
        str(H100 / "nvidia-smi-query-busy.csv"),
        "--apps",
        str(H100 / "nvidia-smi-compute-apps-busy.csv"),
        "--json",
    )
    (gpu,) = json.loads(capsys.readouterr().out)["gpus"]
    assert gpu["processes"] == [{"pid": 435, "used_memory_mib": 21444}]


def test_gpu_report_refuses_what_it_cannot_read() -> None:
    with pytest.raises(CommandError, match="no header"):
        call_command("gpu_report", str(H100 / "nvidia-smi-seed-query-busy.csv"), "--json")


def test_gpu_report_as_a_separate_process_needs_no_database(tmp_path: Path) -> None:
    env = clean_environ()
    env.update(
        DATABASE_URL=f"sqlite:///{tmp_path / 'absent' / 'none.sqlite3'}",
        BERTH_VAR_DIR=str(tmp_path / "var"),
    )
    result = run_manage("gpu_report", str(PUBLIC / "v100s-pcie-32gb-x8-q.xml"), "--json", env=env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [gpu["index"] for gpu in report["gpus"]] == [0, 1, 2, 3, 4, 5, 6, 7]
    assert report["gpus"][0]["processes"] == [{"pid": 37305, "used_memory_mib": 31683}]
