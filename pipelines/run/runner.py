"""The pipeline run: every stage in order, from one config, in one SparkSession, re-runnable.

The stages are a table (:data:`STAGES`) of stage functions: adding a stage is adding a row. A
run walks the selected rows in order. A stage whose manifest (:mod:`pipelines.run.manifest`)
still matches (same digest of the config sections it reads, same inputs, outputs unchanged) is
skipped; any other stage runs, and so does every stage downstream of one that ran. A stage's old
manifest is deleted before it starts and the new one written only after it returned, so a stage
that failed or was killed is redone by the next run. A failure stops the run
(:class:`~pipelines.run.cli.StageFailed`, exit code 1).

Progress goes to the log (``stage 3/8 export: skipped (up to date)``) and to the run summary
``pipeline.run_summary`` (default ``{output_root}/run.json``), rewritten after every stage.
"""

from __future__ import annotations

import argparse
import json
import logging
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
    fingerprint,
    stale_reason,
    utc_now,
)
from pipelines.run.progress import label as progress_label
from pipelines.run.report import run_report
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
    #: Stages whose outputs it reads: when one of them ran, this one runs too.
    upstream: tuple[str, ...] = ()
    #: Config keys (``section.key``) holding input paths; their fingerprint joins the inputs'.
    inputs: tuple[str, ...] = ()
    #: Config keys holding the stage's output paths; all must still exist to skip the stage.
    outputs: tuple[str, ...] = ()


#: The pipeline, in run order.
STAGES: tuple[StageSpec, ...] = (
    StageSpec("ingest", run_ingest, ("mnist", "ingest"), (),
              ("ingest.folder", "mnist.local_dir"), ("ingest.output",)),
    StageSpec("visualize", run_visualize, ("visualize",), ("ingest",),
              ("visualize.input",), ("visualize.output",)),
    StageSpec("export", run_export, ("export",), ("ingest",),
              ("export.input",), ("export.output",)),
    StageSpec("augment", run_augment, ("augment",), ("ingest", "export"),
              ("augment.input",), ("augment.output",)),
    StageSpec("transfer", run_transfer, ("transfer",), ("ingest",),
              ("transfer.input",), ("transfer.output",)),
    StageSpec("train_cnn", run_train_cnn, ("cnn",), ("ingest", "augment"),
              ("cnn.inputs",), ("cnn.output",)),
    StageSpec("score", run_score, ("score",), ("train_cnn",),
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
        StageFailed: a stage raised; the run stopped there (its cause is logged and chained).
    """
    plan = plan or make_plan(config, registry=registry)
    storage = Storage(spark)
    store = ManifestStore(storage, config.pipeline.manifests)
    store.remove_leftovers()
    run = {
        "run_id": datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:6],
        "status": "running",
        "started_at": utc_now(),
        "output_root": config.output_root,
        "selected": [spec.name for spec in plan.stages],
        "force": plan.force,
        "stages": [],
    }
    started = time.perf_counter()
    tracking = Tracking.start(spark, config, run)
    redone: set[str] = set()
    total = len(plan.stages)
    for index, spec in enumerate(plan.stages, 1):
        label = f"stage {index}/{total} {spec.name}"
        record: dict[str, Any] = {"stage": spec.name}
        run["stages"].append(record)
        record["action"] = "running"
        _write_run(storage, config, run)  # what the report stage (and a watcher) sees
        t0 = time.perf_counter()
        try:
            action, reason, manifest = _run_stage(
                spark, config, spec, store, storage, run["run_id"], plan.force, redone, label,
                tracking,
            )
        except Exception as exc:
            seconds = time.perf_counter() - t0
            cause = f"{type(exc).__name__}: {exc}"
            logger.exception("%s: failed after %.1f s: %s", label, seconds, cause)
            record.update(action="failed", reason=cause, seconds=round(seconds, 3))
            _finish(storage, config, run, "failed", started, tracking)
            raise StageFailed(f"stage {spec.name!r} failed: {cause}") from exc
        record.update(action=action, reason=reason, seconds=round(time.perf_counter() - t0, 3),
                      stage_seconds=manifest.get("seconds"), counts=manifest.get("counts", {}))
        if action == "ran":
            redone.add(spec.name)
    _finish(storage, config, run, "succeeded", started, tracking)
    ran = sum(1 for r in run["stages"] if r.get("action") == "ran")
    skipped = sum(1 for r in run["stages"] if r.get("action") == "skipped")
    logger.info("pipeline finished in %.1f s: %d ran, %d up to date; run summary %s",
                run["seconds"], ran, skipped, config.pipeline.run_summary)
    return run


def _run_stage(
    spark: SparkSession, config: Config, spec: StageSpec, store: ManifestStore,
    storage: Storage, run_id: str, force: bool, redone: set[str], label: str,
    tracking: Tracking,
) -> tuple[str, str, dict[str, Any]]:
    config_digest = config.digest(*spec.sections)
    inputs = stage_inputs(config, spec, store, storage)
    input_fp = sha256_json(inputs)
    outputs_now = {key: fingerprint(storage, path) for key, path in _paths(config, spec.outputs)}
    manifest = store.read(spec.name)
    if force:
        reason = "forced"
    elif redone & set(spec.upstream):
        reason = f"upstream redone: {', '.join(sorted(redone & set(spec.upstream)))}"
    else:
        reason = stale_reason(manifest, config_digest, input_fp, outputs_now)
    if reason is None:
        logger.info("%s: skipped (up to date, finished %s)", label, manifest.get("finished_at"))
        return "skipped", "up to date", manifest
    logger.info("%s: running (%s)", label, reason)
    store.delete(spec.name)  # from here on, a crash leaves no manifest: the next run redoes it
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


def stage_inputs(
    config: Config, spec: StageSpec, store: ManifestStore, storage: Storage
) -> dict[str, Any]:
    """What a stage reads, fingerprinted: upstream manifests and outputs, input paths."""
    upstream = {}
    for name in spec.upstream:
        manifest = store.read(name)
        outputs = {}
        if manifest is not None:
            outputs = {key: fingerprint(storage, fp["path"])
                       for key, fp in manifest.get("outputs", {}).items()}
        upstream[name] = {"manifest": manifest and manifest["digest"], "outputs": outputs}
    paths = {key: fingerprint(storage, path) for key, path in _paths(config, spec.inputs)}
    return {"upstream": upstream, "paths": paths}


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


def _finish(storage: Storage, config: Config, run: dict[str, Any], status: str,
            started: float, tracking: Tracking) -> None:
    run.update(status=status, finished_at=utc_now(),
               seconds=round(time.perf_counter() - started, 3))
    _write_run(storage, config, run)
    tracking.finish(run)


def _write_run(storage: Storage, config: Config, run: dict[str, Any]) -> None:
    storage.write_text(config.pipeline.run_summary, json.dumps(run, indent=2, default=str) + "\n")
