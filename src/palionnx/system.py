"""Everything that differs between Linux, macOS and Windows, in one place, each with a portable fallback.

The rest of palionnx calls these instead of POSIX-only functions (hard links, `fsync` of a folder,
`os.sched_getaffinity`, `/proc`, signals), so captioning stays atomic and resumable everywhere.
Standard library only: the runtime imports this module too.
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

IS_WINDOWS = os.name == "nt"
IS_MACOS = sys.platform == "darwin"
# Errors meaning "this file system (or OS) cannot make hard links", as opposed to a real failure.
_NO_HARD_LINKS = {errno.EPERM, errno.EACCES, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.ENOSYS, errno.EMLINK}


def cpu_count() -> int:
    """Cores this process may run on: the affinity mask where the OS has one (containers often allow
    fewer cores than the host has), else all cores."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
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
    boot: str | None  # Linux boot id: a claim from before a reboot is dead whatever its pid
    started: float | None  # the process's start time where the OS says it

    @classmethod
    def current(cls) -> ProcessId:
        return cls(socket.gethostname(), os.getpid(), boot_id(), process_start_time(os.getpid()))

    def to_json(self) -> dict[str, Any]:
        return {"host": self.host, "pid": self.pid, "boot": self.boot, "started": self.started}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ProcessId:
        return cls(str(data["host"]), int(data["pid"]), data.get("boot"), data.get("started"))


def is_alive(process: ProcessId) -> bool | None:
    """Whether `process` still runs: True/False on this host, None (cannot tell) for another host."""
    if process.host != socket.gethostname():
        return None
    if process.boot and boot_id() and process.boot != boot_id():
        return False
    alive = pid_alive(process.pid)
    if alive and process.started is not None:
        started = process_start_time(process.pid)
        return started is None or started == process.started
    return alive if alive is not None else None


def pid_alive(pid: int) -> bool | None:
    """Whether a process with this id runs here (None when the OS cannot say). A zombie (killed, not yet
    reaped by its parent) counts as gone."""
    if IS_WINDOWS:
        return _windows_pid_alive(pid)
    state = _linux_state(pid)
    if state is not None:
        return state not in ("Z", "X")
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    except OSError:
        return None
    return True


def _windows_pid_alive(pid: int) -> bool | None:
    try:
        import ctypes

        kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
    except (ImportError, AttributeError, OSError):
        return None
    handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return False
    try:
        code = ctypes.c_ulong()
        if not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)):
            return None
        return code.value == 259  # STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)


def _linux_state(pid: int) -> str | None:
    """The process's state letter from /proc (R, S, Z, ...); None without /proc or without the process
    (then the portable check decides)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def boot_id() -> str | None:
    """Linux's id of the current boot; None elsewhere."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def process_start_time(pid: int) -> float | None:
    """When the process started, in clock ticks since boot (Linux); None where /proc is absent."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return float(stat.rsplit(")", 1)[1].split()[19])  # field 22; the name before ")" may hold spaces


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
    """Total and available RAM: /proc/meminfo on Linux, the Win32 API on Windows, sysconf elsewhere."""
    info = _meminfo()
    if "MemTotal" in info:
        return Memory(info["MemTotal"], info.get("MemAvailable"))
    if IS_WINDOWS:
        return _windows_memory()
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None
    available = None
    if hasattr(os, "sysconf_names") and "SC_AVPHYS_PAGES" in os.sysconf_names:
        available = os.sysconf("SC_AVPHYS_PAGES") * size
    return Memory(pages * size, available)


def _meminfo() -> dict[str, int]:
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return {}
    values = {}
    for line in lines:
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[name] = int(parts[0]) * 1024
    return values


def _windows_memory() -> Memory | None:
    try:
        import ctypes

        class Status(ctypes.Structure):
            _fields_ = [("length", ctypes.c_ulong), ("load", ctypes.c_ulong), ("total", ctypes.c_ulonglong),
                        ("available", ctypes.c_ulonglong), ("page_total", ctypes.c_ulonglong),
                        ("page_available", ctypes.c_ulonglong), ("virtual_total", ctypes.c_ulonglong),
                        ("virtual_available", ctypes.c_ulonglong), ("extended", ctypes.c_ulonglong)]

        status = Status()
        status.length = ctypes.sizeof(Status)
        if not ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):  # type: ignore[attr-defined]
            return None
        return Memory(int(status.total), int(status.available))
    except (ImportError, AttributeError, OSError):
        return None


def rss_bytes(peak: bool = False) -> int | None:
    """This process's resident memory now, or its peak: /proc (Linux), getrusage elsewhere on POSIX."""
    key = "VmHWM" if peak else "VmRSS"
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith(key + ":"))
    except (OSError, StopIteration):
        pass
    try:
        import resource
    except ImportError:
        return None  # Windows
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if IS_MACOS else maxrss * 1024  # macOS reports bytes, Linux kilobytes


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
