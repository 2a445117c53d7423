"""Read TensorBoard event files back: what the tests assert on (values, steps, write times)."""

from __future__ import annotations

from pathlib import Path


def scalar_events(run: Path) -> dict[str, dict[int, tuple[float, float]]]:
    """Tag -> step -> (value, wall time of the write), over a run folder's event files (a later
    file's value for a step replaces an earlier one's, as after a resume)."""
    import tensorflow as tf

    events: dict[str, dict[int, tuple[float, float]]] = {}
    for path in sorted(Path(run).glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                events.setdefault(value.tag, {})[event.step] = (
                    float(tf.make_ndarray(value.tensor)), event.wall_time)
    return events


def scalars(run: Path) -> dict[str, list[float]]:
    """Tag -> values in step order."""
    return {tag: [by_step[s][0] for s in sorted(by_step)]
            for tag, by_step in scalar_events(run).items()}
