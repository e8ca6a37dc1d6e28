"""Progress lines with ETA, written to stderr so stdout stays machine-readable."""

from __future__ import annotations

import sys
import time


def format_seconds(seconds: float) -> str:
    """``75.2`` -> ``'1m15s'``."""
    seconds = max(0, int(round(seconds)))
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Progress:
    """Counts units of work and prints ``label k/n, elapsed, ETA`` lines."""

    def __init__(self, label: str, total: int, enabled: bool = True) -> None:
        self.label = label
        self.total = max(total, 1)
        self.enabled = enabled
        self.start = time.perf_counter()
        self.done = 0

    def eta(self) -> float:
        """Seconds left, extrapolated from the rate so far."""
        if self.done == 0:
            return float("nan")
        rate = (time.perf_counter() - self.start) / self.done
        return rate * (self.total - self.done)

    def update(self, done: int, message: str = "") -> None:
        """Record ``done`` units finished and print a line."""
        self.done = done
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        eta = self.eta()
        eta_text = format_seconds(eta) if eta == eta else "?"
        line = (
            f"[{self.label}] {done}/{self.total} | elapsed {format_seconds(elapsed)}"
            f" | ETA {eta_text}"
        )
        print(f"{line} | {message}" if message else line, file=sys.stderr, flush=True)

    def log(self, message: str) -> None:
        """Print a free-form line under this label."""
        if self.enabled:
            print(f"[{self.label}] {message}", file=sys.stderr, flush=True)
