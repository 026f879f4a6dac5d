"""What the node's machine has: RAM, NVIDIA GPUs and how busy its CPUs are.

RAM comes from /proc/meminfo on Linux (psutil elsewhere, imported only there: it would cost
the worker about 0.8 MB of resident memory for two numbers), the CPU load from the 1-minute
load average, the GPUs from ``nvidia-smi`` when that binary is on the PATH. ``nvidia-smi`` is a
subprocess taking tens of
milliseconds, so it runs off the event loop, with a short timeout, and its answer is kept for a
few seconds: the heartbeat asks every two. A machine without it, or whose driver does not
answer, simply has no GPUs: nothing here raises.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from broker.schemas import GpuInfo, MemoryInfo

log = logging.getLogger(__name__)

NVIDIA_SMI = "nvidia-smi"
NVIDIA_SMI_ARGS = (
    "--query-gpu=name,memory.total,memory.free",
    "--format=csv,noheader,nounits",
)
MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class SystemSnapshot:
    memory: MemoryInfo
    gpus: tuple[GpuInfo, ...]
    cpu_load: float | None


MEMINFO = "/proc/meminfo"


def memory_now() -> MemoryInfo:
    try:
        return parse_meminfo(Path(MEMINFO).read_text())
    except (OSError, KeyError, ValueError):
        # Not Linux, or a kernel without MemAvailable (before 3.14): psutil knows them all.
        import psutil  # noqa: PLC0415 - only where /proc/meminfo cannot answer

        vm = psutil.virtual_memory()
        return MemoryInfo(total_bytes=vm.total, available_bytes=vm.available)


def parse_meminfo(text: str) -> MemoryInfo:
    """Total and available RAM from /proc/meminfo ("MemAvailable:  123456 kB"), as psutil
    reads them on Linux; KeyError when a field is missing."""
    fields: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("MemTotal", "MemAvailable"):
            fields[key] = int(rest.split()[0]) * 1024
    return MemoryInfo(total_bytes=fields["MemTotal"], available_bytes=fields["MemAvailable"])


def cpu_load_now() -> float | None:
    """The 1-minute load average per core (1.0: every core busy); None where there is none."""
    try:
        one_minute = os.getloadavg()[0]
    except OSError:
        return None
    return round(one_minute / (os.cpu_count() or 1), 3)


def parse_nvidia_smi(output: str) -> tuple[GpuInfo, ...]:
    """GPUs from ``nvidia-smi --query-gpu=name,memory.total,memory.free`` in CSV without
    header or units (MiB); a line that does not read as such ("[N/A]" memory on some boards)
    is left out rather than guessed."""
    gpus = []
    for line in output.splitlines():
        # From the right: a GPU's name could contain a comma, its memory figures cannot.
        parts = line.rsplit(",", 2)
        if len(parts) != 3:
            continue
        name, total, free = (part.strip() for part in parts)
        try:
            total_mib, free_mib = int(total), int(free)
        except ValueError:
            continue
        gpus.append(GpuInfo(name=name, total_bytes=total_mib * MIB, free_bytes=free_mib * MIB))
    return tuple(gpus)


class SystemProbe:
    """Reads the machine's resources, keeping the GPU answer for ``gpu_ttl_s``.

    One probe lives as long as the worker; ``clock`` and ``binary`` are there for tests.
    """

    def __init__(
        self,
        *,
        gpu_ttl_s: float = 5.0,
        timeout_s: float = 2.0,
        binary: str = NVIDIA_SMI,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._gpu_ttl_s = gpu_ttl_s
        self._timeout_s = timeout_s
        self._binary = binary
        self._clock = clock
        self._gpus: tuple[GpuInfo, ...] = ()
        self._gpus_read_at: float | None = None

    async def snapshot(self) -> SystemSnapshot:
        return SystemSnapshot(memory=memory_now(), gpus=await self.gpus(), cpu_load=cpu_load_now())

    async def gpus(self) -> tuple[GpuInfo, ...]:
        now = self._clock()
        if self._gpus_read_at is None or now - self._gpus_read_at >= self._gpu_ttl_s:
            self._gpus = await self._query_gpus()
            self._gpus_read_at = now
        return self._gpus

    async def _query_gpus(self) -> tuple[GpuInfo, ...]:
        path = shutil.which(self._binary)
        if path is None:
            return ()
        try:
            process = await asyncio.create_subprocess_exec(
                path,
                *NVIDIA_SMI_ARGS,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
                stdin=asyncio.subprocess.DEVNULL,
            )
        except OSError as exc:
            log.warning("cannot run %s: %s", path, exc)
            return ()
        try:
            stdout, _ = await asyncio.wait_for(process.communicate(), self._timeout_s)
        except TimeoutError:
            # A hung driver must not hold the heartbeat: no GPUs this time, and no zombie.
            process.kill()
            await process.wait()
            log.warning("%s gave no answer within %.1fs", path, self._timeout_s)
            return ()
        if process.returncode != 0:
            log.debug("%s exited with status %s", path, process.returncode)
            return ()
        return parse_nvidia_smi(stdout.decode(errors="replace"))
