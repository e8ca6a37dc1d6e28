"""The processes a benchmark run started: their RSS, and stopping them.

``descendants_rss`` reads the resident memory and command line of a process and all
its live descendants (psutil when installed, else ``/proc``); ``RssSampler`` keeps the
peak of each in a background thread. ``kill_tree`` ends a run's process group and
``kill_leftovers`` the descendants that outlived it, never a reused pid.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field


def _proc_children() -> dict[int, list[int]]:
    """Parent pid -> child pids, read from ``/proc/*/stat``."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                stat = handle.read()
        except OSError:
            continue
        # the command name is in parentheses and may hold spaces: split after it
        ppid = int(stat[stat.rfind(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def _proc_rss_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _proc_cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def descendants_rss(root: int) -> dict[int, tuple[float, str]]:
    """RSS (MiB) and command line of ``root`` and all its live descendants.

    Uses psutil when it is installed, else ``/proc``.
    """
    try:
        import psutil
    except ImportError:
        psutil = None  # type: ignore[assignment]
    found: dict[int, tuple[float, str]] = {}
    if psutil is not None:
        try:
            top = psutil.Process(root)
            procs = [top, *top.children(recursive=True)]
        except psutil.NoSuchProcess:
            return found
        for proc in procs:
            try:
                with proc.oneshot():
                    found[proc.pid] = (
                        proc.memory_info().rss / 2**20,
                        " ".join(proc.cmdline())[:200],
                    )
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return found
    children = _proc_children()
    stack = [root]
    while stack:
        pid = stack.pop()
        rss = _proc_rss_mib(pid)
        if rss is not None:
            found[pid] = (rss, _proc_cmdline(pid)[:200])
        stack.extend(children.get(pid, []))
    return found


@dataclass
class RssSampler:
    """Background thread keeping the peak RSS of every descendant of ``root``."""

    root: int
    interval_s: float = 0.5
    peaks: dict[int, float] = field(default_factory=dict)
    commands: dict[int, str] = field(default_factory=dict)
    total_peak: float = 0.0
    samples: int = 0

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> RssSampler:
        """Start sampling; returns ``self``."""
        self._thread.start()
        return self

    def sample(self) -> None:
        """Take one sample now."""
        found = descendants_rss(self.root)
        for pid, (rss, command) in found.items():
            self.peaks[pid] = max(self.peaks.get(pid, 0.0), rss)
            if command:
                self.commands[pid] = command
        self.total_peak = max(self.total_peak, sum(r for r, _ in found.values()))
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def stop(self) -> None:
        """Stop sampling and wait for the thread."""
        self._stop.set()
        self._thread.join()


def kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """End the run's process group, then any recorded descendant still alive."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=10)
            break
        except subprocess.TimeoutExpired:
            continue


def kill_leftovers(commands: dict[int, str], grace_s: float = 15.0) -> list[int]:
    """SIGKILL our run's descendants that outlived it (after a grace period).

    A pid is only signalled while its command line is still the one recorded for it,
    so a pid reused by an unrelated process is never touched.
    """

    def ours(pid: int) -> bool:
        command = commands.get(pid)
        return bool(command) and _proc_cmdline(pid)[:200] == command

    deadline = time.monotonic() + grace_s
    alive = [pid for pid in commands if ours(pid)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.5)
        alive = [pid for pid in alive if ours(pid)]
    killed = []
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        except (ProcessLookupError, PermissionError):
            continue
    return killed


__all__ = ["RssSampler", "descendants_rss", "kill_leftovers", "kill_tree"]
