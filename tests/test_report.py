"""The HTML report: built from real manifests and stage files, rendered in headless Chromium."""

from __future__ import annotations

import html
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.config import load_config
from pipelines.imaging.contact_sheet import render_sheet
from pipelines.io.storage import Storage
from pipelines.run.manifest import ManifestStore, build_manifest
from pipelines.run.report import find_weights, render_value, run_report
from pipelines.run.runner import StageSpec, make_plan, run_pipeline
from pipelines.stages.ingest import run_ingest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
REGISTRY = (
    StageSpec("ingest", run_ingest, ("mnist", "ingest"), (),
              ("mnist.local_dir",), ("ingest.output",)),
    StageSpec("report", run_report, ("report",), ("ingest", "train_cnn"),
              (), ("report.output",)),
)
# Appended to a copy of the page: records, once everything loaded, each image's natural width.
CHECK_SCRIPT = """<script>
window.addEventListener("load", () => {
  const found = [...document.images].map(i => [i.getAttribute("src"), i.naturalWidth]);
  document.body.setAttribute("data-images", JSON.stringify(found));
});
</script>"""


def _png(width: int, height: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def finished_run(spark, tmp_path, tiny_mnist_dir):
    """A real ingest + report run, plus the files and manifest a CNN stage would leave."""
    out = tmp_path / "out"
    config = load_config(ROOT / "conf" / "test.yaml", [
        f"output_root={out}", "mnist.sources=[local]", f"mnist.local_dir={tiny_mnist_dir}",
        "ingest.validation_size=10", "ingest.partitions=2", "report.title=Test <report>",
    ])
    digits = [np.full((28, 28), 20 * i, np.uint8) for i in range(10)]
    (out / "sheets").mkdir(parents=True)
    (out / "sheets" / "train.png").write_bytes(
        render_sheet(digits, [str(i) for i in range(10)], columns=5, title="train"))
    (out / "cnn").mkdir()
    (out / "cnn" / "confusion_matrix.png").write_bytes(_png(120, 100, 1))
    (out / "cnn" / "training_curves.png").write_bytes(_png(160, 90, 2))
    long_names = ["a-rather-long-class-name", "cat", "dog"]
    (out / "sheets" / "per_class.png").write_bytes(
        render_sheet(digits[:9], None, columns=3, title="3 per class", row_labels=long_names))
    cnn_metrics = {"test_accuracy": 0.9812, "weights": "none (trained from random init)",
                   "per_class": [{"label": i, "name": n, "precision": 0.9, "recall": 0.8,
                                  "support": 10} for i, n in enumerate(long_names)],
                   "confusion_matrix": [[5, 1, 0], [0, 7, 1], [2, 0, 9]]}
    (out / "cnn" / "metrics.json").write_text(json.dumps(cnn_metrics))
    store = ManifestStore(Storage(spark), config.pipeline.manifests)
    recorded = {
        "visualize": {"artifacts": {"contact_sheets": [str(out / "sheets" / "train.png"),
                                                       str(out / "sheets" / "per_class.png")]}},
        "train_cnn": {"epochs": 2, "model": "cnn/model",
                      "architecture_spec": {"name": "seed", "epochs": 10, "batch_size": 128},
                      "artifacts": {
                          "metrics": str(out / "cnn" / "metrics.json"),
                          "confusion_matrix": str(out / "cnn" / "confusion_matrix.png"),
                          "training_curves": str(out / "cnn" / "training_curves.png")}},
    }
    for stage, summary in recorded.items():
        store.write(build_manifest(
            stage=stage, entry="x:y", run_id="r0", sections=["visualize"],
            config_digest="d", inputs={}, outputs={}, summary=summary,
            started_at="2026-01-01T00:00:00Z", seconds=42.5, spark_version=spark.version))
    # Written where no stage recorded it: the report must not pick it up.
    (out / "transfer").mkdir()
    (out / "transfer" / "confusion_matrix.png").write_bytes(_png(50, 50, 3))
    run_pipeline(spark, config, make_plan(config, registry=REGISTRY), registry=REGISTRY)
    return config, out


def _render(page: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    if not CHROMIUM.exists():
        pytest.fail("chromium is not installed: `make chromium` (a dependency of make test)")
    return subprocess.run(
        [str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}",
         "--virtual-time-budget=5000", *extra, page.as_uri()],
        capture_output=True, text=True, timeout=120, check=True,
    )


def test_report_page_and_all_its_images_load_in_headless_chromium(finished_run, tmp_path):
    config, out = finished_run
    report = out / "report"
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["metrics"]["train_cnn"]["test_accuracy"] == 0.9812
    assert metrics["stages"]["ingest"]["summary"]["rows_per_split"]["validation"] == 10
    assert metrics["weights"]["metrics.train_cnn.weights"] == "none (trained from random init)"

    # The folder is self-contained: copied elsewhere, the page still finds every image.
    moved = tmp_path / "elsewhere" / "report"
    shutil.copytree(report, moved)
    shutil.rmtree(out)
    page = (moved / "index.html").read_text()
    (moved / "_check.html").write_text(page.replace("</body>", CHECK_SCRIPT + "</body>"))
    dom = _render(moved / "_check.html", tmp_path, "--dump-dom").stdout
    found = re.search(r'data-images="([^"]*)"', dom)
    assert found, dom[:2000]
    images = json.loads(html.unescape(found.group(1)))
    assert sorted(src for src, _ in images) == [
        "img/train_cnn-confusion_matrix.png", "img/train_cnn-training_curves.png",
        "img/visualize-per_class.png", "img/visualize-train.png"]
    assert all(width > 0 for _, width in images), images
    text = re.sub(r"<[^>]+>", " ", dom)
    assert "Test &lt;report&gt;" in dom  # the title is escaped
    for expected in ("Dataset", "Contact sheets", "Weights used", "none (trained from random init)",
                     "0.9812"):
        assert expected in text, expected
    assert re.search(r"The\s+transfer\s+stage has not run", text)
    assert re.search(r"validation\s*</td>\s*<td[^>]*>10<", dom)
    # The run's final status, stamped after its last stage (the report) finished.
    assert re.search(r"Run status:\s*<b[^>]*>succeeded</b>", dom)
    # Per-class metrics: one table with a row per class, not one small table per class.
    assert dom.count("<th>precision</th>") == 1
    assert re.search(r"<td>a-rather-long-class-name</td>\s*<td[^>]*>0.9</td>", dom)
    # The confusion matrix names its rows (true label) and columns (prediction).
    assert "true ↓ / predicted →" in dom
    assert re.search(r"<th>dog</th>\s*<td[^>]*>2</td>\s*<td[^>]*>0</td>\s*"
                     r"<td class=\"num diag\">9</td>", dom)
    # The architecture's default epochs are not shown as if they were the run's.
    assert "epochs (the architecture's default; this run: 2)" in text
    assert "Contact sheet: a seeded sample of the train split." in text

    # As a reader sees it, at 1400 px: look at this image when changing the page.
    shot = tmp_path / "report.png"
    _render(moved / "index.html", tmp_path, f"--screenshot={shot}", "--window-size=1400,3000")
    page_pixels = np.asarray(Image.open(shot).convert("L"))
    assert page_pixels.shape[1] == 1400 and page_pixels.std() > 5  # not a blank page


def test_contact_sheet_keeps_long_row_labels_whole():
    digits = [np.full((28, 28), 20 * i, np.uint8) for i in range(6)]
    names = ["a-rather-long-class-name", "b"]
    sheet = np.asarray(Image.open(io.BytesIO(
        render_sheet(digits, None, columns=3, row_labels=names))).convert("L"))
    short = np.asarray(Image.open(io.BytesIO(
        render_sheet(digits, None, columns=3, row_labels=["a", "b"]))).convert("L"))
    # The sheet widens for the label and keeps a blank margin at its left edge: nothing is cut.
    assert sheet.shape[1] > short.shape[1] + 100
    assert sheet[:, :3].min() > 200
    ink = np.where(sheet.min(axis=0) < 128)[0]
    assert ink[0] < sheet.shape[1] - short.shape[1]  # the label's text starts in the margin


def test_report_without_any_stage_output_says_so(spark, tmp_path):
    config = load_config(ROOT / "conf" / "test.yaml", [f"output_root={tmp_path / 'empty'}"])
    from pipelines.run.report import run_report

    summary = run_report(spark, config)
    assert summary["images"] == 0 and "train_cnn" in summary["stages_not_run"]
    page = (tmp_path / "empty" / "report" / "index.html").read_text()
    assert "The <b>ingest</b> stage has not run" in page
    assert "No stage reported model weights" in page


def test_render_value_and_find_weights():
    assert render_value({"a": [[1, 2], [3, 4]]}).count("<td class=\"num\">") == 4
    assert "&lt;b&gt;" in render_value("<b>")
    tree = {"transfer": {"weights": "imagenet", "layers": [{"weights_file": "w.h5"}]}}
    assert find_weights(tree) == {"transfer.weights": "imagenet",
                                  "transfer.layers[0].weights_file": "w.h5"}
