"""The pipeline runner in-process: skip/redo decisions, failures, selection, manifests."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from stages_for_tests import broken, count_labels

from pipelines.config import ConfigError, load_config
from pipelines.run.cli import StageFailed
from pipelines.run.runner import STAGES, StageSpec, entry_name, make_plan, run_pipeline
from pipelines.stages.ingest import run_ingest

ROOT = Path(__file__).resolve().parents[1]

REGISTRY = (
    StageSpec("ingest", run_ingest, ("mnist", "ingest"), (),
              ("ingest.folder", "mnist.local_dir"), ("ingest.output",)),
    StageSpec("count", count_labels, ("visualize",), (),
              ("visualize.input",), ("visualize.output",)),
    StageSpec("later", broken, ("visualize",), ("count",), (), ()),
)


def _config(out: Path, mnist_dir: Path, *extra: str):
    return load_config(ROOT / "conf" / "test.yaml", [
        f"output_root={out}", "mnist.sources=[local]", f"mnist.local_dir={mnist_dir}",
        f"mnist.cache_dir={out}/cache", "ingest.validation_size=10", "ingest.partitions=2",
        "visualize.output={output_root}/counts", *extra,
    ])


def _actions(run: dict) -> dict[str, str]:
    return {r["stage"]: r["action"] for r in run["stages"]}


def _run(spark, config, registry=REGISTRY[:2], **plan_args):
    plan = make_plan(config, registry=registry, **plan_args)
    return run_pipeline(spark, config, plan, registry=registry)


def test_rerun_skips_matching_stages_and_redoes_changed_ones_and_their_downstream(
    spark, tmp_path, tiny_mnist_dir
):
    out = tmp_path / "out"
    config = _config(out, tiny_mnist_dir)
    first = _run(spark, config)
    assert _actions(first) == {"ingest": "ran", "count": "ran"}
    manifest = json.loads((out / "_manifests" / "ingest.json").read_text())
    assert manifest["stage"] == "ingest" and manifest["status"] == "succeeded"
    assert manifest["counts"]["rows"] == 60 and manifest["summary"]["rows_per_split"] == {
        "train": 30, "validation": 10, "test": 20}
    assert manifest["config_digest"] == config.digest("mnist", "ingest")
    assert manifest["outputs"]["ingest.output"]["files"] > 0
    assert manifest["versions"]["pyspark"] and manifest["versions"]["python"]
    saved = json.loads((out / "run.json").read_text())
    assert saved["status"] == "succeeded" and _actions(saved) == _actions(first)
    counts_mtime = os.path.getmtime(out / "counts")

    second = _run(spark, config)
    assert _actions(second) == {"ingest": "skipped", "count": "skipped"}
    assert os.path.getmtime(out / "counts") == counts_mtime

    # Only the downstream stage's section changed: ingest stays, count is redone.
    third = _run(spark, _config(out, tiny_mnist_dir, "visualize.seed=7"))
    assert _actions(third) == {"ingest": "skipped", "count": "ran"}
    assert third["stages"][1]["reason"] == "config changed"

    # Ingest's section changed: ingest is redone, and so is everything downstream of it.
    changed = _config(out, tiny_mnist_dir, "visualize.seed=7", "ingest.validation_size=5")
    fourth = _run(spark, changed)
    assert _actions(fourth) == {"ingest": "ran", "count": "ran"}
    assert fourth["stages"][1]["reason"] == "input changed: visualize.input (written by ingest)"
    assert _actions(_run(spark, changed, force=True)) == {"ingest": "ran", "count": "ran"}


def test_missing_or_changed_output_makes_the_stage_run_again(spark, tmp_path, tiny_mnist_dir):
    out = tmp_path / "out"
    config = _config(out, tiny_mnist_dir)
    _run(spark, config)
    shutil.rmtree(out / "counts")
    run = _run(spark, config)
    assert _actions(run) == {"ingest": "skipped", "count": "ran"}
    assert "missing" in run["stages"][1]["reason"]
    # An output rewritten outside the runner (by its own job) redoes its stage; the rewrite
    # has the same bytes, so the stage reading it is still up to date.
    run_ingest(spark, config)
    run = _run(spark, config)
    assert _actions(run) == {"ingest": "ran", "count": "skipped"}
    assert "changed since the manifest" in run["stages"][0]["reason"]


def test_failed_stage_stops_the_run_and_leaves_no_manifest(
    spark, tmp_path, tiny_mnist_dir, monkeypatch
):
    out = tmp_path / "out"
    config = _config(out, tiny_mnist_dir)
    _run(spark, config)
    changed = _config(out, tiny_mnist_dir, "visualize.seed=3")
    # The stage is killed between writing its output and the runner writing its manifest.
    monkeypatch.setenv("PIPELINES_FAILPOINTS", "runner.count.finish=raise")
    monkeypatch.setenv("PIPELINES_FAILPOINTS_DIR", str(tmp_path / "fp"))
    with pytest.raises(StageFailed, match="stage 'count' failed: InjectedFault"):
        _run(spark, changed, registry=REGISTRY[:3])
    assert not (out / "_manifests" / "count.json").exists()
    saved = json.loads((out / "run.json").read_text())
    assert saved["status"] == "failed"
    assert _actions(saved) == {"ingest": "skipped", "count": "failed"}  # 'later' never started
    assert "InjectedFault" in saved["stages"][1]["reason"]

    rerun = _run(spark, changed)
    assert _actions(rerun) == {"ingest": "skipped", "count": "ran"}
    assert rerun["stages"][1]["reason"] == "no manifest"

    with pytest.raises(StageFailed, match="stage 'later' failed: FileNotFoundError: no input"):
        _run(spark, changed, registry=REGISTRY[:3])
    assert not (out / "_manifests" / "later.json").exists()


def test_tampered_manifest_is_not_trusted(spark, tmp_path, tiny_mnist_dir):
    out = tmp_path / "out"
    config = _config(out, tiny_mnist_dir)
    _run(spark, config)
    path = out / "_manifests" / "count.json"
    manifest = json.loads(path.read_text())
    manifest["config_digest"] = config.digest("visualize")[::-1]
    path.write_text(json.dumps(manifest))
    assert not (path.parent / f".{path.name}.crc").exists()  # Storage writes no checksum files
    assert _actions(_run(spark, config))["count"] == "ran"


def test_stage_selection_and_bad_names(tmp_path, tiny_mnist_dir):
    out = tmp_path / "out"
    config = _config(out, tiny_mnist_dir)
    names = lambda plan: [s.name for s in plan.stages]  # noqa: E731
    assert names(make_plan(config, registry=REGISTRY, only=["count"])) == ["count"]
    assert names(make_plan(config, registry=REGISTRY, from_stage="count")) == ["count", "later"]
    assert names(make_plan(config, registry=REGISTRY)) == ["ingest", "count", "later"]
    with pytest.raises(ConfigError, match=r"unknown stage.*Received: \['nope'\]"):
        make_plan(config, registry=REGISTRY, only=["ingest", "nope"])
    with pytest.raises(ConfigError, match="unknown stage"):
        make_plan(_config(out, tiny_mnist_dir, "pipeline.stages=[ingest, typo]"),
                  registry=REGISTRY)
    only_ingest = _config(out, tiny_mnist_dir, "pipeline.stages=[ingest]")
    assert names(make_plan(only_ingest, registry=REGISTRY)) == ["ingest"]
    no_report = _config(out, tiny_mnist_dir, "pipeline.report=false")
    assert "report" not in names(make_plan(no_report))
    assert names(make_plan(no_report))[-1] == "score"


def test_registry_rows_are_well_formed():
    names = [spec.name for spec in STAGES]
    assert names == ["ingest", "visualize", "export", "augment", "transfer", "train_cnn",
                     "score", "report"]
    for index, spec in enumerate(STAGES):
        assert callable(spec.run) and spec.sections
        assert entry_name(spec).startswith("pipelines.") and ":run_" in entry_name(spec)
        assert set(spec.upstream) <= set(names[:index]), spec.name
        assert all("." in key for key in (*spec.inputs, *spec.outputs)), spec.name


def _doc_stage_rows(text: str) -> list[tuple]:
    """The rows of the stage table in docs/pipeline.md, each cell as a tuple of its code spans."""
    section = text.split("## The stage table", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("| `")]
    return [
        tuple(tuple(re.findall(r"`([^`]+)`", cell)) for cell in line.strip("|").split(" | "))
        for line in lines
    ]


def test_docs_stage_table_is_the_runners_table():
    text = (ROOT / "docs" / "pipeline.md").read_text()
    expected = [
        ((spec.name,), (entry_name(spec),), spec.sections, spec.upstream, spec.inputs,
         spec.outputs)
        for spec in STAGES
    ]
    assert _doc_stage_rows(text) == expected
    order = " -> ".join(spec.name for spec in STAGES)
    assert f"\n    {order}\n" in text, f"docs/pipeline.md should show the run order: {order}"


def test_doc_stage_rows_parse_code_spans_per_cell():
    rows = _doc_stage_rows("## The stage table\n\n| a | b |\n| --- | --- |\n"
                           "| `x` | `m:f` | `s`, `t` | - |\n\n## Next\n| `not` | `this` |\n")
    assert rows == [(("x",), ("m:f",), ("s", "t"), ())]


def test_unreadable_input_fails_the_stage_with_a_clear_cause(spark, tmp_path, tiny_mnist_dir):
    junk = tmp_path / "junk" / "3"
    junk.mkdir(parents=True)
    (junk / "a.png").write_bytes(b"not a png at all")
    out = tmp_path / "out"
    config = _config(out, tiny_mnist_dir, "ingest.source=folder", f"ingest.folder={junk.parent}")
    with pytest.raises(StageFailed, match="stage 'ingest' failed: ValueError: no decodable images"):
        _run(spark, config, registry=REGISTRY[:1])
    assert not (out / "_manifests" / "ingest.json").exists() and not (out / "images").exists()


def test_stage_graph_follows_the_input_paths_in_the_config(tmp_path):
    from pipelines.run.runner import reads, upstream_of

    by_name = {spec.name: spec for spec in STAGES}
    config = load_config(ROOT / "conf" / "test.yaml", [f"output_root={tmp_path}"])
    assert reads(config, by_name["train_cnn"]) == {"cnn.inputs[0]": "ingest"}
    assert upstream_of(config, by_name["augment"]) == ("export",)
    assert upstream_of(config, by_name["score"]) == ("ingest", "train_cnn")
    assert upstream_of(config, by_name["ingest"]) == ()
    with_augmented = load_config(ROOT / "conf" / "test.yaml", [
        f"output_root={tmp_path}", "cnn.inputs=['{output_root}/images', "
        "'{output_root}/augmented/parquet']", "augment.input={output_root}/images",
        "augment.input_format=parquet"])
    assert reads(with_augmented, by_name["train_cnn"]) == {
        "cnn.inputs[0]": "ingest", "cnn.inputs[1]": "augment"}
    assert upstream_of(with_augmented, by_name["augment"]) == ("ingest",)
    assert set(upstream_of(config, by_name["report"])) == set(by_name) - {"report"}


@pytest.mark.slow
def test_cnn_is_redone_only_when_the_augmented_data_it_reads_changed(
    spark, tmp_path, tiny_mnist_dir
):
    out = tmp_path / "out"
    registry = tuple(s for s in STAGES if s.name in ("ingest", "export", "augment", "train_cnn"))
    stages = [s.name for s in registry]
    augmented = "cnn.inputs=['{output_root}/images', '{output_root}/augmented/parquet']"

    def run(*extra, **plan_args):
        config = _config(out, tiny_mnist_dir, "cnn.architecture=seed", "cnn.epochs=1",
                         "augment.samples_per_image=2", *extra)
        return _run(spark, config, registry=registry, **plan_args)

    assert _actions(run()) == dict.fromkeys(stages, "ran")
    # The default cnn.inputs does not read augmented data: a new augmentation leaves it alone.
    second = run("augment.seed=1")
    assert _actions(second) == {"ingest": "skipped", "export": "skipped", "augment": "ran",
                                "train_cnn": "skipped"}
    # Train on the augmented data too: the CNN is redone once for the new inputs...
    assert _actions(run("augment.seed=1", augmented))["train_cnn"] == "ran"
    cnn = json.loads((out / "_manifests" / "train_cnn.json").read_text())
    assert cnn["inputs"]["paths"]["cnn.inputs[1]"]["written_by"] == "augment"
    # ... a forced rerun of augment writes the same bytes: the CNN stays up to date ...
    forced = run("augment.seed=1", augmented, only=["augment"], force=True)
    assert _actions(forced) == {"augment": "ran"}
    assert _actions(run("augment.seed=1", augmented))["train_cnn"] == "skipped"
    # ... and different augmented images redo it, saying why.
    changed = run("augment.seed=2", augmented)
    assert _actions(changed) == {"ingest": "skipped", "export": "skipped", "augment": "ran",
                                 "train_cnn": "ran"}
    assert changed["stages"][3]["reason"] == "input changed: cnn.inputs[1] (written by augment)"
