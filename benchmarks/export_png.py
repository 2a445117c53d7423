"""Export throughput on all 70,000 MNIST images: Spark vs the seed notebook's loop vs bare PIL.

    python benchmarks/export_png.py                      # input: out/images (run ingest first)
    python benchmarks/export_png.py --input out/images --repeats 3

In one run, with the SparkSession started first (its start-up is reported apart, and one small
warm-up export starts the Python workers):

- ours: the export job's stage (``run_export``) on all 70,000 rows: Parquet read, PNG encoding
  and writing on the executors, temp-file commits, leftover clean-up, the file count check and
  the atomic publish, at ``compress_level`` 6 (Pillow's default) and 1;
- bare PIL: one process, ``Image.fromarray(a).save(path, compress_level=level)`` into the same
  ``split=/label=`` layout, pixels already in memory (its Parquet read is not timed);
- the seed notebook: ``matplotlib.image.imsave(path, a, cmap="gray")`` per image (writes RGBA
  PNGs at Pillow's default level), pixels in memory.

The baselines run on a subset (``--pil-sample``, ``--notebook-sample``) and are extrapolated
per image to 70,000; every figure is the median of ``--repeats`` interleaved repeats.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.config import load_config  # noqa: E402
from pipelines.run.session import build_session  # noqa: E402
from pipelines.stages.export import run_export  # noqa: E402


def load_arrays(path: Path, n: int) -> list[tuple[str, str, int, np.ndarray]]:
    """The first ``n`` rows (id, split, label, 28x28 uint8) of the image Parquet, in memory."""
    table = pq.read_table(path, columns=["id", "split", "label", "image"])
    table = table.slice(0, n)
    data = table.column("image").combine_chunks().field("data")
    rows = []
    for i, (image_id, split, label) in enumerate(zip(table.column("id").to_pylist(),
                                                     table.column("split").to_pylist(),
                                                     table.column("label").to_pylist(),
                                                     strict=True)):
        rows.append((image_id, split, label,
                     np.frombuffer(data[i].as_py(), np.uint8).reshape(28, 28)))
    return rows


def pil_loop(rows, out: Path, level: int) -> float:
    from PIL import Image

    started = time.perf_counter()
    made = set()
    for image_id, split, label, pixels in rows:
        folder = out / f"split={split}" / f"label={label}"
        if folder not in made:
            folder.mkdir(parents=True, exist_ok=True)
            made.add(folder)
        Image.fromarray(pixels).save(folder / f"{image_id}.png", compress_level=level)
    return time.perf_counter() - started


def notebook_loop(rows, out: Path) -> float:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image as mpimg

    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    for image_id, _, _, pixels in rows:
        mpimg.imsave(out / f"{image_id}.png", pixels, cmap="gray")
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", default=str(ROOT / "out" / "images"))
    parser.add_argument("--work", default="/tmp/export-bench")
    parser.add_argument("--config", default=str(ROOT / "conf" / "local.yaml"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pil-sample", type=int, default=10_000)
    parser.add_argument("--notebook-sample", type=int, default=2_000)
    parser.add_argument("--levels", default="6,1")
    args = parser.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    levels = [int(v) for v in args.levels.split(",")]

    started = time.perf_counter()
    config = load_config(args.config, [f"export.input={args.input}", "export.limit=null"])
    spark = build_session(config.spark, app_name="benchmark export_png")
    startup = time.perf_counter() - started
    total = spark.read.parquet(args.input).count()
    print(f"SparkSession start-up: {startup:.1f} s (not counted below); master "
          f"{spark.sparkContext.master}, {os.cpu_count()} cores, {total} images")

    def export(level: int, name: str, limit: int | None = None) -> dict:
        cfg = config.export.model_copy(update={
            "output": str(work / name), "compress_level": level, "limit": limit,
            "sample": "random"})
        return run_export(spark, config.model_copy(update={"export": cfg}))

    export(levels[0], "warmup", limit=1000)  # starts the Python workers
    rows = load_arrays(Path(args.input), max(args.pil_sample, args.notebook_sample))
    pil_rows, nb_rows = rows[: args.pil_sample], rows[: args.notebook_sample]

    times: dict[str, list[float]] = {}
    for repeat in range(args.repeats):
        for level in levels:
            summary = export(level, f"ours-{level}")
            assert summary["files"] == total, summary
            times.setdefault(f"ours@{level}", []).append(summary["seconds"])
            seconds = pil_loop(pil_rows, work / f"pil-{level}-{repeat}", level)
            times.setdefault(f"pil@{level}", []).append(seconds / len(pil_rows) * total)
        seconds = notebook_loop(nb_rows, work / f"notebook-{repeat}")
        times.setdefault("notebook", []).append(seconds / len(nb_rows) * total)
        print(f"repeat {repeat + 1}/{args.repeats}: "
              + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in times.items()), flush=True)

    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"\nmedians for {total} images ({args.repeats} repeats; PIL extrapolated from "
          f"{len(pil_rows)}, notebook from {len(nb_rows)} images):")
    for name, seconds in median.items():
        print(f"  {name:<10} {seconds:7.1f} s  {total / seconds:8.0f} images/s")
    print("ratios (throughput of ours / baseline):")
    for level in levels:
        ours = median[f"ours@{level}"]
        print(f"  ours@{level} vs bare PIL@{level}: {median[f'pil@{level}'] / ours:5.2f}x  "
              f"(target >= 1.6x)")
        print(f"  ours@{level} vs notebook imsave: {median['notebook'] / ours:5.2f}x  "
              f"(target >= 8x)")
    spark.stop()
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
