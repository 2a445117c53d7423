"""Stage manifests: the record a pipeline stage leaves once it has succeeded.

A manifest is a small JSON file ``<pipeline.manifests>/<stage>.json`` (default
``{output_root}/_manifests/<stage>.json``), written atomically by the runner only after the stage
function returned. Its presence means "this stage's outputs are complete"; a stage that failed
or was killed has none (the runner deletes the old one before the stage starts), so a rerun
redoes it. Format (``format`` 2)::

    {
      "format": 2,
      "stage": "train_cnn",
      "status": "succeeded",
      "run_id": "20261130T081500Z-3f9c2a",
      "entry": "pipelines.stages.train_cnn:run_train_cnn",
      "config_sections": ["cnn"],
      "config_digest": "<sha256 of those config sections>",
      "input_fingerprint": "<sha256 of the 'inputs' object>",
      "inputs": {"paths": {"cnn.inputs[0]": {<content fingerprint>, "written_by": "ingest"}},
                 "upstream": {"<fixed upstream stage>": "<its manifest digest or null>"}},
      "outputs": {"<config key>": <fingerprint>},
      "counts": {"rows": 70000, ...},          # the numbers at the top of the stage summary
      "summary": {...},                        # the stage function's whole summary
      "started_at": "2026-11-30T08:15:00Z", "finished_at": "...", "seconds": 12.3,
      "versions": {"python": "3.11.7", "pyspark": "4.3.0", "spark": "4.3.0",
                   "tensorflow": "2.21.0", "keras": "3.15.1", "spark-image-pipelines": "0.1.0"},
      "digest": "<sha256 of everything above>"
    }

A path fingerprint (:func:`fingerprint`) is ``{"path", "exists", "kind": "file"|"dir", "files",
"bytes", "mtime"}``, read through Hadoop's FileSystem (any URI) with two calls per path, so it
is cheap even for a folder of 70,000 PNG files: the runner uses it for a stage's own outputs.

An input fingerprint (:func:`content_fingerprint`) is what the next stage compares: on a local
filesystem it is the SHA-256 of the content of every file a reader sees under the path (names
starting with ``_`` or ``.`` are skipped, as Spark's readers skip them; the random part of Spark's
``part-NNNNN-<uuid>`` file names is ignored), so a byte-identical rewrite of an upstream output
(a forced or repeated rerun of a deterministic stage) does not redo the stages that read it. On
other filesystems (``hdfs://``, ``s3a://``) it falls back to the size-and-mtime fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import re
from datetime import UTC, datetime
from importlib import metadata
from typing import Any

from pipelines.io.digest import sha256_json
from pipelines.io.storage import Storage
from pipelines.io.task_files import is_temp_name

logger = logging.getLogger(__name__)

FORMAT = 2
SUCCEEDED = "succeeded"
#: Distributions whose versions each manifest records (first installed name wins).
VERSIONED = {
    "pyspark": ("pyspark",),
    "tensorflow": ("tensorflow-cpu", "tensorflow"),
    "keras": ("keras",),
    "spark-image-pipelines": ("spark-image-pipelines",),
}


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def versions() -> dict[str, str | None]:
    """Python and library versions, read from package metadata (nothing heavy is imported)."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for label, names in VERSIONED.items():
        found[label] = None
        for name in names:
            try:
                found[label] = metadata.version(name)
                break
            except metadata.PackageNotFoundError:
                continue
    return found


def fingerprint(storage: Storage, path: str) -> dict[str, Any]:
    """What a path looks like now: kind, file count, bytes and modification time (ms)."""
    stat = storage.stat(path)
    if stat is None:
        return {"path": path, "exists": False}
    return {"path": path, "exists": True, **stat}


#: The random part of the file names Spark's writers give (``part-00000-<uuid>-c000.parquet``).
_PART_UUID = re.compile(r"^(part-\d+)-[0-9a-f]{8}(?:-[0-9a-f]{4}){3}-[0-9a-f]{12}")


def content_fingerprint(storage: Storage, path: str) -> dict[str, Any]:
    """An input path's fingerprint: its content digest when it is local, else :func:`fingerprint`.

    ``{"path", "exists", "kind", "files", "bytes", "sha256"}`` for a local path (no mtime: a
    rewrite with the same bytes is the same input).
    """
    qualified = storage.qualify(path)
    if not qualified.startswith("file:"):
        return fingerprint(storage, path)
    local = qualified.removeprefix("file:")
    local = "/" + local.lstrip("/")
    if not os.path.exists(local):
        return {"path": path, "exists": False}
    if os.path.isfile(local):
        digest, size = _file_sha256(local)
        return {"path": path, "exists": True, "kind": "file", "files": 1, "bytes": size,
                "sha256": digest}
    total, files, size = hashlib.sha256(), 0, 0
    for folder, dirs, names in os.walk(local):
        dirs[:] = sorted(d for d in dirs if not d.startswith(("_", ".")))
        for name in sorted(n for n in names if not n.startswith(("_", "."))):
            full = os.path.join(folder, name)
            digest, length = _file_sha256(full)
            rel = os.path.relpath(full, local)
            rel = os.path.join(os.path.dirname(rel), _PART_UUID.sub(r"\1", name))
            total.update(f"{rel}\0{length}\0{digest}\n".encode())
            files, size = files + 1, size + length
    return {"path": path, "exists": True, "kind": "dir", "files": files, "bytes": size,
            "sha256": total.hexdigest()}


def _file_sha256(path: str) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def summary_counts(summary: Any) -> dict[str, int | float]:
    """The top-level numbers of a stage summary (row/file counts, seconds, accuracy...)."""
    if not isinstance(summary, dict):
        return {}
    return {
        str(k): v for k, v in summary.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


class ManifestStore:
    """Reads and writes stage manifests in one folder (any Hadoop-FS URI); driver-only."""

    def __init__(self, storage: Storage, folder: str):
        self.storage = storage
        self.folder = folder.rstrip("/")

    def path(self, stage: str) -> str:
        return f"{self.folder}/{stage}.json"

    def read(self, stage: str) -> dict[str, Any] | None:
        """The stage's manifest, or None when there is none or it is not a valid one."""
        path = self.path(stage)
        if not self.storage.exists(path):
            return None
        try:
            manifest = json.loads(self.storage.read_bytes(path).decode("utf-8"))
        except Exception as exc:  # not JSON, or the filesystem's checksum does not match
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else exc
            logger.warning("ignoring unreadable manifest %s: %s", path, first_line)
            return None
        if not isinstance(manifest, dict) or manifest.get("digest") != _digest_of(manifest):
            logger.warning("ignoring manifest %s: its digest does not match its content", path)
            return None
        return manifest

    def write(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Seal ``manifest`` with its digest and write it atomically; returns the sealed copy."""
        sealed = {k: v for k, v in manifest.items() if k != "digest"}
        sealed["digest"] = _digest_of(sealed)
        text = json.dumps(sealed, indent=2, sort_keys=True, default=str) + "\n"
        self.storage.write_text(self.path(manifest["stage"]), text)
        return sealed

    def delete(self, stage: str) -> None:
        self.storage.delete(self.path(stage))

    def remove_leftovers(self) -> None:
        """Delete temporary files of manifest writes that a killed run left behind."""
        if not self.storage.is_dir(self.folder):
            return
        for name in self.storage.list(self.folder):
            if is_temp_name(name):
                logger.info("removing leftover of an interrupted run: %s/%s", self.folder, name)
                self.storage.delete(f"{self.folder}/{name}")


def build_manifest(
    *, stage: str, entry: str, run_id: str, sections: list[str], config_digest: str,
    inputs: dict[str, Any], outputs: dict[str, Any], summary: Any, started_at: str,
    seconds: float, spark_version: str,
) -> dict[str, Any]:
    """The manifest of a stage that has just succeeded (not yet sealed with its digest)."""
    return {
        "format": FORMAT,
        "stage": stage,
        "status": SUCCEEDED,
        "run_id": run_id,
        "entry": entry,
        "config_sections": list(sections),
        "config_digest": config_digest,
        "input_fingerprint": sha256_json(inputs),
        "inputs": inputs,
        "outputs": outputs,
        "counts": summary_counts(summary),
        "summary": json.loads(json.dumps(summary, default=str)),
        "started_at": started_at,
        "finished_at": utc_now(),
        "seconds": round(seconds, 3),
        "versions": {**versions(), "spark": spark_version},
    }


def stale_reason(
    manifest: dict[str, Any] | None, config_digest: str, input_fingerprint: str,
    outputs_now: dict[str, Any],
) -> str | None:
    """Why a stage must run again, or None when its manifest still matches."""
    if manifest is None:
        return "no manifest"
    if manifest.get("format") != FORMAT or manifest.get("status") != SUCCEEDED:
        return "manifest from another format or an unfinished run"
    if manifest.get("config_digest") != config_digest:
        return "config changed"
    if manifest.get("input_fingerprint") != input_fingerprint:
        return "input changed"
    for key, now in outputs_now.items():
        if not now.get("exists"):
            return f"output {key}={now['path']!r} is missing"
        if manifest.get("outputs", {}).get(key) != now:
            return f"output {key}={now['path']!r} changed since the manifest was written"
    return None


def _digest_of(manifest: dict[str, Any]) -> str:
    return sha256_json({k: v for k, v in manifest.items() if k != "digest"})
