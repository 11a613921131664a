"""Will a run fit? Free memory per device and a check that turns "too big" into an error before anything is allocated.

A run that needs more RAM than the machine has is not an exception: the kernel kills the whole process (ComfyUI and
every queued prompt with it). So the pipeline estimates its peak per device first (:meth:`JodiPipeline.memory_needs`)
and :func:`check_fits` compares that with what is free. ``JODI_MEMORY_CHECK=0`` turns the check off.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Mapping, Optional

import torch

log = logging.getLogger(__name__)

__all__ = ["InsufficientMemoryError", "available_memory", "available_host_memory", "check_fits", "format_bytes"]


class InsufficientMemoryError(MemoryError):
    """A run whose estimated peak exceeds the memory free on one of its devices (raised before it starts)."""


def format_bytes(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _meminfo_available() -> Optional[int]:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _sysconf_available() -> Optional[int]:
    try:  # free pages only (the page cache does not count), so lower than MemAvailable: a safe fallback
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def _read_int(path: str) -> Optional[int]:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (no limit) and unreadable values give None


def _stat_value(path: str, key: str) -> int:
    try:
        for line in Path(path).read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _cgroup_available() -> Optional[int]:
    """Room left under a container's memory limit (cgroup v2, then v1): the kernel kills at that limit, whatever
    /proc/meminfo says about the host. Reclaimable file cache counts as free."""
    limit, used = _read_int("/sys/fs/cgroup/memory.max"), _read_int("/sys/fs/cgroup/memory.current")
    if limit is not None and used is not None:
        return limit - used + _stat_value("/sys/fs/cgroup/memory.stat", "inactive_file")
    limit = _read_int("/sys/fs/cgroup/memory/memory.limit_in_bytes")
    used = _read_int("/sys/fs/cgroup/memory/memory.usage_in_bytes")
    if limit is not None and used is not None and limit < 1 << 60:  # v1 writes a huge number for "no limit"
        return limit - used + _stat_value("/sys/fs/cgroup/memory/memory.stat", "total_inactive_file")
    return None


def available_host_memory() -> Optional[int]:
    """Bytes of RAM a new allocation can take without swapping or the OOM killer: /proc/meminfo's MemAvailable
    (else free pages from sysconf), capped by a cgroup limit; None where none of these can be read."""
    found = [v for v in (_meminfo_available() or _sysconf_available(), _cgroup_available()) if v is not None]
    return max(0, min(found)) if found else None


def available_memory(device: "str | torch.device") -> Optional[int]:
    """Free bytes on ``device``: RAM for the CPU; for CUDA the driver's free memory plus what torch's cache holds
    unused. None for devices whose free memory cannot be read (then nothing is checked)."""
    device = torch.device(device)
    if device.type == "cpu":
        return available_host_memory()
    if device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        free, _ = torch.cuda.mem_get_info(index)
        return int(free + torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index))
    return None


def check_enabled() -> bool:
    return os.environ.get("JODI_MEMORY_CHECK", "1").strip().lower() not in ("0", "false", "no", "off")


def _advice(device: torch.device) -> str:
    if device.type == "cpu":
        return ("Choose a smaller output size (the maps are made at about 1024 px and resized to it, so little is "
                "lost), fewer maps (ignore the domains you do not need) or a smaller batch")
    return ("Turn on tiled decode, or choose a smaller batch, a smaller output size or fewer maps (ignore the "
            "domains you do not need)")


def check_fits(needs: Mapping[torch.device, int], what: str,
               available: Optional[Callable[[torch.device], Optional[int]]] = None) -> None:
    """Raise :class:`InsufficientMemoryError` when a device's estimated peak in ``needs`` exceeds what
    ``available(device)`` (default :func:`available_memory`) reports free. ``what`` describes the run for the
    message (size, maps, batch)."""
    if not check_enabled():
        return
    for device, need in needs.items():
        device = torch.device(device)
        free = (available or available_memory)(device)
        if free is None or need <= free:
            continue
        kind = "RAM" if device.type == "cpu" else f"memory on {device}"
        raise InsufficientMemoryError(
            f"Not enough {kind} for this Jodi run ({what}): it needs about {format_bytes(need)} and "
            f"{format_bytes(free)} is free. {_advice(device)}. (JODI_MEMORY_CHECK=0 turns this check off.)")
