"""Everything that differs between Linux, macOS and Windows, in one place, each with a portable fallback.

The rest of palionnx calls these instead of POSIX-only functions (hard links, `fsync` of a folder,
`os.sched_getaffinity`, `/proc`, signals), so captioning stays atomic and resumable everywhere.
Process and memory facts come from psutil (tested upstream on Linux, macOS and Windows); what no library
gives stays here by hand: atomic no-replace links, folder fsync, signals, short side-file names, CPU
instruction-set flags and name, the last-level cache size, and nvidia-smi's GPU rows.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

IS_WINDOWS = os.name == "nt"
IS_MACOS = sys.platform == "darwin"
# Errors meaning "this file system (or OS) cannot make hard links", as opposed to a real failure.
_NO_HARD_LINKS = {errno.EPERM, errno.EACCES, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.ENOSYS, errno.EMLINK}


def cpu_count() -> int:
    """Cores this process may run on: the affinity mask where the OS has one (containers often allow
    fewer cores than the host has), else all cores."""
    try:
        return len(psutil.Process().cpu_affinity())
    except (AttributeError, psutil.Error, OSError):  # macOS has no affinity masks
        return os.cpu_count() or 1


NAME_MAX = 255  # bytes in one file name on ext4, XFS, APFS, NTFS (UTF-16 units there) and most others


def side_file(path: Path, suffix: str, reserve: int = 0) -> Path:
    """A hidden file beside `path` named after it: `.NAME` + `suffix`, or, where that (with `reserve` bytes
    more that the caller may append) would outgrow NAME_MAX, `.` + the start of NAME + `~` + 16 hex digits
    of its hash + `suffix`: the same name for the same path in every process."""
    name = os.fsencode(path.name)
    room = NAME_MAX - len(os.fsencode(suffix)) - reserve - 1  # the leading dot
    if len(name) <= room:
        return path.with_name(f".{path.name}{suffix}")
    import hashlib

    digest = hashlib.sha256(name).hexdigest()[:16]
    start = name[: room - len(digest) - 1].decode("utf-8", "ignore")  # whole characters only
    while len(os.fsencode(start)) > room - len(digest) - 1:
        start = start[:-1]
    return path.with_name(f".{start}~{digest}{suffix}")


def link_exclusive(source: Path, target: Path) -> None:
    """Put the file `source` at `target` unless `target` exists (then FileExistsError), atomically.

    A hard link where the file system has them; otherwise a rename that refuses to replace (Windows'
    rename already does; elsewhere a lock file next to `target` makes the check and the rename one step).
    """
    try:
        os.link(source, target)
        return
    except FileExistsError:
        raise
    except (AttributeError, NotImplementedError):
        pass
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
    _move_exclusive(source, target)


def _move_exclusive(source: Path, target: Path) -> None:
    if IS_WINDOWS:
        os.rename(source, target)  # Windows never replaces an existing file here: FileExistsError
        return
    lock = side_file(target, ".lock")
    try:
        handle = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, "being written by another process", str(target)) from None
    try:
        if os.path.lexists(target):
            raise FileExistsError(errno.EEXIST, "exists", str(target))
        os.replace(source, target)
    finally:
        os.close(handle)
        os.unlink(lock)


def fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable. POSIX only; Windows (NTFS journals renames) has no folder fsync."""
    if IS_WINDOWS:
        return
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass  # some file systems (network mounts) refuse it: the rename stands anyway
    finally:
        os.close(handle)


@dataclass(frozen=True)
class ProcessId:
    """Names a running process across machines and reboots: pid reuse and other hosts are told apart."""

    host: str
    pid: int
    created: float | None  # when the process started (psutil's create_time, seconds since the epoch)

    @classmethod
    def current(cls) -> ProcessId:
        return cls(socket.gethostname(), os.getpid(), process_created(os.getpid()))

    def to_json(self) -> dict[str, Any]:
        # earlier palionnx wrote "boot" (Linux boot id) and "started" (clock ticks since boot); without
        # them, those versions check the pid alone, which is still right
        return {"host": self.host, "pid": self.pid, "created": self.created}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ProcessId:
        created = data.get("created")  # absent from older palionnx's claims: the pid alone decides
        return cls(str(data["host"]), int(data["pid"]), float(created) if created is not None else None)


def is_alive(process: ProcessId) -> bool | None:
    """Whether `process` still runs: True/False on this host, None (cannot tell) for another host or where
    the OS does not say. A process with the same pid but another start time (the pid reused, or the machine
    rebooted) is not it."""
    if process.host != socket.gethostname():
        return None
    alive = pid_alive(process.pid)
    if alive and process.created is not None:
        created = process_created(process.pid)
        return created is None or abs(created - process.created) < _SAME_START_S
    return alive


_SAME_START_S = 0.01  # start times read by two processes agree to the clock tick (1/100 s on Linux)


def pid_alive(pid: int) -> bool | None:
    """Whether a process with this id runs here (None when the OS cannot say). A zombie (killed, not yet
    reaped by its parent) counts as gone."""
    try:
        return psutil.Process(pid).status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True  # exists, owned by another user
    except (psutil.Error, OSError):
        return None


def process_created(pid: int) -> float | None:
    """When the process started (seconds since the epoch); None where the OS does not say."""
    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.Error, OSError):
        return None


def on_termination(handler: Callable[[], None]) -> list[str]:
    """Call `handler` on the signals that ask a program to stop besides Ctrl-C: SIGTERM (POSIX, `kill`,
    service managers) and SIGBREAK (Windows' Ctrl-Break). Returns the names of the signals hooked."""
    hooked = []
    for name in ("SIGTERM", "SIGBREAK"):
        number = getattr(signal, name, None)
        if number is None:
            continue
        try:
            signal.signal(number, lambda _signum, _frame: handler())
        except (OSError, ValueError):  # not the main thread, or not allowed here
            continue
        hooked.append(name)
    return hooked


@dataclass(frozen=True)
class Memory:
    """Physical memory in bytes; `available` is None where the OS does not say it cheaply."""

    total: int
    available: int | None


def memory() -> Memory | None:
    """Total and available RAM (psutil's virtual_memory)."""
    try:
        found = psutil.virtual_memory()
    except (psutil.Error, OSError):
        return None
    return Memory(int(found.total), int(found.available))


def rss_bytes(peak: bool = False) -> int | None:
    """This process's resident memory now (psutil), or its peak. psutil gives the peak on Windows only
    (`peak_wset`); on POSIX the peak comes from getrusage, which psutil does not wrap."""
    try:
        info = psutil.Process().memory_info()
    except (psutil.Error, OSError):
        return None
    if not peak:
        return int(info.rss)
    if hasattr(info, "peak_wset"):
        return int(info.peak_wset)
    try:
        import resource
    except ImportError:
        return None
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # macOS reports bytes, Linux kilobytes; Linux updates it lazily, so it can trail the current size
    return max(maxrss if IS_MACOS else maxrss * 1024, int(info.rss))


# CPU features that change which --quant runs fastest: VNNI lets MatMulNBits (accuracy_level 4) compute
# in int8; AVX2 / AVX-512 are the vector widths onnxruntime's kernels use; on Arm, dot-product and i8mm.
CPU_FEATURES = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_vnni": "AVX-512 VNNI", "avx_vnni": "AVX-VNNI",
                "amx_int8": "AMX-INT8", "asimddp": "Arm dot product", "i8mm": "Arm i8mm"}
_MACOS_FEATURES = {"hw.optional.avx2_0": "avx2", "hw.optional.avx512f": "avx512f",
                   "hw.optional.arm.FEAT_DotProd": "asimddp", "hw.optional.arm.FEAT_I8MM": "i8mm"}


def cpu_flags() -> set[str] | None:
    """Instruction-set flags of this CPU among CPU_FEATURES (Linux /proc/cpuinfo names); None if unknown."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return _macos_cpu_flags() if IS_MACOS else None
    flags = set()
    for line in text.splitlines():
        if re.match(r"(flags|Features)\s*:", line):
            flags |= set(line.split(":", 1)[1].split())
    return flags & set(CPU_FEATURES)


def _macos_cpu_flags() -> set[str] | None:
    flags = set()
    for key, flag in _MACOS_FEATURES.items():
        out = _run(["sysctl", "-n", key])
        if out is not None and out.strip() == "1":
            flags.add(flag)
    return flags


def cpu_name() -> str:
    """The CPU's model name where the OS says it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if IS_MACOS:
        return (_run(["sysctl", "-n", "machdep.cpu.brand_string"]) or "").strip() or "unknown"
    import platform

    return platform.processor() or platform.machine() or "unknown"


def _run(command: list[str], timeout: float = 10) -> str | None:
    """A command's stdout, or None when it is missing or fails."""
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None


@dataclass(frozen=True)
class Gpu:
    """An NVIDIA GPU as nvidia-smi reports it (memory in MiB)."""

    name: str
    memory_total_mb: float
    memory_free_mb: float
    driver: str


def nvidia_gpus() -> list[Gpu]:
    """The NVIDIA GPUs nvidia-smi sees (none when it is missing or fails)."""
    out = _run(["nvidia-smi", "--query-gpu=name,memory.total,memory.free,driver_version",
                "--format=csv,noheader,nounits"])
    gpus = []
    for line in (out or "").splitlines():
        parts = [part.strip() for part in line.split(",")]
        if len(parts) == 4:
            try:
                gpus.append(Gpu(parts[0], float(parts[1]), float(parts[2]), parts[3]))
            except ValueError:
                continue
    return gpus


def process_gpu_memory_mb(pid: int | None = None) -> float | None:
    """GPU memory a process (default: this one) holds, as nvidia-smi reports it; None without nvidia-smi or
    when the process holds none."""
    out = _run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"])
    wanted = str(os.getpid() if pid is None else pid)
    for line in (out or "").splitlines():
        parts = [part.strip() for part in line.split(",")]
        if len(parts) == 2 and parts[0] == wanted:
            try:
                return float(parts[1])
            except ValueError:
                return None
    return None


def last_level_cache_bytes() -> int | None:
    """The size of CPU 0's last-level (L3) cache from Linux's sysfs; None elsewhere or when it does not say."""
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        return int(text.rstrip("KMG")) * {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1], 1)
    except (OSError, ValueError, IndexError):
        return None
