"""Training on the executors: one model over N Spark tasks, or independent models, one per task.

**Multi-worker** (:func:`fit_multi_worker`): one Spark *barrier* stage of N tasks over the
training DataFrame repartitioned into N shards. Each task decodes its own shard (Arrow batches,
no row objects), picks a free port, and the tasks exchange ``host:port`` and shard sizes with
``BarrierTaskContext.allGather``. Each then starts a training process with ``TF_CONFIG`` naming
the N workers, which trains synchronously with ``tf.distribute.MultiWorkerMirroredStrategy``:
gradients are averaged by TensorFlow's collective all-reduce (ring over gRPC) every step.

Keras 3's ``model.fit`` fails under that strategy (keras-team/keras#20585), so the loop is
written out: ``strategy.run`` over ``distribute_datasets_from_function`` batches,
``tf.nn.compute_average_loss``, the Keras optimizer's ``apply_gradients``. Every worker takes
the same number of steps per epoch (its shard repeats; the count comes from all shard sizes).
Validation runs on a plain copy of the weights outside the strategy (``model.predict`` inside a
multi-worker context gave wrong predictions), on every worker, so early stopping agrees; the
chief (rank 0) writes the model of the best epoch and the history.

**Independent** (:func:`fit_independent`): K training plans (tuning candidates, ensemble
members) as K tasks of one Spark job, each training one model with Keras ``fit``
(:func:`pipelines.ml.training.train_model`) on the whole training set. The training rows reach
the tasks through Spark itself: the DataFrame is cross-joined with the K plan numbers and
range-partitioned on them, so each task receives a full copy (sorted in one fixed order, so a
seed trains the same model every time); the driver never collects them.

Both kinds of session, classic and Spark Connect, take the same path: DataFrame operations
(``mapInArrow``, with ``barrier=True`` for the multi-worker stage) and Spark conf only, no
``SparkContext``. The validation rows (collected on the driver, small) and a start model travel
inside the task's function as ``.npz`` / ``.keras`` bytes.

Why a child process per task: a TensorFlow process can join one collective cluster only, once,
and fixes its thread pools at start; Spark reuses Python workers. The child gets
``spark.task.cpus`` threads, dies with its task (``PR_SET_PDEATHSIG``), and a child that dies
fails its task with its exit code and the end of its log. Collectives have a timeout
(``CommunicationOptions(timeout_seconds=...)``), so a worker whose peer died stops with an error
rather than waiting for ever. Spark then fails the barrier stage and retries it as a whole, up
to ``spark.stage.maxConsecutiveAttempts`` (4 by default): the stage feeds a one-partition
shuffle before the driver collects it, because Spark aborts a failed barrier *result* stage
instead of retrying it.

Checkpoints (``checkpoint_dir``, a folder every executor reads and writes: a shared file system
mount, or any local path on a one-host cluster): the multi-worker chief writes the weights, the
optimizer's variables (so the learning-rate schedule goes on from its step), the history and
the early-stopping state at each epoch's end, atomically (``os.replace``); an independent task
keeps Keras' ``BackupAndRestore`` state there. A retried stage, or a new fit with the same plan,
the same number of workers and the same training rows (counted per label), resumes from the
last finished epoch; the data order after a resume is a new shuffle, not the interrupted one.
A fit that finishes removes its checkpoint.

Epoch lines: while the Spark job runs, the driver listens for each epoch's end
(:class:`pipelines.ml.epoch_reports.EpochReports`): an independent task's Keras callback and the
multi-worker chief send the epoch's metrics and seconds, and the driver logs them with the
fit's epochs done and ETA, so a fit of hours does not show only "0/6 tasks" until its first
task ends.

TensorBoard (``tensorboard_dir``, a folder the executors write): the multi-worker chief writes
each epoch's scalars as the epoch ends (:class:`pipelines.ml.training.EpochScalars`); an
independent task's Keras ``TensorBoard`` callback writes its own run.

Core binding (Spark conf :data:`BIND_CORES_CONF`): TensorFlow's thread pools (tf.data's, the
inter-op pool, gRPC) run beside the ``spark.task.cpus`` compute threads, so an unbound worker
takes more than its cores, and workers that share a host slow each other down. With ``auto``
(the default), when several workers of the barrier stage are on one host, each is bound to its
own ``spark.task.cpus`` of the host's CPUs (``sched_setaffinity``, by rank among the host's
workers), as ``mpirun --bind-to core`` does; a worker alone on its host is left unbound, since
its container may see CPUs it does not own. ``always`` binds also a lone worker (benchmarks
compare 1 and 2 workers on one core each with it); ``never`` switches binding off. Binding is
skipped when the host's workers need more CPUs than the process may use.

Test hook: the Spark conf :data:`KILL_CONF` = ``"<rank>:<step>"`` makes that worker's training
process exit with code 137 before that step (step count of the fit, from 1; in an independent
task, of that process), as a ``kill -9`` would; ``"<rank>:<step>:once"`` only the first time
(it leaves a marker in the checkpoint folder), so a retry can succeed.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.ml.epoch_reports import EpochReports, epoch_sender, send_epoch
from pipelines.ml.training import TrainingPlan, epoch_logger

logger = logging.getLogger(__name__)

#: Spark conf read when a fit starts: ``"<rank>:<step>[:once]"`` kills that worker (tests).
KILL_CONF = "spark.pipelines.training.kill"
#: Spark conf: ``auto`` (default), ``always`` or ``never`` bind training workers to cores.
BIND_CORES_CONF = "spark.pipelines.training.bindCores"
_BIND_MODES = ("auto", "always", "never")
#: The columns the tasks read, in Arrow (what :func:`pipelines.ml.datasets.decode_batch` takes).
SHARD_COLUMNS = ("label", "data", "height", "width", "channels")
#: Which plan a row of the independent tasks' input belongs to, and its place in the data.
_PLAN_COLUMN, _ROW_COLUMN = "_plan", "_row"
_RESULT_SCHEMA = "rank int, result string, model binary"
_LOG_TAIL = 3000
_GRADIENT_PACK_BYTES = 64 * 1024 * 1024


class TrainingWorkerError(RuntimeError):
    """A training process on an executor failed; the message has its exit code and log tail."""


@dataclass
class WorkerOutput:
    """What one training task returns: the model (chief / single task) and its record."""

    model: bytes | None
    result: dict[str, Any]


# --------------------------------------------------------------------------- driver side


def fit_multi_worker(
    frame: Any, plan: TrainingPlan, validation: tuple[np.ndarray, np.ndarray] | None,
    num_workers: int, timeout_s: float, checkpoint_dir: str | None = None,
    tensorboard_dir: str | None = None,
) -> list[WorkerOutput]:
    """Train ``plan`` on ``frame`` (columns :data:`SHARD_COLUMNS`) with ``num_workers`` tasks.

    Returns one :class:`WorkerOutput` per worker, by rank; rank 0 holds the model.
    ``checkpoint_dir``: where epoch checkpoints go (see the module doc); ``None``: none.
    ``tensorboard_dir``: the chief writes each epoch's scalars there as the epoch ends (a
    folder its executor can write, which the user's TensorBoard reads); ``None``: none.

    Raises:
        TrainingWorkerError: a worker failed (the Spark job's error, with the worker's message).
    """
    spark = frame.sparkSession
    bind = bind_mode(spark.conf.get(BIND_CORES_CONF, "auto"))
    shape = tuple(plan.spec.input_shape)
    val_npz = _npz_bytes(validation) if validation else None
    start = Path(plan.start_model).read_bytes() if plan.start_model else None
    plan_json = plan.to_json()
    kill = spark.conf.get(KILL_CONF, None)
    _kill_plan(kill, -1, None)  # a bad value fails here, on the driver

    def task(batches: Iterator[Any]) -> Iterator[Any]:
        import pyarrow as pa
        from pyspark import BarrierTaskContext

        from pipelines.ml.datasets import decode_batch

        context = BarrierTaskContext.get()
        rank = context.partitionId()
        images, labels = _decode_all(batches, shape, decode_batch, f"training shard {rank}")
        work = Path(tempfile.mkdtemp(prefix=f"pipelines-train-{rank}-"))
        try:
            np.savez(work / "train.npz", x=images, y=labels)
            port = _free_port()
            host = context.getTaskInfos()[rank].address.rsplit(":", 1)[0]
            me = json.dumps({"rank": rank, "address": f"{host}:{port}", "rows": len(labels),
                             "labels": _label_counts(labels)})
            peers = sorted((json.loads(m) for m in context.allGather(me)),
                           key=lambda p: p["rank"])
            rows = [p["rows"] for p in peers]
            if min(rows) == 0:
                raise ValueError(f"every worker needs training rows. Received shard sizes {rows}")
            folder = _checkpoint_folder(checkpoint_dir, f"workers{len(peers)}", plan_json,
                                        [(p["rows"], p["labels"]) for p in peers])
            job = _job(plan_json, "multi", rank, len(peers), context.cpus(), timeout_s, kill,
                       start, val_npz, work, folder, tensorboard_dir if rank == 0 else None,
                       reports if rank == 0 else None)
            job["steps_per_epoch"] = max(1, math.ceil(sum(rows) / plan.batch_size))
            hosts = [p["address"].rsplit(":", 1)[0] for p in peers]
            job["cores"] = worker_cores(bind, rank, hosts, job["threads"], _allowed_cpus())
            (work / "job.json").write_text(json.dumps(job))
            tf_config = {"cluster": {"worker": [p["address"] for p in peers]},
                         "task": {"type": "worker", "index": rank}}
            out = _run_child(work, {"TF_CONFIG": json.dumps(tf_config)},
                             f"training worker {rank} of {len(peers)}", reports)
        finally:
            _remove(work)
        yield pa.RecordBatch.from_pylist([out], schema=_arrow_schema())

    try:
        # The shuffle after the barrier stage makes it a map stage, which Spark retries whole
        # when a task fails (a failed barrier result stage is aborted instead).
        with EpochReports(spark, [f"the {num_workers}-worker model"],
                          [plan.epochs]) as listener:
            reports = listener.address  # read by ``task`` when mapInArrow pickles it
            rows = (frame.repartition(num_workers)
                    .mapInArrow(task, _RESULT_SCHEMA, barrier=True).repartition(1).collect())
    except Exception as exc:  # Py4J / PythonException: keep the worker's own message first
        raise TrainingWorkerError(
            f"multi-worker training with numWorkers={num_workers} failed: "
            f"{_cause(exc)}") from exc
    outputs = [WorkerOutput(r["model"], json.loads(r["result"])) for r in rows]
    return sorted(outputs, key=lambda o: o.result["rank"])


def fit_independent(
    frame: Any, plans: Sequence[TrainingPlan], validation: tuple[np.ndarray, np.ndarray] | None,
    timeout_s: float, checkpoint_dir: str | None = None,
    tensorboard_dirs: Sequence[str | None] | None = None,
) -> list[WorkerOutput]:
    """Train each plan as its own Spark task (one job, ``len(plans)`` tasks) on all of ``frame``
    (columns :data:`SHARD_COLUMNS`).

    Returns the outputs in the order of ``plans``. ``checkpoint_dir``: where each task keeps
    its epoch state (see the module doc); ``None``: none. ``tensorboard_dirs``: per plan, where
    its task's Keras ``TensorBoard`` callback writes (``None``: none).

    Raises:
        TrainingWorkerError: a task failed.
    """
    from pyspark.sql import functions as F

    spark = frame.sparkSession
    shape = tuple(plans[0].spec.input_shape)
    val_npz = _npz_bytes(validation) if validation else None
    boards = tensorboard_dirs or [None] * len(plans)
    jobs = {i: (plan.to_json(), Path(plan.start_model).read_bytes() if plan.start_model
                else None, board) for i, (plan, board) in enumerate(zip(plans, boards,
                                                                        strict=True))}
    kill = spark.conf.get(KILL_CONF, None)
    _kill_plan(kill, -1, None)  # a bad value fails here, on the driver

    def task(batches: Iterator[Any]) -> Iterator[Any]:
        import pyarrow as pa
        from pyspark import TaskContext

        from pipelines.ml.datasets import decode_batch

        cpus = TaskContext.get().cpus()
        for index, batch_list in _by_plan(batches):
            images, labels = _decode_all(iter(batch_list), shape, decode_batch,
                                         f"training rows of model {index}")
            del batch_list
            plan_json, start, board = jobs[index]
            work = Path(tempfile.mkdtemp(prefix=f"pipelines-train-model{index}-"))
            try:
                np.savez(work / "train.npz", x=images, y=labels)
                del images
                folder = _checkpoint_folder(checkpoint_dir, f"model{index}", plan_json,
                                            [(len(labels), _label_counts(labels))])
                job = _job(plan_json, "single", index, 1, cpus, timeout_s, kill, start,
                           val_npz, work, folder, board, reports)
                (work / "job.json").write_text(json.dumps(job))
                out = _run_child(work, {}, f"training task for model {index} of {count}",
                                 reports)
            finally:
                _remove(work)
            yield pa.RecordBatch.from_pylist([out], schema=_arrow_schema())

    count = len(plans)
    numbered = frame.select(*SHARD_COLUMNS).withColumn(_ROW_COLUMN,
                                                       F.monotonically_increasing_id())
    plan_ids = spark.range(0, count, 1, count).withColumnRenamed("id", _PLAN_COLUMN)
    # Range partitioning on K distinct plan numbers gives each plan its own task; a task that
    # still gets two (it cannot, short of Spark changing its sampling) trains them in turn.
    copies = (plan_ids.crossJoin(numbered).repartitionByRange(count, _PLAN_COLUMN)
              .sortWithinPartitions(_PLAN_COLUMN, _ROW_COLUMN))
    try:
        with EpochReports(spark, [f"model {i} of {count}" for i in range(count)],
                          [p.epochs for p in plans]) as listener:
            reports = listener.address  # read by ``task`` when mapInArrow pickles it
            rows = copies.mapInArrow(task, _RESULT_SCHEMA).collect()
    except Exception as exc:
        raise TrainingWorkerError(
            f"training {count} models as Spark tasks failed: {_cause(exc)}") from exc
    by_index = {r["rank"]: WorkerOutput(r["model"], json.loads(r["result"])) for r in rows}
    missing = sorted(set(range(count)) - set(by_index))
    if missing:
        raise TrainingWorkerError(f"models {missing} got no training rows. Received "
                                  f"{frame.count()} rows")
    return [by_index[i] for i in range(count)]


def _npz_bytes(arrays: tuple[np.ndarray, np.ndarray]) -> bytes:
    """(images, labels) as the bytes of an ``.npz`` file, to travel with a task's function."""
    buffer = io.BytesIO()
    np.savez(buffer, x=arrays[0], y=arrays[1])
    return buffer.getvalue()


def _arrow_schema() -> Any:
    import pyarrow as pa

    return pa.schema([("rank", pa.int32()), ("result", pa.string()), ("model", pa.binary())])


def _cause(exc: BaseException) -> str:
    """The most telling line of a Spark job failure: our worker error when there is one."""
    text = str(exc)
    for marker in ("TrainingWorkerError: ", "ValueError: "):
        if marker in text:
            line = text.split(marker, 1)[1]
            return marker + line.split("\n\tat ", 1)[0].strip()[:4000]
    return f"{type(exc).__name__}: {text[:2000]}"


# --------------------------------------------------------------------------- task side


def _by_plan(batches: Iterator[Any]) -> Iterator[tuple[int, list[Any]]]:
    """Arrow batches sorted by :data:`_PLAN_COLUMN` -> (plan number, its batches), in turn."""
    current, held = None, []
    for batch in batches:
        plans = batch.column(_PLAN_COLUMN).to_numpy()
        for value in np.unique(plans):  # sorted, as the rows are
            part = batch.filter(plans == value)
            if current is not None and value != current:
                yield current, held
                held = []
            current = int(value)
            held.append(part)
    if current is not None:
        yield current, held


def _decode_all(batches: Iterator[Any], shape: tuple[int, int, int], decode, where: str
                ) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for batch in batches:
        if batch.num_rows:
            x, y = decode(batch, shape, where)
            images.append(np.array(x))
            labels.append(np.array(y))
    if not images:
        return np.empty((0, *shape), np.uint8), np.empty(0, np.int32)
    return np.concatenate(images), np.concatenate(labels)


def _label_counts(labels: np.ndarray) -> list[int]:
    return np.bincount(labels.astype(np.int64)).tolist() if len(labels) else []


def _checkpoint_folder(checkpoint_dir: str | None, name: str, plan_json: str,
                       shards: Sequence[tuple[int, list[int]]]) -> Path | None:
    """``<checkpoint_dir>/<name>-<key>``, the key a digest of what the checkpoint belongs to:
    the plan and each shard's rows per label; ``None`` without a ``checkpoint_dir``."""
    if not checkpoint_dir:
        return None
    text = json.dumps({"plan": json.loads(plan_json), "shards": [list(s) for s in shards]},
                      sort_keys=True)
    return Path(checkpoint_dir) / f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def _job(plan_json: str, mode: str, rank: int, workers: int, cpus: int, timeout_s: float,
         kill: str | None, start: bytes | None, val_npz: bytes | None, work: Path,
         checkpoint: Path | None, tensorboard: str | None,
         reports: dict[str, Any] | None) -> dict[str, Any]:
    plan = json.loads(plan_json)
    if start is not None:
        (work / "start.keras").write_bytes(start)
        plan["start_model"] = str(work / "start.keras")
    if val_npz is not None:
        (work / "validation.npz").write_bytes(val_npz)
    return {
        "plan": json.dumps(plan), "mode": mode, "rank": rank, "num_workers": workers,
        "threads": max(1, int(cpus)), "timeout_s": timeout_s, "cores": None,
        **_kill_plan(kill, rank, checkpoint),
        "checkpoint": str(checkpoint) if checkpoint else None,
        "tensorboard": tensorboard, "reports": reports,
        "train": str(work / "train.npz"),
        "validation": str(work / "validation.npz") if val_npz is not None else None,
        "started": time.time(), "host": socket.gethostname(), "pid": os.getpid(),
    }


def _kill_plan(spec: str | None, rank: int, checkpoint: Path | None) -> dict[str, Any]:
    """``kill_step`` (the step before which :data:`KILL_CONF` kills this worker, or None) and
    ``kill_marker`` (the file a ``once`` kill leaves behind in the checkpoint folder)."""
    parts = (spec or "").split(":")
    if not spec or len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "once") \
            or not all(p.isdigit() for p in parts[:2]):
        if spec:
            raise ValueError(f"{KILL_CONF} must be '<rank>:<step>' or '<rank>:<step>:once'. "
                             f"Received: {spec!r}")
        return {"kill_step": None, "kill_marker": None}
    target, step = int(parts[0]), int(parts[1])
    marker = checkpoint / f".killed-{rank}-{step}" if len(parts) == 3 and checkpoint else None
    if target != rank or (marker is not None and marker.exists()):
        return {"kill_step": None, "kill_marker": None}
    return {"kill_step": step, "kill_marker": str(marker) if marker else None}


def _die(job: dict[str, Any]) -> None:
    """The test hook's ``kill -9``: exit 137 at once (after leaving a ``once`` marker)."""
    if job["kill_marker"]:
        Path(job["kill_marker"]).parent.mkdir(parents=True, exist_ok=True)
        Path(job["kill_marker"]).touch()
    os._exit(137)


def bind_mode(value: str) -> str:
    """The :data:`BIND_CORES_CONF` value, checked."""
    mode = str(value).strip().lower()
    if mode not in _BIND_MODES:
        raise ValueError(f"{BIND_CORES_CONF} must be one of {', '.join(_BIND_MODES)}. "
                         f"Received: {value!r}")
    return mode


def worker_cores(mode: str, rank: int, hosts: Sequence[str], cpus: int,
                 allowed: Sequence[int]) -> list[int] | None:
    """The CPUs worker ``rank`` binds to, or ``None`` to leave it unbound.

    ``hosts`` is each worker's host, by rank; the workers on ``rank``'s host take consecutive
    slices of ``cpus`` CPUs from ``allowed`` (the process's CPUs), in rank order.
    """
    local = [r for r, host in enumerate(hosts) if host == hosts[rank]]
    if mode == "never" or (mode == "auto" and len(local) < 2) or not allowed:
        return None
    if len(local) * cpus > len(allowed):
        logger.warning("not binding training worker %s to cores: %s workers x %s CPUs on its "
                       "host, %s CPUs available", rank, len(local), cpus, len(allowed))
        return None
    start = local.index(rank) * cpus
    return list(allowed[start:start + cpus])


def _allowed_cpus() -> list[int]:
    if not hasattr(os, "sched_getaffinity"):  # not Linux: no binding
        return []
    return sorted(os.sched_getaffinity(0))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the collective timeout still ends it
        pass


def _run_child(work: Path, env: dict[str, str], label: str,
               reports: dict[str, Any] | None) -> dict[str, Any]:
    """Run the training process for ``work``; its result, or a :class:`TrainingWorkerError`.

    ``reports``: the fit's :attr:`EpochReports.address` (None: no listener).
    """
    environment = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    environment.update(env)
    environment.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    log = work / "worker.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "pipelines.ml.distributed", str(work)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=environment,
                                preexec_fn=_die_with_parent)
        for line in proc.stdout:  # until the child exits (or dies)
            sink.write(line)
            if _relayed(line, reports):
                sys.stderr.write(f"[{label}] {line.decode(errors='replace')}")
                sys.stderr.flush()
        code = proc.wait()
    if code != 0:
        tail = log.read_bytes()[-_LOG_TAIL:].decode(errors="replace")
        raise TrainingWorkerError(
            f"{label} exited with code {code}"
            f"{' (killed)' if code in (137, -9) else ''}; the end of its log:\n{tail}")
    model = work / "model.keras"
    return {"rank": json.loads((work / "result.json").read_text())["rank"],
            "result": (work / "result.json").read_text(),
            "model": model.read_bytes() if model.exists() else None}


#: The training process's log lines, as :func:`_relayed` reads them.
_CHILD_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_EPOCH_MARK = f" {epoch_logger.name}: ".encode()  # an epoch line, in that format


def _relayed(line: bytes, reports: dict[str, Any] | None) -> bool:
    """Whether a training process's log line also goes to the task's stderr.

    Our own lines (epochs, progress) do: the executor log, the console in local mode;
    TensorFlow's chatter stays in the process's file. Epoch lines do not when the driver logs
    them on that same console (local mode with a listener), so each epoch shows once there.
    """
    if b" pipelines." not in line:
        return False
    return not (reports and reports.get("console") and _EPOCH_MARK in line)


def _remove(work: Path) -> None:
    import shutil

    shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------- training process


def weights_digest(weights: Sequence[np.ndarray]) -> str:
    """SHA-256 of every weight array's bytes, in order (equal digests: equal models)."""
    digest = hashlib.sha256()
    for array in weights:
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _worker_main(work: Path) -> None:
    job = json.loads((work / "job.json").read_text())
    if job["cores"]:  # before TensorFlow starts its thread pools, which inherit it
        os.sched_setaffinity(0, job["cores"])
    import tensorflow as tf

    threads = job["threads"]
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    # Collectives need an inter-op thread of their own beside the step's ops.
    tf.config.threading.set_inter_op_parallelism_threads(threads + 1)
    plan = TrainingPlan.from_json(job["plan"])
    with np.load(job["train"]) as data:
        train = (data["x"], data["y"])
    validation = None
    if job["validation"]:
        with np.load(job["validation"]) as data:
            validation = (data["x"], data["y"])
    started = time.time()
    if job["mode"] == "single":
        result = _train_single(plan, train, validation, work, job)
    else:
        result = _train_multi(plan, train, validation, work, job)
    result.update(rank=job["rank"], threads=threads, cores=job["cores"], host=job["host"],
                  pid=os.getpid(), task_started=job["started"], started=started,
                  ended=time.time(), rows=len(train[1]))
    (work / "result.json").write_text(json.dumps(result))


def _train_single(plan: TrainingPlan, train: tuple[np.ndarray, np.ndarray],
                  validation: tuple[np.ndarray, np.ndarray] | None, work: Path,
                  job: dict[str, Any]) -> dict[str, Any]:
    from pipelines.ml.datasets import array_dataset
    from pipelines.ml.models import steps
    from pipelines.ml.training import prepare_work_dir, train_model

    callbacks = [epoch_sender(job["reports"], job["rank"])]
    if job["kill_step"]:
        callbacks.append(_kill_callback(job))
    train_ds = array_dataset(*train, plan.batch_size, plan.num_classes, plan.seed,
                             plan.spec.shift_pixels, plan.spec.elastic_distortion)
    val_ds = array_dataset(*validation, plan.batch_size, plan.num_classes) if validation else None
    state = Path(job["checkpoint"]) if job["checkpoint"] else work / "state"
    resumed = prepare_work_dir(state, "single", resume=bool(job["checkpoint"]))
    board = Path(job["tensorboard"]) if job["tensorboard"] else None
    result = train_model(plan, train_ds, val_ds, steps(len(train[1]), plan.batch_size), state,
                         tensorboard=board, resumed_from_epoch=resumed,
                         extra_callbacks=callbacks)
    result.model.save(work / "model.keras")
    if job["checkpoint"]:
        _remove(state)
    return {"history": result.history, "best_epoch": result.best_epoch,
            "fit_seconds": result.fit_seconds, "epoch_seconds": result.epoch_seconds,
            "digest": weights_digest(result.model.get_weights()), "workers": 1,
            "resumed_from_epoch": resumed}


def _kill_callback(job: dict[str, Any]) -> Any:
    import keras

    step = job["kill_step"]

    class Kill(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.step = 0

        def on_train_batch_begin(self, batch, logs=None):
            self.step += 1
            if self.step == step:
                _die(job)

    return Kill()


def _per_example_loss(spec_loss: Any) -> Any:
    import keras

    loss = keras.losses.get(spec_loss)
    if isinstance(loss, keras.losses.Loss):
        return loss.call  # the unreduced per-example values
    return loss


def _train_multi(plan: TrainingPlan, train: tuple[np.ndarray, np.ndarray],
                 validation: tuple[np.ndarray, np.ndarray] | None, work: Path,
                 job: dict[str, Any]) -> dict[str, Any]:
    import tensorflow as tf

    from pipelines.ml.datasets import array_dataset
    from pipelines.ml.training import EpochScalars, build_model, seed_everything

    rank, workers = job["rank"], job["num_workers"]
    steps_per_epoch = job["steps_per_epoch"]
    folder = Path(job["checkpoint"]) if job["checkpoint"] else None
    saved = _load_checkpoint(folder) if folder else None
    start_epoch = saved["epoch"] if saved else 0
    # One all-reduce per step for all the gradients (bytes_per_pack), not one per variable:
    # each collective costs gRPC round trips, which dominated the step of a small model.
    options = tf.distribute.experimental.CommunicationOptions(
        bytes_per_pack=_GRADIENT_PACK_BYTES,
        implementation=tf.distribute.experimental.CommunicationImplementation.RING,
        timeout_seconds=float(job["timeout_s"]))
    strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    seed_everything(plan)
    with strategy.scope():
        model = build_model(plan, steps_per_epoch)
    # Outside the strategy, uncompiled (its optimizer never ran): validation and saving.
    twin = build_model(plan, steps_per_epoch, compile=False)
    optimizer = model.optimizer
    if saved:
        with strategy.scope():
            optimizer.build(model.trainable_variables)
        model.set_weights(saved["weights"])
        for variable, value in zip(optimizer.variables, saved["optimizer"], strict=True):
            variable.assign(value)
    loss_fn = _per_example_loss(plan.spec.loss)
    global_batch = plan.batch_size
    kill_step = job["kill_step"]
    # A resumed fit draws a new data order rather than repeating the first epochs' one.
    data_seed = plan.seed * 1009 + rank + 7919 * start_epoch

    def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        local = context.get_per_replica_batch_size(global_batch)
        return array_dataset(*train, local, plan.num_classes, data_seed,
                             plan.spec.shift_pixels,
                             plan.spec.elastic_distortion).repeat()

    iterator = iter(strategy.distribute_datasets_from_function(dataset_fn))

    @tf.function
    def train_step(it):
        def step(images, labels):
            with tf.GradientTape() as tape:
                probs = model(images, training=True)
                per_example = loss_fn(labels, probs)
                loss = tf.nn.compute_average_loss(per_example)
                if model.losses:
                    loss += tf.nn.scale_regularization_loss(tf.add_n(model.losses))
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
            hits = tf.equal(tf.argmax(labels, axis=1), tf.argmax(probs, axis=1))
            return (tf.reduce_sum(per_example), tf.reduce_sum(tf.cast(hits, tf.float32)),
                    tf.cast(tf.shape(labels)[0], tf.float32))

        images, labels = next(it)
        totals = strategy.run(step, args=(images, labels))
        # This worker's sums only: summed over the workers once per epoch (global_sum), not
        # with three more collectives every step.
        return tf.stack([strategy.experimental_local_results(t)[0] for t in totals])

    # Batch-norm moving statistics are updated by each worker from its own batches. Their
    # update is linear, so averaging them over the workers at each epoch end gives exactly the
    # moving average of the workers' mean batch statistics, and identical models everywhere.
    state = [v for v in model.non_trainable_variables if v.dtype in ("float32", "float64")]

    @tf.function
    def sync_state():
        def average():
            context = tf.distribute.get_replica_context()
            means = context.all_reduce(tf.distribute.ReduceOp.MEAN,
                                       [tf.identity(v.value) for v in state])
            for variable, mean in zip(state, means, strict=True):
                variable.assign(mean)

        strategy.run(average)

    @tf.function
    def global_sum(values):
        per_replica = strategy.run(lambda: tf.identity(values))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    monitor = plan.monitor if validation is not None else "loss"
    pick_min = "loss" in monitor
    if folder:  # every worker, so that one which sees no checkpoint takes part too
        agreed = float(global_sum(tf.constant(float(start_epoch))))
        if agreed != start_epoch * workers:
            raise RuntimeError(
                f"the workers read different checkpoints from {folder} (is it a folder every "
                f"executor shares?): their epochs sum to {agreed:g}, this worker's is "
                f"{start_epoch}")
    if saved:
        logger.info("worker %s resumes from epoch %s (%s)", rank, start_epoch, folder)
        history, epoch_seconds = saved["history"], saved["epoch_seconds"]
        best_value, best_epoch, waited = saved["best_value"], saved["best_epoch"], saved["waited"]
        best_weights, step_count = saved["best"], saved["steps"]
    else:
        history: dict[str, list[float]] = {"loss": [], "top1": []}
        epoch_seconds: list[float] = []
        best_value, best_weights, best_epoch, waited = None, None, None, 0
        step_count = 0
    scalars = EpochScalars(Path(job["tensorboard"])) if job["tensorboard"] else None
    fit_started = time.perf_counter()
    for epoch in range(start_epoch, plan.epochs):
        epoch_started = time.perf_counter()
        local = tf.zeros(3)
        for _ in range(steps_per_epoch):
            step_count += 1
            if step_count == kill_step:
                _die(job)
            local += train_step(iterator)
        sums = global_sum(local).numpy().astype(float)
        if state:
            sync_state()
        epoch_seconds.append(time.perf_counter() - epoch_started)
        history["loss"].append(sums[0] / sums[2])
        history["top1"].append(sums[1] / sums[2])
        weights = model.get_weights()
        if validation is not None:
            twin.set_weights(weights)
            for key, value in _evaluate(twin, loss_fn, validation, plan).items():
                history.setdefault(f"val_{key}", []).append(value)
        value = history[monitor][-1]
        improved = best_value is None or (value < best_value if pick_min else value > best_value)
        if improved:
            best_value, best_weights, best_epoch, waited = value, weights, epoch + 1, 0
        else:
            waited += 1
        last = {k: v[-1] for k, v in history.items()}
        epoch_logger.info("worker %s epoch %s: %s (%.1fs)", rank, epoch + 1,
                          {k: round(v, 4) for k, v in last.items()}, epoch_seconds[-1])
        send_epoch(job["reports"], 0, epoch + 1, epoch_seconds[-1], last)
        if scalars:
            scalars.write(epoch, last)
        if folder and rank == 0:
            _save_checkpoint(folder, weights, [v.numpy() for v in optimizer.variables],
                             best_weights, {
                                 "epoch": epoch + 1, "steps": step_count, "history": history,
                                 "epoch_seconds": epoch_seconds, "best_value": best_value,
                                 "best_epoch": best_epoch, "waited": waited})
        stop = plan.patience is not None and waited >= plan.patience
        if float(global_sum(tf.constant(1.0 if stop else 0.0))) > 0:
            break
    fit_seconds = time.perf_counter() - fit_started
    if scalars:
        scalars.close()
    final_digest = weights_digest(model.get_weights())
    if rank == 0:
        twin.set_weights(best_weights)
        twin.save(work / "model.keras")
        if folder:
            _remove(folder)
    return {"history": history, "best_epoch": best_epoch, "fit_seconds": fit_seconds,
            "epoch_seconds": epoch_seconds, "digest": final_digest, "workers": workers,
            "steps_per_epoch": steps_per_epoch, "resumed_from_epoch": start_epoch or None}


_CHECKPOINT = "state.npz"


def _save_checkpoint(folder: Path, weights: Sequence[np.ndarray],
                     optimizer: Sequence[np.ndarray], best: Sequence[np.ndarray],
                     meta: dict[str, Any]) -> None:
    """One ``.npz`` with the arrays and ``meta`` as JSON, replacing the last atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {f"{prefix}_{i:05d}": np.asarray(value)
              for prefix, values in (("weight", weights), ("optimizer", optimizer),
                                     ("best", best))
              for i, value in enumerate(values)}
    meta_bytes = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    partial = folder / f".{_CHECKPOINT}.tmp-{os.getpid()}"
    with partial.open("wb") as sink:
        np.savez(sink, meta=meta_bytes, **arrays)
        sink.flush()
        os.fsync(sink.fileno())
    os.replace(partial, folder / _CHECKPOINT)


def _load_checkpoint(folder: Path) -> dict[str, Any] | None:
    """What :func:`_save_checkpoint` wrote (meta keys + weights, optimizer, best), or None."""
    path = folder / _CHECKPOINT
    if not path.exists():
        return None
    with np.load(path) as data:
        names = sorted(data.files)
        saved = json.loads(data["meta"].tobytes())
        for prefix, key in (("weight", "weights"), ("optimizer", "optimizer"), ("best", "best")):
            saved[key] = [data[n] for n in names if n.startswith(prefix + "_")]
    return saved


def _evaluate(model: Any, loss_fn: Any, data: tuple[np.ndarray, np.ndarray],
              plan: TrainingPlan) -> dict[str, float]:
    """Mean loss and top-1 of a plain (non-distributed) model over in-memory images."""
    import tensorflow as tf

    from pipelines.ml.datasets import array_dataset

    predict = tf.function(lambda x: model(x, training=False))
    loss_sum, hits, count = 0.0, 0.0, 0
    for images, onehot in array_dataset(*data, plan.batch_size, plan.num_classes):
        probs = predict(images)
        loss_sum += float(tf.reduce_sum(loss_fn(onehot, probs)))
        hits += float(tf.reduce_sum(tf.cast(
            tf.equal(tf.argmax(onehot, axis=1), tf.argmax(probs, axis=1)), tf.float32)))
        count += int(onehot.shape[0])
    return {"loss": loss_sum / count, "top1": hits / count}


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format=_CHILD_LOG_FORMAT)
    _worker_main(Path(sys.argv[1]))
