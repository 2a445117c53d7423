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


def progress_text(done: float, total: float, seconds: float, unit: str,
                  since_done: float = 0.0) -> str:
    """``37/64 tasks (58 %), 1.2 tasks/s, ETA 23 s`` (no rate or ETA before anything is done).

    ``seconds`` is the time from the start to when the last unit was done, ``since_done`` the
    time since then. The rate is the one up to the last unit, so while a few long tasks run
    between two completions the ETA counts down rather than growing with the wait; once the
    wait outlasts that estimate, the rate over the whole time is used.
    """
    share = f" ({100 * done / total:.0f} %)" if total else ""
    text = f"{done:,.0f}/{total:,.0f} {unit}{share}"
    if done <= 0 or seconds + since_done <= 0:
        return f"{text}, {duration(seconds + since_done)} so far, ETA unknown until one is done"
    if seconds <= 0:  # done before the start was seen: the whole time is all there is
        seconds, since_done = seconds + since_done, 0.0
    rate = done / seconds
    left = max(total - done, 0)
    eta = left / rate - since_done
    if eta <= 0 < left:
        eta = left * (seconds + since_done) / done
    shown = f"{rate:,.0f}" if rate >= 10 else f"{rate:.2g}"
    return f"{text}, {shown} {unit}/s, ETA {duration(max(eta, 0))}"
