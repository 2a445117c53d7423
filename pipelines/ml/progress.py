"""Progress of long work for a person reading a log: done/total, rate and ETA in one line.

Shared by the Spark stage monitor (:mod:`pipelines.run.progress`) and the training callback
(:mod:`pipelines.ml.callbacks`); imports nothing heavy.
"""

from __future__ import annotations


def duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def progress_text(done: float, total: float, seconds: float, unit: str) -> str:
    """``37/64 tasks (58 %), 1.2 tasks/s, ETA 23 s`` (no rate or ETA before anything is done)."""
    share = f" ({100 * done / total:.0f} %)" if total else ""
    text = f"{done:,.0f}/{total:,.0f} {unit}{share}"
    if done <= 0 or seconds <= 0:
        return f"{text}, {duration(seconds)} so far, ETA unknown until one is done"
    rate = done / seconds
    shown = f"{rate:,.0f}" if rate >= 10 else f"{rate:.2g}"
    return f"{text}, {shown} {unit}/s, ETA {duration(max(total - done, 0) / rate)}"
