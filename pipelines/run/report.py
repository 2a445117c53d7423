"""The run report: one static HTML page (and one metrics JSON) a person opens in a browser.

``run_report`` reads what the stages recorded (their manifests, whose summaries list the files
each stage wrote under ``artifacts``, and the run summary) and writes
``<report.output>/index.html``,
``metrics.json`` and ``img/*.png``: images are copied next to the page and linked relatively, so
the folder works from ``file://`` and anywhere it is copied. A stage that did not run gets a
section saying so. Nothing is fetched from the network (no scripts, fonts or styles from outside).

The report is written through a staged folder, so a failed report leaves the previous one intact.
"""

from __future__ import annotations

import html
import json
import logging
import re
from string import Template
from typing import Any

from pyspark.sql import SparkSession

from pipelines.config import Config
from pipelines.io.storage import Storage
from pipelines.run.manifest import ManifestStore, utc_now

logger = logging.getLogger(__name__)

#: Page sections after the dataset: (title, stage, what the stage does). What a section shows
#: is what its stage's manifest lists in ``summary.artifacts`` (name -> path or list of paths):
#: ``metrics`` is a JSON file shown as tables, every other entry a PNG image.
SECTIONS: tuple[tuple[str, str, str], ...] = (
    ("Contact sheets", "visualize", "Samples of each split and class."),
    ("Exported files", "export", "Images written as PNG files by split and label."),
    ("Augmented samples", "augment", "Training images augmented."),
    ("Transfer learning", "transfer",
     "Features from a pre-trained network and a classifier on top."),
    ("CNN", "train_cnn", "A convolutional network trained on the images."),
    ("Scoring", "score", "Models applied to the held-out images."),
)
METRICS = "metrics"

_PAGE = Template("""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>$title</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; }
h1 { margin-bottom: .2em; } h2 { border-bottom: 1px solid #ccc; margin-top: 2em; }
table { border-collapse: collapse; margin: .5em 0; } td, th { padding: .2em .6em;
  border: 1px solid #ddd; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.bar { background: #4a7fb5; height: .8em; display: inline-block; }
.note { color: #666; } .missing { color: #a33; }
.figures { display: flex; flex-wrap: wrap; gap: 1.5em; align-items: flex-start; margin: 1em 0; }
figure { margin: 0; padding: .5em; border: 1px solid #e4e4e4; background: #fafafa; }
figure img { display: block; max-width: 100%; } .figures figure { max-width: 100%; }
figcaption { color: #555; font-size: .9em; font-style: italic; padding-top: .4em; }
.ok { color: #2a7a2a; } .failed { color: #a33; font-weight: bold; }
table.grid td.diag { background: #e3eefa; font-weight: bold; }
table.grid th.corner { background: #fff; font-weight: normal; color: #666; font-size: .85em; }
</style>
</head>
<body>
<h1>$title</h1>
<p class="note">$subtitle</p>
$body
</body>
</html>
""")


def run_report(spark: SparkSession, config: Config) -> dict[str, Any]:
    """The report stage: gather what the stages wrote and publish the page."""
    storage = Storage(spark)
    manifests = _read_manifests(storage, config.pipeline.manifests)
    run = _read_json(storage, config.pipeline.run_summary) or {}
    metrics = {
        stage: data for stage, manifest in manifests.items()
        if (path := artifacts_of(manifest).get(METRICS))
        and (data := _read_json(storage, path)) is not None
    }
    images: dict[str, bytes] = {}
    page = render_page(config, run, manifests, metrics, images, storage)
    merged = {
        "generated_at": utc_now(),
        "run": run,
        "stages": {name: _stage_digest(m) for name, m in manifests.items()},
        "metrics": metrics,
        "weights": find_weights({"stages": manifests, "metrics": metrics}),
    }
    with storage.staged_dir(config.report.output) as tmp:
        for name, data in images.items():
            storage.write_bytes(f"{tmp}/img/{name}", data)
        storage.write_text(f"{tmp}/metrics.json", json.dumps(merged, indent=2, default=str))
        storage.write_text(f"{tmp}/index.html", page)
    missing = [stage for _, stage, _ in SECTIONS if stage not in manifests]
    logger.info("report written to %s/index.html (%d images; stages without output: %s)",
                config.report.output, len(images), missing or "none")
    return {"output": config.report.output, "page": f"{config.report.output}/index.html",
            "images": len(images), "stages_reported": sorted(manifests),
            "stages_not_run": missing}


def render_page(
    config: Config, run: dict[str, Any], manifests: dict[str, dict[str, Any]],
    metrics: dict[str, Any], images: dict[str, bytes], storage: Storage,
) -> str:
    """The HTML of the page; fills ``images`` (file name -> PNG bytes) with what it links."""
    parts = [_timings(run, manifests), _dataset(manifests.get("ingest"))]
    for title, stage, what in SECTIONS:
        parts.append(_section(title, stage, what, manifests.get(stage), metrics.get(stage),
                              images, storage))
    parts.append(_weights(find_weights({"stages": manifests, "metrics": metrics})))
    parts.append(_versions(manifests))
    subtitle = (f"Run {run.get('run_id', '?')}, started {run.get('started_at', '?')} "
                f"(pid {run.get('pid', '?')} on {run.get('host', '?')}); output root "
                f"{config.output_root}; page generated {utc_now()}.")
    return _PAGE.substitute(title=_e(config.report.title), subtitle=_e(subtitle),
                            body="\n".join(parts))


def artifacts_of(manifest: dict[str, Any] | None) -> dict[str, Any]:
    """The files a stage recorded in its manifest: name -> path (or list of paths)."""
    summary = (manifest or {}).get("summary")
    return dict(summary.get("artifacts") or {}) if isinstance(summary, dict) else {}


def find_weights(tree: Any, path: str = "") -> dict[str, Any]:
    """Every value under a key mentioning ``weights`` (which weights each model used)."""
    found: dict[str, Any] = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            where = f"{path}.{key}" if path else str(key)
            if "weights" in str(key).lower() and not isinstance(value, dict | list):
                found[where] = value
            else:
                found.update(find_weights(value, where))
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            found.update(find_weights(value, f"{path}[{i}]"))
    return found


def _timings(run: dict[str, Any], manifests: dict[str, dict[str, Any]]) -> str:
    records = {r["stage"]: r for r in run.get("stages", [])}
    names = list(dict.fromkeys([*records, *manifests]))
    longest = max([m.get("seconds") or 0 for m in manifests.values()] + [1e-9])
    rows = []
    for name in names:
        rec, man = records.get(name, {}), manifests.get(name, {})
        action = rec.get("action", "not selected in this run")
        if action == "running" and name == "report":
            action = "ran (this page)"
        seconds = man.get("seconds")
        bar = (f'<span class="bar" style="width:{max(1, int(200 * seconds / longest))}px">'
               "</span> " if seconds else "")
        css = "failed" if action == "failed" else (
            "ok" if action in ("ran", "skipped", "ran (this page)") else "")
        rows.append(
            f"<tr><td>{_e(name)}</td><td class=\"{css}\">{_e(action)}</td>"
            f"<td>{_e(rec.get('reason', ''))}</td>"
            f"<td class=\"num\">{bar}{_fmt(seconds) if seconds is not None else '-'}</td>"
            f"<td>{_e(man.get('finished_at', 'no manifest'))}</td></tr>"
        )
    return (
        "<h2 id=\"timings\">Stages and timings</h2>"
        f"<p>{_status_html(run, run.get('run_id'))} Seconds are those of the stage's last real "
        "run (a skipped stage kept its outputs).</p>"
        "<table><tr><th>stage</th><th>this run</th><th>why</th><th>seconds (last run)</th>"
        "<th>finished</th></tr>" + "".join(rows) + "</table>"
    )


_RUN_STATUS = {None: "no run summary", "running": "running (the report is its last stage)"}
_STATUS_MARK = re.compile(r"<!--run-status:([^>]*)-->.*?<!--/run-status-->", re.S)


def _status_html(run: dict[str, Any], page_run_id: str | None) -> str:
    """The run's status line, between markers that :func:`stamp_run_status` rewrites."""
    status = run.get("status")
    css = {"succeeded": "ok", "failed": "failed"}.get(status, "")
    text = f"Run status: <b class=\"{css}\">{_e(_RUN_STATUS.get(status, status))}</b>"
    total = run.get("seconds")
    if total is not None:
        text += f"; wall time {_fmt(total)} s"
    failed = [r["stage"] for r in run.get("stages", []) if r.get("action") == "failed"]
    if failed:
        text += f"; failed at stage <b>{_e(failed[0])}</b>"
    if page_run_id and run.get("run_id") != page_run_id:
        text = (f"Latest run {_e(run.get('run_id'))}: {text[len('Run status: '):]}. This page "
                f"was generated by the earlier run {_e(page_run_id)}")
    return f"<!--run-status:{_e(page_run_id or '')}-->{text}.<!--/run-status-->"


def stamp_run_status(storage: Storage, config: Config, run: dict[str, Any]) -> bool:
    """Write a finished run's final status into the report page (the report stage runs while
    the run is still ``running``); True when there was a page to stamp.

    A run that failed before its report stage stamps the previous run's page, which then says
    which run it shows and that the latest one failed.
    """
    page_path = f"{config.report.output}/index.html"
    if not storage.exists(page_path):
        return False
    page = storage.read_bytes(page_path).decode("utf-8")
    found = _STATUS_MARK.search(page)
    if found is None:
        return False
    stamped = page[:found.start()] + _status_html(run, found.group(1)) + page[found.end():]
    storage.write_text(page_path, stamped)
    metrics_path = f"{config.report.output}/metrics.json"
    if found.group(1) == run.get("run_id") and storage.exists(metrics_path):
        merged = _read_json(storage, metrics_path) or {}
        merged["run"] = run
        storage.write_text(metrics_path, json.dumps(merged, indent=2, default=str))
    return True
_SPLIT_ORDER = ("train", "validation", "test")


def _split_key(item: tuple[str, Any]) -> tuple[int, str]:
    name = item[0]
    return (_SPLIT_ORDER.index(name) if name in _SPLIT_ORDER else len(_SPLIT_ORDER), name)


def _dataset(ingest: dict[str, Any] | None) -> str:
    head = "<h2 id=\"dataset\">Dataset</h2>"
    if ingest is None:
        return head + _not_run("ingest")
    summary = ingest.get("summary", {})
    per_split = dict(sorted(summary.get("rows_per_split", {}).items(), key=_split_key))
    rows = "".join(f"<tr><td>{_e(k)}</td><td class=\"num\">{_fmt(v)}</td></tr>"
                   for k, v in per_split.items())
    return (head + f"<p>Source: {_e(summary.get('source', '?'))}; "
            f"{_fmt(summary.get('rows', sum(per_split.values())))} images in "
            f"<code>{_e(summary.get('output', ''))}</code>.</p>"
            "<table><tr><th>split</th><th>images</th></tr>" + rows + "</table>")


def _section(
    title: str, stage: str, what: str, manifest: dict[str, Any] | None, metrics: Any,
    images: dict[str, bytes], storage: Storage,
) -> str:
    anchor = stage.replace("_", "-")
    parts = [f"<h2 id=\"{anchor}\">{_e(title)}</h2>", f"<p class=\"note\">{_e(what)}</p>"]
    if manifest is None:
        parts.append(_not_run(stage))
        return "\n".join(parts)
    parts.append(f"<p>Finished {_e(manifest.get('finished_at'))} in "
                 f"{_fmt(manifest.get('seconds'))} s.</p>")
    parts.append(_details("Stage summary", render_value(manifest.get("summary", {}))))
    if metrics is not None:
        parts.append("<h3>Metrics</h3>" + render_value(metrics))
    for name, value in artifacts_of(manifest).items():
        if name == METRICS:
            continue
        figures = []
        for path in value if isinstance(value, list) else [value]:
            if not storage.exists(path):
                parts.append(f"<p class=\"missing\">The {_e(name.replace('_', ' '))} file "
                             f"<code>{_e(path)}</code> the stage recorded is gone.</p>")
                continue
            file_name = f"{stage}-{path.rsplit('/', 1)[-1]}"
            images[file_name] = storage.read_bytes(path)
            caption = figure_caption(stage, name, path)
            figures.append(f"<figure><img src=\"img/{_e(file_name)}\" alt=\"{_e(caption)}\">"
                           f"<figcaption>{_e(caption)}</figcaption></figure>")
        if figures:
            parts.append("<div class=\"figures\">" + "".join(figures) + "</div>")
    return "\n".join(parts)


#: What each image shows, in words (the caption under it): (stage, artifact name) -> caption.
_CAPTIONS = {
    ("augment", "samples"): "Each row: an original training image, then its augmented variants.",
    ("transfer", "confusion_matrix"): "Transfer learning: confusion matrix on the test images "
                                      "(rows: true label, columns: prediction).",
    ("train_cnn", "confusion_matrix"): "CNN: confusion matrix on the test split (rows: true "
                                       "label, columns: prediction).",
    ("train_cnn", "training_curves"): "CNN: loss and top-1 accuracy per epoch, training and "
                                      "validation.",
}


def figure_caption(stage: str, artifact: str, path: str) -> str:
    """The caption of one image of the page."""
    name = path.rsplit("/", 1)[-1].removesuffix(".png")
    if artifact == "contact_sheets":
        if name == "per_class":
            return "Contact sheet: one row of samples per class (all splits)."
        return f"Contact sheet: a seeded sample of the {name.replace('_', ' ')} split."
    return _CAPTIONS.get((stage, artifact), f"{stage}: {name.replace('_', ' ')}")


def _weights(weights: dict[str, Any]) -> str:
    head = "<h2 id=\"weights\">Weights used</h2>"
    if not weights:
        return head + "<p class=\"note\">No stage reported model weights.</p>"
    rows = "".join(f"<tr><td><code>{_e(k)}</code></td><td>{_e(v)}</td></tr>"
                   for k, v in weights.items())
    return head + "<table><tr><th>where</th><th>weights</th></tr>" + rows + "</table>"


def _versions(manifests: dict[str, dict[str, Any]]) -> str:
    rows = "".join(
        f"<tr><td>{_e(name)}</td>"
        + "".join(f"<td>{_e(f'{k} {v}')}</td>" for k, v in sorted(m.get("versions", {}).items()))
        + "</tr>" for name, m in manifests.items()
    )
    return "<h2 id=\"versions\">Versions</h2><table>" + rows + "</table>" if rows else ""


def render_value(value: Any) -> str:
    """Any JSON value as HTML: objects as tables, a list of like objects as one table with a
    row each, confusion matrices as labelled grids, other matrices as grids, lists inline."""
    if isinstance(value, dict):
        if not value:
            return "<span class=\"note\">(empty)</span>"
        value = _annotate_epochs(value)
        rows = []
        for k, v in value.items():
            if k == "confusion_matrix" and _is_matrix(v):
                cell = confusion_table(v, _class_labels(value.get("per_class"), len(v)))
            else:
                cell = render_value(v)
            rows.append(f"<tr><th>{_e(k)}</th><td>{cell}</td></tr>")
        return f"<table>{''.join(rows)}</table>"
    if isinstance(value, list):
        if _is_matrix(value):
            rows = "".join("<tr>" + "".join(f"<td class=\"num\">{_fmt(x)}</td>" for x in r)
                           + "</tr>" for r in value)
            return f"<table>{rows}</table>"
        if len(value) > 1 and all(isinstance(x, dict) for x in value) and all(
            not isinstance(v, dict | list) for x in value for v in x.values()
        ):
            return _records_table(value)
        if all(not isinstance(x, dict | list) for x in value):
            shown = ", ".join(_e(_fmt(x)) for x in value[:50])
            return shown + (f" ... ({len(value)} values)" if len(value) > 50 else "")
        return "".join(render_value(x) for x in value)
    return _e(_fmt(value))


def confusion_table(matrix: list[list[Any]], labels: list[str]) -> str:
    """A confusion matrix with its row (true label) and column (prediction) labels."""
    head = ("<tr><th class=\"corner\">true \u2193 / predicted \u2192</th>"
            + "".join(f"<th>{_e(label)}</th>" for label in labels) + "</tr>")
    body = "".join(
        f"<tr><th>{_e(labels[i])}</th>" + "".join(
            f"<td class=\"num{' diag' if i == j else ''}\">{_fmt(x)}</td>"
            for j, x in enumerate(row)) + "</tr>"
        for i, row in enumerate(matrix)
    )
    return f"<table class=\"grid\">{head}{body}</table>"


def _records_table(records: list[dict[str, Any]]) -> str:
    columns = list(dict.fromkeys(k for r in records for k in r))
    head = "<tr>" + "".join(f"<th>{_e(c)}</th>" for c in columns) + "</tr>"
    body = "".join(
        "<tr>" + "".join(
            f"<td class=\"num\">{_e(_fmt(r.get(c)))}</td>" if isinstance(r.get(c), int | float)
            and not isinstance(r.get(c), bool) else f"<td>{_e(_fmt(r.get(c)))}</td>"
            for c in columns) + "</tr>"
        for r in records
    )
    return f"<table>{head}{body}</table>"


def _is_matrix(value: Any) -> bool:
    return (isinstance(value, list) and bool(value) and all(isinstance(r, list) for r in value)
            and all(isinstance(x, int | float) for r in value for x in r))


def _class_labels(per_class: Any, n: int) -> list[str]:
    """Class names from a ``per_class`` list (``name`` or ``label``), else 0..n-1."""
    if isinstance(per_class, list) and len(per_class) == n and all(
        isinstance(r, dict) for r in per_class
    ):
        return [str(r.get("name", r.get("label", i))) for i, r in enumerate(per_class)]
    return [str(i) for i in range(n)]


def _annotate_epochs(value: dict[str, Any]) -> dict[str, Any]:
    """Beside the epochs a run trained, an architecture spec's own ``epochs`` is its default:
    say so, rather than show ``epochs 10`` next to ``epochs 3``."""
    spec = value.get("architecture_spec")
    if not (isinstance(spec, dict) and "epochs" in spec and "epochs" in value):
        return value
    renamed = {(f"epochs (the architecture's default; this run: {value['epochs']})"
                if k == "epochs" else k): v for k, v in spec.items()}
    out = dict(value)
    out["architecture_spec"] = renamed
    out = {("epochs (this run)" if k == "epochs" else k): v for k, v in out.items()}
    return out


def _details(summary: str, body: str) -> str:
    return f"<details><summary>{_e(summary)}</summary>{body}</details>"


def _not_run(stage: str) -> str:
    return (f"<p class=\"missing\">The <b>{_e(stage)}</b> stage has not run (no manifest): "
            "it was not selected, or it failed.</p>")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.1f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return "" if value is None else str(value)


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _read_json(storage: Storage, path: str) -> Any:
    if not storage.exists(path):
        return None
    try:
        return json.loads(storage.read_bytes(path).decode("utf-8"))
    except ValueError as exc:
        logger.warning("report: ignoring %s, not JSON: %s", path, exc)
        return None


def _read_manifests(storage: Storage, folder: str) -> dict[str, dict[str, Any]]:
    store = ManifestStore(storage, folder)
    if not storage.is_dir(folder):
        return {}
    names = [n.removesuffix(".json") for n in storage.list(folder)
             if n.endswith(".json") and not n.startswith(".")]
    return {name: m for name in names if (m := store.read(name)) is not None}


def _stage_digest(manifest: dict[str, Any]) -> dict[str, Any]:
    keys = ("status", "run_id", "finished_at", "seconds", "counts", "summary", "versions")
    return {k: manifest.get(k) for k in keys}
