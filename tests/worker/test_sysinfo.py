"""The machine's resources: RAM, CPU load, and GPUs from a fake ``nvidia-smi`` on the PATH."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import psutil
import pytest

from broker.schemas import GpuInfo
from worker.sysinfo import (
    MEMINFO,
    SystemProbe,
    cpu_load_now,
    memory_now,
    parse_meminfo,
    parse_nvidia_smi,
)

MIB = 1024 * 1024
TWO_GPUS = "NVIDIA GeForce RTX 3090, 24576, 23810\nTesla P40, 24576, 1024\n"


def install_nvidia_smi(folder: Path, body: str) -> Path:
    """A ``nvidia-smi`` shell script in ``folder``, put first on the PATH by the caller.

    Each run appends a line to ``runs`` next to it, so a test can count the runs. It answers
    only the exact query corral makes: another query prints nothing useful and fails.
    """
    script = folder / "nvidia-smi"
    script.write_text(
        "#!/bin/sh\n"
        f'echo run >> "{folder}/runs"\n'
        'if [ "$*" != "--query-gpu=name,memory.total,memory.free'
        ' --format=csv,noheader,nounits" ]; then\n'
        '  echo "unexpected arguments: $*" >&2; exit 2\n'
        "fi\n"
        f"{body}\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def runs(folder: Path) -> int:
    path = folder / "runs"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.fixture
def gpu_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    return tmp_path


def test_gpus_are_read_from_nvidia_smi_in_bytes(gpu_folder: Path) -> None:
    install_nvidia_smi(gpu_folder, f"printf '{TWO_GPUS}'")
    gpus = asyncio.run(SystemProbe().gpus())
    assert gpus == (
        GpuInfo(name="NVIDIA GeForce RTX 3090", total_bytes=24576 * MIB, free_bytes=23810 * MIB),
        GpuInfo(name="Tesla P40", total_bytes=24576 * MIB, free_bytes=1024 * MIB),
    )


def test_the_answer_is_kept_for_a_few_seconds_then_read_again(gpu_folder: Path) -> None:
    install_nvidia_smi(gpu_folder, f"printf '{TWO_GPUS}'")
    now = [100.0]
    probe = SystemProbe(gpu_ttl_s=5.0, clock=lambda: now[0])

    async def beats() -> None:
        await probe.gpus()
        now[0] += 2.0  # the next heartbeat
        await probe.gpus()
        now[0] += 3.0  # five seconds after the first read
        await probe.gpus()

    asyncio.run(beats())
    assert runs(gpu_folder) == 2


def test_a_failing_nvidia_smi_means_no_gpus(gpu_folder: Path) -> None:
    install_nvidia_smi(
        gpu_folder,
        "echo 'NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver.'"
        "\nexit 9",
    )
    assert asyncio.run(SystemProbe().gpus()) == ()
    assert runs(gpu_folder) == 1


def test_a_hung_nvidia_smi_is_killed_after_the_timeout(gpu_folder: Path) -> None:
    install_nvidia_smi(gpu_folder, f"exec sleep 31.7\nprintf '{TWO_GPUS}'")

    async def probe_once() -> tuple[tuple[GpuInfo, ...], float]:
        loop = asyncio.get_running_loop()
        started = loop.time()
        gpus = await SystemProbe(timeout_s=0.3).gpus()
        return gpus, loop.time() - started

    gpus, took = asyncio.run(probe_once())
    assert gpus == ()
    assert took < 5
    sleepers = [
        p
        for p in psutil.process_iter(["cmdline"])
        if (p.info["cmdline"] or [])[:2] == ["sleep", "31.7"]
    ]
    assert sleepers == []


def test_without_nvidia_smi_there_are_no_gpus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no nvidia-smi anywhere
    snapshot = asyncio.run(SystemProbe().snapshot())
    assert snapshot.gpus == ()
    assert snapshot.memory.total_bytes > 0


def test_the_event_loop_keeps_running_while_nvidia_smi_works(gpu_folder: Path) -> None:
    install_nvidia_smi(gpu_folder, f"sleep 0.3\nprintf '{TWO_GPUS}'")

    async def ticks_during_probe() -> int:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.create_task(tick())
        await SystemProbe().gpus()
        ticker.cancel()
        return ticks

    assert asyncio.run(ticks_during_probe()) > 10


def test_lines_that_do_not_read_as_gpus_are_left_out() -> None:
    output = "Quadro, Special Edition, 8192, 8000\nGRID K1, [N/A], [N/A]\n\ngarbage\n"
    assert parse_nvidia_smi(output) == (
        GpuInfo(name="Quadro, Special Edition", total_bytes=8192 * MIB, free_bytes=8000 * MIB),
    )


def test_memory_and_cpu_load_describe_this_machine() -> None:
    memory = memory_now()
    assert 0 < memory.available_bytes <= memory.total_bytes == psutil.virtual_memory().total
    load = cpu_load_now()
    assert load is not None
    assert load == pytest.approx(os.getloadavg()[0] / (os.cpu_count() or 1), abs=0.5)


def test_memory_from_proc_meminfo_agrees_with_psutil() -> None:
    memory = parse_meminfo(Path(MEMINFO).read_text())
    reference = psutil.virtual_memory()
    assert memory.total_bytes == reference.total
    # Both read the same kernel counter a moment apart.
    assert memory.available_bytes == pytest.approx(reference.available, rel=0.05)


def test_a_kernel_without_memavailable_falls_back_to_psutil(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old_kernel = tmp_path / "meminfo"
    old_kernel.write_text("MemTotal:        2048000 kB\nMemFree:          512000 kB\n")
    with pytest.raises(KeyError):
        parse_meminfo(old_kernel.read_text())
    monkeypatch.setattr("worker.sysinfo.MEMINFO", str(old_kernel))
    assert memory_now().total_bytes == psutil.virtual_memory().total
