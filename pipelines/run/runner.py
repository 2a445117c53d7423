"""The pipeline run: every stage in order, from one config, in one SparkSession, re-runnable.

The stages are a table (:data:`STAGES`) of stage functions: adding a stage is adding a row. A
run walks the selected rows in order. A stage whose manifest (:mod:`pipelines.run.manifest`)
still matches (same digest of the config sections it reads, same input content, outputs
unchanged) is skipped; any other stage runs. What a stage depends on follows the config: its
input paths (``cnn.inputs``, ...) are fingerprinted by content, and the stage that wrote a path
is its upstream, so a stage is redone when what it actually reads changed, not whenever an
earlier stage ran. A stage's old manifest is
deleted before it starts and the new one written only after it returned, so a stage that failed
or was killed is redone by the next run. A failure stops the run:
:class:`~pipelines.run.cli.StageFailed`, exit 1.

One run at a time per output root (:mod:`pipelines.run.state`): the run holds ``pipeline.lock``
and beats a heartbeat; a second run exits with :data:`~pipelines.run.cli.EXIT_LOCKED` before it
writes anything.

Progress goes to the log (``stage 3/8 export: skipped (up to date)``) and to the run summary
``pipeline.run_summary`` (default ``{output_root}/run.json``), rewritten after every stage and
at every heartbeat.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from functools import partial
from typing import Any, NamedTuple

from pyspark.sql import SparkSession

from pipelines.config import Config, ConfigError
from pipelines.faults import maybe_fail
from pipelines.io.digest import sha256_json
from pipelines.io.storage import Storage
from pipelines.run.cli import StageFailed
from pipelines.run.manifest import (
    ManifestStore,
    build_manifest,
    content_fingerprint,
    fingerprint,
    stale_reason,
    utc_now,
)
from pipelines.run.progress import label as progress_label
from pipelines.run.report import run_report, stamp_run_status
from pipelines.run.state import Heartbeat, RunLock, holder_identity
from pipelines.run.tracking import Tracking, call_stage
from pipelines.stages.augment import run_augment
from pipelines.stages.export import run_export
from pipelines.stages.ingest import run_ingest
from pipelines.stages.score import run_score
from pipelines.stages.train_cnn import run_train_cnn
from pipelines.stages.transfer import run_transfer
from pipelines.stages.visualize import run_visualize

logger = logging.getLogger(__name__)


class StageSpec(NamedTuple):
    """One row of the stage table."""

    #: Name used by ``--only``/``--from``, the manifest file and the logs.
    name: str
    #: The stage: ``run(spark, config) -> dict`` (a JSON-able summary).
    run: Callable[[SparkSession, Config], Any]
    #: Config sections the stage reads: a change in any of them makes it run again.
    sections: tuple[str, ...]
    #: Stages it reads whatever the config says (the report reads every manifest); the stages
    #: whose outputs its input paths point into are found from the config (:func:`reads`).
    upstream: tuple[str, ...] = ()
    #: Config keys (``section.key``) holding input paths, fingerprinted by content.
    inputs: tuple[str, ...] = ()
    #: Config keys holding the stage's output paths; all must still exist to skip the stage.
    outputs: tuple[str, ...] = ()


#: The pipeline, in run order: (name, stage function, config sections, fixed upstream stages,
#: input path keys, output path keys). Which stage wrote an input path is found from the config
#: (``cnn.inputs`` naming ``{output_root}/augmented/parquet`` makes augment an upstream of
#: train_cnn); only the report, which reads every manifest, lists fixed upstream stages.
STAGES: tuple[StageSpec, ...] = (
    StageSpec("ingest", run_ingest, ("mnist", "ingest"), (),
              ("ingest.folder", "mnist.local_dir"), ("ingest.output",)),
    StageSpec("visualize", run_visualize, ("visualize",), (),
              ("visualize.input",), ("visualize.output",)),
    StageSpec("export", run_export, ("export",), (),
              ("export.input",), ("export.output",)),
    StageSpec("augment", run_augment, ("augment",), (),
              ("augment.input",), ("augment.output",)),
    StageSpec("transfer", run_transfer, ("transfer",), (),
              ("transfer.input",), ("transfer.output",)),
    StageSpec("train_cnn", run_train_cnn, ("cnn",), (),
              ("cnn.inputs",), ("cnn.output",)),
    StageSpec("score", run_score, ("score",), (),
              ("score.input", "score.model"), ("score.output",)),
    StageSpec("report", run_report, ("report",),
              ("ingest", "visualize", "export", "augment", "transfer", "train_cnn", "score"),
              (), ("report.output",)),
)


class Plan(NamedTuple):
    """What a run will consider: the selected stages in order, and whether to redo them all."""

    stages: tuple[StageSpec, ...]
    force: bool = False


def add_pipeline_arguments(parser: argparse.ArgumentParser) -> None:
    """The pipeline run's own options (see :func:`pipelines.run.cli.run_job`)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--only", action="append", default=[], metavar="STAGE[,STAGE]",
                       help="run only these stages (repeatable or comma-separated)")
    group.add_argument("--from", dest="from_stage", default=None, metavar="STAGE",
                       help="run this stage and every stage after it")
    parser.add_argument("--force", action="store_true",
                        help="redo the selected stages even when their manifests match")


def pipeline_job(config: Config, args: argparse.Namespace) -> Callable[[SparkSession, Config], Any]:
    """Check the selection before Spark starts; return the stage function of the whole run."""
    only = [name.strip() for item in args.only for name in item.split(",") if name.strip()]
    plan = make_plan(config, only=only, from_stage=args.from_stage, force=args.force)
    return partial(run_pipeline, plan=plan)


def make_plan(
    config: Config, *, only: Sequence[str] = (), from_stage: str | None = None,
    force: bool = False, registry: Sequence[StageSpec] = STAGES,
) -> Plan:
    """Select stages from the registry; bad names and unusable rows raise :class:`ConfigError`."""
    names = [spec.name for spec in registry]
    named = list(only) + ([from_stage] if from_stage else [])
    unknown = [name for name in named + list(config.pipeline.stages or []) if name not in names]
    if unknown:
        raise ConfigError(
            f"unknown stage name(s) {unknown}; expected some of {names}. Received: {unknown!r}"
        )
    if only:
        selected = [spec for spec in registry if spec.name in only]
    elif from_stage:
        selected = list(registry[names.index(from_stage):])
    else:
        wanted = config.pipeline.stages or names
        selected = [spec for spec in registry if spec.name in wanted]
        if not config.pipeline.report:
            selected = [spec for spec in selected if spec.name != "report"]
    for spec in selected:
        _check_config_keys(config, spec)
    return Plan(tuple(selected), force)


def entry_name(spec: StageSpec) -> str:
    """``module:function`` of the stage, as manifests record it."""
    return f"{spec.run.__module__}:{spec.run.__qualname__}"


def config_value(config: Config, key: str) -> Any:
    """The value at ``section.key`` (KeyError naming the key when there is none)."""
    value: Any = config
    for part in key.split("."):
        if not hasattr(value, part):
            raise KeyError(key)
        value = getattr(value, part)
    return value


def run_pipeline(
    spark: SparkSession, config: Config, plan: Plan | None = None,
    registry: Sequence[StageSpec] = STAGES,
) -> dict[str, Any]:
    """Run the planned stages in order; returns the run summary (also written as JSON).

    Raises:
        RunLocked: another live run holds the output root's lock; nothing was written.
        StageFailed: a stage raised; the run stopped there (its cause is logged and chained).
    """
    plan = plan or make_plan(config, registry=registry)
    storage = Storage(spark)
    pipeline = config.pipeline
    run_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:6]
    holder = holder_identity(run_id, utc_now())
    lock = RunLock(storage, pipeline.lock, holder, stale_after_s=pipeline.stale_after_s,
                   wait_s=pipeline.lock_wait_s).acquire()  # before anything is written
    try:
        run = {
            **holder,
            "status": "running",
            "heartbeat_at": holder["started_at"],
            "heartbeat_s": pipeline.heartbeat_s,
            "stale_after_s": pipeline.stale_after_s,
            "output_root": config.output_root,
            "selected": [spec.name for spec in plan.stages],
            "force": plan.force,
            "stages": [],
        }
        if lock.took_over is not None:
            run["previous_run"] = {"run_id": lock.took_over.get("run_id"), "status": "stale",
                                   "reason": lock.took_over["stale_reason"]}
        summary = RunSummary(storage, pipeline.run_summary, run)

        def beat() -> None:
            lock.touch()
            summary.update(heartbeat_at=utc_now())

        with Heartbeat(beat, pipeline.heartbeat_s):
            return _run_stages(spark, config, plan, registry, storage, summary)
    finally:
        lock.release()


class RunSummary:
    """The run summary JSON, rewritten by the stage loop and the heartbeat thread in turn."""

    def __init__(self, storage: Storage, path: str, run: dict[str, Any]):
        self.storage, self.path, self.run = storage, path, run
        self._lock = threading.Lock()

    def update(self, **fields: Any) -> None:
        with self._lock:
            self.run.update(fields)
            text = json.dumps(self.run, indent=2, default=str) + "\n"
            self.storage.write_text(self.path, text)


def _run_stages(
    spark: SparkSession, config: Config, plan: Plan, registry: Sequence[StageSpec],
    storage: Storage, summary: RunSummary,
) -> dict[str, Any]:
    run = summary.run
    store = ManifestStore(storage, config.pipeline.manifests)
    store.remove_leftovers()
    started = time.perf_counter()
    digests: dict[str, dict[str, Any]] = {}  # content fingerprints, valid until a stage runs
    tracking = Tracking.start(spark, config, run)
    total = len(plan.stages)
    for index, spec in enumerate(plan.stages, 1):
        label = f"stage {index}/{total} {spec.name}"
        record: dict[str, Any] = {"stage": spec.name}
        run["stages"].append(record)
        record["action"] = "running"
        summary.update()  # what the report stage (and a watcher) sees
        t0 = time.perf_counter()
        try:
            action, reason, manifest = _run_stage(
                spark, config, spec, store, storage, run["run_id"], plan.force, label,
                tracking, registry, digests,
            )
        except Exception as exc:
            seconds = time.perf_counter() - t0
            cause = f"{type(exc).__name__}: {exc}"
            logger.exception("%s: failed after %.1f s: %s", label, seconds, cause)
            record.update(action="failed", reason=cause, seconds=round(seconds, 3))
            _finish(summary, config, "failed", started, tracking)
            raise StageFailed(f"stage {spec.name!r} failed: {cause}") from exc
        record.update(action=action, reason=reason, seconds=round(time.perf_counter() - t0, 3),
                      stage_seconds=manifest.get("seconds"), counts=manifest.get("counts", {}))
    _finish(summary, config, "succeeded", started, tracking)
    ran = sum(1 for r in run["stages"] if r.get("action") == "ran")
    skipped = sum(1 for r in run["stages"] if r.get("action") == "skipped")
    logger.info("pipeline finished in %.1f s: %d ran, %d up to date; run summary %s",
                run["seconds"], ran, skipped, config.pipeline.run_summary)
    return run


def _run_stage(
    spark: SparkSession, config: Config, spec: StageSpec, store: ManifestStore,
    storage: Storage, run_id: str, force: bool, label: str, tracking: Tracking,
    registry: Sequence[StageSpec] = STAGES, digests: dict[str, dict[str, Any]] | None = None,
) -> tuple[str, str, dict[str, Any]]:
    config_digest = config.digest(*spec.sections)
    inputs = stage_inputs(config, spec, store, storage, registry, digests)
    input_fp = sha256_json(inputs)
    outputs_now = {key: fingerprint(storage, path) for key, path in _paths(config, spec.outputs)}
    manifest = store.read(spec.name)
    if force:
        reason = "forced"
    else:
        reason = stale_reason(manifest, config_digest, input_fp, outputs_now)
        if reason == "input changed":
            reason = _input_change(manifest.get("inputs", {}), inputs)
    if reason is None:
        logger.info("%s: skipped (up to date, finished %s)", label, manifest.get("finished_at"))
        return "skipped", "up to date", manifest
    logger.info("%s: running (%s)", label, reason)
    store.delete(spec.name)  # from here on, a crash leaves no manifest: the next run redoes it
    if digests is not None:
        digests.clear()  # the stage may rewrite what later stages read
    maybe_fail(f"runner.{spec.name}.start")
    started_at, t0 = utc_now(), time.perf_counter()
    with progress_label(spec.name), tracking.stage(spec.name, spec.sections) as tracker:
        summary = call_stage(spec.run, spark, config, tracker)
    seconds = time.perf_counter() - t0
    maybe_fail(f"runner.{spec.name}.finish")
    spark.catalog.clearCache()
    outputs = {key: fingerprint(storage, path) for key, path in _paths(config, spec.outputs)}
    absent = [f"{key}={fp['path']!r}" for key, fp in outputs.items() if not fp["exists"]]
    if absent:
        raise RuntimeError(f"stage {spec.name!r} returned but wrote no output at {absent}")
    manifest = store.write(build_manifest(
        stage=spec.name, entry=entry_name(spec), run_id=run_id, sections=list(spec.sections),
        config_digest=config_digest, inputs=inputs, outputs=outputs, summary=summary,
        started_at=started_at, seconds=seconds, spark_version=spark.version,
    ))
    logger.info("%s: done in %.1f s %s", label, seconds, manifest["counts"] or "")
    return "ran", reason, manifest


def reads(config: Config, spec: StageSpec,
          registry: Sequence[StageSpec] = STAGES) -> dict[str, str | None]:
    """For each input path of ``spec`` (``key`` or ``key[i]``): the earlier stage that writes
    it (its output path holds the input path, or the other way round), or None."""
    earlier = list(registry[:[s.name for s in registry].index(spec.name)]) if spec in registry \
        else list(registry)
    found: dict[str, str | None] = {}
    for key, path in _paths(config, spec.inputs):
        found[key] = None
        for other in reversed(earlier):  # the latest writer of a path is the one read
            if any(_contains(out, path) or _contains(path, out)
                   for _, out in _paths(config, other.outputs)):
                found[key] = other.name
                break
    return found


def upstream_of(config: Config, spec: StageSpec,
                registry: Sequence[StageSpec] = STAGES) -> tuple[str, ...]:
    """The stages ``spec`` reads in this config: its fixed upstream and the writers of its
    input paths, in registry order."""
    names = set(spec.upstream) | {n for n in reads(config, spec, registry).values() if n}
    return tuple(s.name for s in registry if s.name in names)


def stage_inputs(
    config: Config, spec: StageSpec, store: ManifestStore, storage: Storage,
    registry: Sequence[StageSpec] = STAGES, digests: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """What a stage reads, fingerprinted: the content of its input paths (and which stage wrote
    each), and the manifests of its fixed upstream stages."""
    digests = {} if digests is None else digests
    writers = reads(config, spec, registry)
    paths = {}
    for key, path in _paths(config, spec.inputs):
        if path not in digests:
            digests[path] = content_fingerprint(storage, path)
        paths[key] = {**digests[path], "written_by": writers.get(key)}
    upstream = {}
    for name in spec.upstream:
        manifest = store.read(name)
        upstream[name] = manifest and manifest["digest"]
    return {"paths": paths, "upstream": upstream}


def _input_change(before: dict[str, Any], now: dict[str, Any]) -> str:
    """``input changed: cnn.inputs[1] (written by augment)``: what differs between two inputs."""
    changed = []
    old_paths, new_paths = before.get("paths", {}), now.get("paths", {})
    for key in sorted(set(old_paths) | set(new_paths)):
        if old_paths.get(key) != new_paths.get(key):
            writer = (new_paths.get(key) or old_paths.get(key) or {}).get("written_by")
            changed.append(f"{key} (written by {writer})" if writer else key)
    old_up, new_up = before.get("upstream", {}), now.get("upstream", {})
    changed += [f"{name} manifest" for name in sorted(set(old_up) | set(new_up))
                if old_up.get(name) != new_up.get(name)]
    return f"input changed: {', '.join(changed)}" if changed else "input changed"


def _contains(parent: str, path: str) -> bool:
    parent, path = parent.rstrip("/"), path.rstrip("/")
    return path == parent or path.startswith(parent + "/")


def _paths(config: Config, keys: Iterable[str]) -> list[tuple[str, str]]:
    """(key, path) for the keys whose value is set (None means "not used by this config")."""
    found = []
    for key in keys:
        value = config_value(config, key)
        if isinstance(value, list | tuple):  # e.g. cnn.inputs: one fingerprint per path
            found.extend((f"{key}[{i}]", str(v)) for i, v in enumerate(value) if v is not None)
        elif value is not None:
            found.append((key, str(value)))
    return found


def _check_config_keys(config: Config, spec: StageSpec) -> None:
    fields = set(type(config).model_fields)
    for section in spec.sections:
        if section not in fields:
            raise ConfigError(
                f"stage {spec.name!r} depends on config section {section!r}, which the "
                f"configuration does not have. Received: sections={list(spec.sections)}"
            )
    for key in (*spec.inputs, *spec.outputs):
        try:
            config_value(config, key)
        except KeyError:
            raise ConfigError(
                f"stage {spec.name!r} names config key {key!r} for a path, which the "
                f"configuration does not have. Received: {key!r}"
            ) from None


def _finish(summary: RunSummary, config: Config, status: str, started: float,
            tracking: Tracking) -> None:
    summary.update(status=status, finished_at=utc_now(),
                   seconds=round(time.perf_counter() - started, 3))
    try:
        if stamp_run_status(summary.storage, config, summary.run):
            # The status line is the latest run's, not content of the report stage: record the
            # stamped page as the report's output, or the next run would redo the report.
            store = ManifestStore(summary.storage, config.pipeline.manifests)
            manifest = store.read("report")
            if manifest is not None:
                outputs = {key: fingerprint(summary.storage, fp["path"])
                           for key, fp in manifest.get("outputs", {}).items()}
                store.write({**manifest, "outputs": outputs})
    except Exception as exc:  # the run's own outcome matters more than the page's status line
        logger.warning("could not write the run's status into the report page: %s", exc)
    tracking.finish(summary.run)
