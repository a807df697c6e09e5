"""What this machine has to lend a sharded model: its memory, and its GPUs' where their tool says (issue 22).

Nodes say it in their health answer (``NodeLoad.memory``), so a leader picks
helpers by free memory and splits the model's layers in proportion to it.
RAM is ``psutil``'s (total, and available: what a new process can take without
swapping). GPU memory comes from ``nvidia-smi`` or ``rocm-smi`` where one is on
the ``PATH``: run with a deadline, its output parsed strictly, anything
unexpected read as "no GPU" rather than an error. The tools are slow (tens of
milliseconds to seconds), so ``Resources`` reads them off the event loop and
at most every ``GPU_EVERY_S``.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from typing import Annotated

import msgspec
import psutil

__all__ = ["GPU_EVERY_S", "Memory", "Resources", "parse_nvidia_smi", "parse_rocm_smi", "read_memory"]

#: How often the GPU tools are asked (RAM is read at every refresh).
GPU_EVERY_S = 30.0
_TOOL_TIMEOUT_S = 5.0
_MIB = 1 << 20
_MAX_BYTES = 1 << 50  # 1 PiB: any more is no reading
_Bytes = Annotated[int, msgspec.Meta(ge=0, le=_MAX_BYTES)]


class Memory(msgspec.Struct, frozen=True, kw_only=True):
    """Bytes: RAM and GPU memory (0 where there is no GPU), total and free now. A peer's is untrusted: the
    bounds hold when it is decoded."""

    ram_total: _Bytes = 0
    ram_free: _Bytes = 0
    vram_total: _Bytes = 0
    vram_free: _Bytes = 0

    @property
    def free(self) -> int:
        """What a model's layers can use here: the GPUs' free memory where there are GPUs, else free RAM
        (an ``rpc-server`` built for the CPU, as ours, holds its layers in RAM)."""
        return self.vram_free or self.ram_free


def _mib(text: str) -> int | None:
    try:
        value = int(text.strip())
    except ValueError:
        return None
    return value * _MIB if 0 <= value * _MIB <= _MAX_BYTES else None


def parse_nvidia_smi(out: str) -> tuple[int, int] | None:
    """``nvidia-smi --query-gpu=memory.total,memory.free --format=csv,noheader,nounits``: total and free
    bytes over every GPU (one line each, MiB); None where any line is not two numbers."""
    total = free = 0
    lines = [line for line in out.splitlines() if line.strip()]
    if not lines or len(lines) > 64:
        return None
    for line in lines:
        parts = line.split(",")
        if len(parts) != 2:
            return None
        t, f = _mib(parts[0]), _mib(parts[1])
        if t is None or f is None or f > t:
            return None
        total, free = total + t, free + f
    return total, free


def parse_rocm_smi(out: str) -> tuple[int, int] | None:
    """``rocm-smi --showmeminfo vram --csv``: a header, then ``card,total,used`` in bytes per GPU."""
    lines = [line for line in out.splitlines() if line.strip()]
    if len(lines) < 2 or len(lines) > 65:
        return None
    header = [h.strip().lower() for h in lines[0].split(",")]
    try:
        t_col = next(i for i, h in enumerate(header) if "total memory" in h)
        u_col = next(i for i, h in enumerate(header) if "total used memory" in h)
    except StopIteration:
        return None
    total = used = 0
    for line in lines[1:]:
        parts = line.split(",")
        try:
            t, u = int(parts[t_col]), int(parts[u_col])
        except (IndexError, ValueError):
            return None
        if not (0 <= u <= t <= _MAX_BYTES):
            return None
        total, used = total + t, used + u
    return total, total - used


def _gpu_memory() -> tuple[int, int]:
    """Total and free GPU memory, from whichever tool is here (0, 0: none, or no reading)."""
    tools = (
        ("nvidia-smi", ["--query-gpu=memory.total,memory.free", "--format=csv,noheader,nounits"], parse_nvidia_smi),
        ("rocm-smi", ["--showmeminfo", "vram", "--csv"], parse_rocm_smi),
    )
    for name, args, parse in tools:
        exe = shutil.which(name)
        if exe is None:
            continue
        try:
            done = subprocess.run(
                [exe, *args], capture_output=True, timeout=_TOOL_TIMEOUT_S, check=False, text=True, errors="replace"
            )
        except (OSError, subprocess.SubprocessError):
            continue
        said = parse(done.stdout[:65536]) if done.returncode == 0 else None
        if said is not None:
            return said
    return 0, 0


def read_memory(gpu: tuple[int, int] = (0, 0)) -> Memory:
    """This machine's memory now (``gpu``: the last GPU reading)."""
    vm = psutil.virtual_memory()
    return Memory(ram_total=int(vm.total), ram_free=int(vm.available), vram_total=gpu[0], vram_free=gpu[1])


class Resources:
    """The last reading of this machine's memory; ``refresh()`` takes a new one (off the event loop)."""

    def __init__(self, *, gpus: bool = True) -> None:
        self._gpus = gpus
        self._gpu: tuple[int, int] = (0, 0)
        self._gpu_at: float | None = None
        self.memory = read_memory()

    async def refresh(self) -> Memory:
        now = time.monotonic()
        if self._gpus and (self._gpu_at is None or now - self._gpu_at >= GPU_EVERY_S):
            self._gpu_at = now
            self._gpu = await asyncio.to_thread(_gpu_memory)
        self.memory = read_memory(self._gpu)
        return self.memory
