"""Compare the outputs of two pipeline runs made with the same config and seed.

    python tests/tools/compare_runs.py OUT_A OUT_B

Checks, and prints one line per check: ingest pixels and labels (image Parquet, row by row in id
order), exported PNG files (byte for byte), augmented PNG files and Parquet rows (byte for byte,
with their provenance), the CNN's and the scorer's test top-1, the transfer stage's top-1.
Exits 1 when anything differs. Used to show that a refactoring changed no behaviour: run the
pipeline at both commits (``jobs/run_pipeline.py --config conf/test.yaml --set
cnn.deterministic=true --set output_root=...``), then compare.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pyarrow.dataset as ds


def _rows(path: Path, columns: list[str], root: Path) -> list[tuple]:
    """Rows in id order; an image's ``origin`` is made relative to the run's output root."""
    table = ds.dataset(str(path), format="parquet", partitioning="hive").to_table()
    table = table.sort_by("id")
    data = [table.column(c).to_pylist() for c in columns]
    if "image" in columns:
        for image in data[columns.index("image")]:
            image["origin"] = image["origin"].replace(f"file:{root}/", "<root>/")
    return list(zip(*data, strict=True))


def _files(root: Path, suffix: str) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob(f"*{suffix}")) if not p.name.startswith(".")}


def _metric(path: Path, *keys: str) -> object:
    value = json.loads(path.read_text())
    for key in keys:
        if isinstance(key, tuple):
            key = next((k for k in key if k in value), key[0])
        value = value[key]
    return value


def main(argv: list[str]) -> int:
    a, b = Path(argv[0]), Path(argv[1])
    failures = 0

    def check(name: str, left: object, right: object, shown: str) -> None:
        nonlocal failures
        same = left == right
        failures += not same
        print(f"{'same' if same else 'DIFFERENT'}: {name}: {shown}")

    cols = ["id", "split", "label", "image"]
    left, right = _rows(a / "images", cols, a), _rows(b / "images", cols, b)
    check("ingest rows (id, split, label, image struct incl. pixels)", left, right,
          f"{len(left)} vs {len(right)} rows")
    left, right = _files(a / "png", ".png"), _files(b / "png", ".png")
    check("export PNG files (path and bytes)", left, right, f"{len(left)} vs {len(right)} files")
    left, right = _files(a / "augmented" / "png", ".png"), _files(b / "augmented" / "png", ".png")
    check("augment PNG files (path and bytes)", left, right, f"{len(left)} vs {len(right)} files")
    cols = ["id", "split", "label", "image", "source_id", "sample", "operations"]
    left = _rows(a / "augmented" / "parquet", cols, a)
    right = _rows(b / "augmented" / "parquet", cols, b)
    check("augment Parquet rows (pixels and provenance; origin relative to the output root)", left, right,
          f"{len(left)} vs {len(right)} rows")
    for name, path, keys in [
        ("CNN test top-1", "cnn/metrics.json", ("test", "top1")),
        ("score top-1", "scores/_metrics.json", ("top1",)),
        ("transfer top-1", "transfer/metrics.json", (("top1", "accuracy"),)),
    ]:
        left, right = _metric(a / path, *keys), _metric(b / path, *keys)
        check(name, left, right, f"{left} vs {right}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
