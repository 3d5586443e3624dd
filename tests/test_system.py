"""palionnx.system on Linux, with the Windows / macOS / no-/proc branches forced by monkeypatching: writes
stay atomic and exclusive, and runs stay resumable, where POSIX-only calls are missing."""

import errno
import os
import signal
from pathlib import Path

import pytest

from palionnx import system
from palionnx.jobs.files import write_atomic


def test_cpu_count_without_affinity(monkeypatch):
    assert system.cpu_count() == len(os.sched_getaffinity(0))
    monkeypatch.delattr(os, "sched_getaffinity")
    assert system.cpu_count() == os.cpu_count()


def test_link_exclusive_uses_hard_links_and_refuses_to_replace(tmp_path):
    source, target = tmp_path / "tmp", tmp_path / "a.txt"
    source.write_text("new")
    system.link_exclusive(source, target)
    assert target.read_text() == "new"
    other = tmp_path / "tmp2"
    other.write_text("newer")
    with pytest.raises(FileExistsError):
        system.link_exclusive(other, target)
    assert target.read_text() == "new"


@pytest.mark.parametrize("failure", [OSError(errno.EPERM, "no hard links"), AttributeError("no os.link")])
def test_link_exclusive_without_hard_links(tmp_path, monkeypatch, failure):
    """A file system without hard links (FAT, some network mounts): a locked rename, still exclusive."""
    def no_link(*_):
        raise failure

    monkeypatch.setattr(os, "link", no_link)
    source, target = tmp_path / "tmp", tmp_path / "a.txt"
    source.write_text("first")
    system.link_exclusive(source, target)
    assert target.read_text() == "first" and not source.exists()
    assert not list(tmp_path.glob(".*.lock"))
    source.write_text("second")
    with pytest.raises(FileExistsError):
        system.link_exclusive(source, target)
    assert target.read_text() == "first"
    (tmp_path / ".a.txt.lock").write_text("")  # another process is publishing right now
    target.unlink()
    with pytest.raises(FileExistsError):
        system.link_exclusive(source, target)


def test_link_exclusive_on_windows_renames_without_replacing(tmp_path, monkeypatch):
    def windows_rename(source, target):  # Windows' os.rename refuses an existing target
        if Path(target).exists():
            raise FileExistsError(errno.EEXIST, "exists", str(target))
        os.replace(source, target)

    monkeypatch.setattr(os, "link", lambda *_: (_ for _ in ()).throw(OSError(errno.EPERM, "no")))
    monkeypatch.setattr(system, "IS_WINDOWS", True)
    monkeypatch.setattr(os, "rename", windows_rename)
    source, target = tmp_path / "tmp", tmp_path / "a.txt"
    source.write_text("first")
    system.link_exclusive(source, target)
    source.write_text("second")
    with pytest.raises(FileExistsError):
        system.link_exclusive(source, target)
    assert target.read_text() == "first"


def test_atomic_writes_on_windows_skip_the_folder_fsync(tmp_path, monkeypatch):
    opened = []
    real_open = os.open

    def tracking_open(path, flags, *args):
        opened.append(Path(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", tracking_open)
    write_atomic(tmp_path / "a.txt", "posix")
    assert tmp_path in opened  # POSIX: the folder is fsynced after the rename
    opened.clear()
    monkeypatch.setattr(system, "IS_WINDOWS", True)
    write_atomic(tmp_path / "b.txt", "windows")
    assert tmp_path not in opened and (tmp_path / "b.txt").read_text() == "windows"


def test_process_liveness(monkeypatch):
    me = system.ProcessId.current()
    assert me.created is not None and system.is_alive(me) is True
    assert system.is_alive(system.ProcessId(me.host, me.pid, me.created + 1)) is False  # pid reused, or a reboot
    assert system.is_alive(system.ProcessId("elsewhere.invalid", me.pid, None)) is None
    older = {"host": me.host, "pid": me.pid, "boot": "b0e4", "started": 12345.0}  # an earlier palionnx's claim
    assert system.is_alive(system.ProcessId.from_json(older)) is True  # the pid alone decides
    assert set(me.to_json()) == {"host", "pid", "created"}  # earlier versions read a claim without boot/started


def test_process_liveness_where_the_os_does_not_say(monkeypatch):
    import psutil

    def refuse(pid=None):
        raise psutil.Error("not supported here")

    monkeypatch.setattr(psutil, "Process", refuse)
    me = system.ProcessId.current()
    assert me.created is None
    assert system.pid_alive(os.getpid()) is None  # "cannot tell", so claims use the lease
    assert system.is_alive(me) is None


def test_zombies_count_as_gone():
    import subprocess
    import sys
    import time

    import psutil

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            if psutil.Process(child.pid).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    assert system.pid_alive(child.pid) is False  # exited, not yet reaped
    child.wait()
    assert system.pid_alive(child.pid) is False


def test_termination_signals(monkeypatch):
    calls = []
    sigterm = signal.SIGTERM
    previous = signal.getsignal(sigterm)
    try:
        assert system.on_termination(lambda: calls.append("stop")) == ["SIGTERM"]  # no SIGBREAK on Linux
        os.kill(os.getpid(), signal.SIGTERM)
        assert calls == ["stop"]
        monkeypatch.delattr(signal, "SIGTERM")
        assert system.on_termination(lambda: None) == []  # a platform with neither: nothing hooked
    finally:
        signal.signal(sigterm, previous)


def test_memory_and_rss(monkeypatch):
    import psutil

    found = system.memory()
    assert found and found.total > 0 and found.available and found.available <= found.total
    assert system.rss_bytes() and system.rss_bytes(peak=True) >= system.rss_bytes()
    assert system.rss_bytes(peak=True) > 10 * 2**20  # getrusage, in bytes

    def refuse(*args, **kwargs):
        raise psutil.Error("not supported here")

    monkeypatch.setattr(psutil, "virtual_memory", refuse)
    monkeypatch.setattr(psutil, "Process", refuse)
    assert system.memory() is None and system.rss_bytes() is None  # unknown, not zero


def test_cpu_description_fallbacks(monkeypatch):
    flags = system.cpu_flags()
    assert flags is not None and flags <= set(system.CPU_FEATURES)
    assert system.cpu_name()
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: (_ for _ in ()).throw(OSError("no /proc")))
    assert system.cpu_flags() is None  # neither /proc nor macOS: unknown, not "none"
    assert system.cpu_name()


def test_nvidia_gpus_parses_nvidia_smi(monkeypatch):
    monkeypatch.setattr(system, "_run", lambda command, timeout=10: "NVIDIA H100 80GB HBM3, 81559, 80000, 580.1\n")
    (gpu,) = system.nvidia_gpus()
    assert gpu.name == "NVIDIA H100 80GB HBM3" and gpu.memory_free_mb == 80000 and gpu.driver == "580.1"
    monkeypatch.setattr(system, "_run", lambda command, timeout=10: None)
    assert system.nvidia_gpus() == []


def test_process_gpu_memory_reads_this_process_row(monkeypatch):
    rows = f"{os.getpid() + 1}, 900\n{os.getpid()}, 1234\n"
    monkeypatch.setattr(system, "_run", lambda command, timeout=10: rows)
    assert system.process_gpu_memory_mb() == 1234.0
    assert system.process_gpu_memory_mb(os.getpid() + 1) == 900.0
    assert system.process_gpu_memory_mb(os.getpid() + 2) is None  # holds no GPU memory
    monkeypatch.setattr(system, "_run", lambda command, timeout=10: None)
    assert system.process_gpu_memory_mb() is None  # no nvidia-smi


def test_last_level_cache_from_sysfs(monkeypatch):
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: "32768K\n")
    assert system.last_level_cache_bytes() == 32 * 2**20
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: (_ for _ in ()).throw(OSError("no sysfs")))
    assert system.last_level_cache_bytes() is None
