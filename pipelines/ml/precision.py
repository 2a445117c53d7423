"""Which floating-point precision a model runs in: ``float32``, ``bfloat16`` or ``auto``.

``bfloat16`` runs the model under Keras' ``mixed_bfloat16`` dtype policy: weights stay float32,
convolutions and matrix products compute in bfloat16. That pays only on hardware with bfloat16
units: Intel CPUs reporting AMX (``amx_bf16``) or AVX512-BF16 (``avx512_bf16``) in
``/proc/cpuinfo``, and GPUs. Elsewhere bfloat16 is emulated and slower than float32, so ``auto``
picks ``bfloat16`` only there. Outputs are always float32 arrays (their values carry bfloat16's
rounding, about 3 significant digits, when bfloat16 ran).

``auto`` is decided where the model runs (each Python worker, for its own CPU), not on the
driver; :func:`resolve_precision` says what was chosen and why, for the log.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from pyspark.ml.param import Param, Params, TypeConverters

logger = logging.getLogger(__name__)

PRECISIONS = ("float32", "bfloat16", "auto")
#: ``/proc/cpuinfo`` flags of CPUs with native bfloat16 arithmetic.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
CPUINFO = "/proc/cpuinfo"


def to_precision(value: object) -> str:
    """Param type converter: checks the value when it is set, on the driver."""
    text = TypeConverters.toString(value)
    if text not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}. Received: precision={value!r}")
    return text


class HasPrecision(Params):
    """Mixin for the ``precision`` Param of every inference stage (default ``float32``)."""

    precision = Param(
        Params._dummy(), "precision",
        "float32, bfloat16 (Keras mixed_bfloat16; outputs stay float32) or auto (bfloat16 only "
        "where the worker's CPU has AMX or AVX512-BF16, or on a GPU)",
        typeConverter=to_precision,
    )

    def __init__(self, *args):
        super().__init__(*args)
        self._setDefault(precision="float32")

    def getPrecision(self) -> str:
        return self.getOrDefault(self.precision)

    def setPrecision(self, value: str):
        return self._set(precision=value)


def cpu_bf16_flags(cpuinfo: str = CPUINFO) -> list[str]:
    """The bfloat16 flags of :data:`BF16_CPU_FLAGS` this CPU reports ([] when unreadable)."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return [flag for flag in BF16_CPU_FLAGS if flag in flags]
    except OSError:  # not Linux, or /proc not mounted: no evidence of bfloat16 units
        logger.debug("cannot read %s; assuming no bfloat16 CPU support", cpuinfo)
    return []


def resolve_precision(
    requested: str, gpus: Sequence[str] = (), cpuinfo: str = CPUINFO
) -> tuple[str, str]:
    """(``float32`` or ``bfloat16``, why) for a requested precision on this machine.

    Args:
        requested: one of :data:`PRECISIONS`.
        gpus: names of the GPUs TensorFlow sees here (empty on a CPU-only machine).

    Raises:
        ValueError: ``requested`` is not one of :data:`PRECISIONS`.
    """
    to_precision(requested)
    flags = cpu_bf16_flags(cpuinfo)
    if requested != "auto":
        if requested == "bfloat16" and not gpus and not flags:
            return requested, ("requested; this CPU reports neither AMX nor AVX512-BF16, so "
                               "bfloat16 is emulated and likely slower than float32")
        return requested, "requested"
    if gpus:
        return "bfloat16", f"auto: GPU present ({', '.join(gpus)})"
    if flags:
        return "bfloat16", f"auto: CPU reports {', '.join(flags)}"
    return "float32", f"auto: CPU reports none of {', '.join(BF16_CPU_FLAGS)} and no GPU"


def log_precision(requested: str, what: str) -> None:
    """Driver log line: the precision asked for and what this machine's CPU would give."""
    precision, why = resolve_precision(requested)
    if requested == "auto":
        logger.info("%s: precision auto, decided on each worker for its CPU; on this driver's "
                    "CPU it gives %s (%s)", what, precision, why)
    else:
        logger.info("%s: precision %s (%s)", what, precision, why)


def worker_precision(requested: str) -> str:
    """Executor side: :func:`resolve_precision` with TensorFlow's GPUs, logged; the precision."""
    gpus: list[str] = []
    if requested == "auto":
        import tensorflow as tf

        gpus = [device.name for device in tf.config.list_physical_devices("GPU")]
    precision, why = resolve_precision(requested, gpus)
    logger.info("running in %s (%s)", precision, why)
    return precision
