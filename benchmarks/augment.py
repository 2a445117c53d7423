"""Augmentation throughput: the augment job on Spark vs ``Augmentor.Pipeline(dir).sample(n)``.

Both sides run the seed notebook's operation, rotate(probability 0.9, 25 degrees either way),
read PNG files and write one PNG per augmented image. Prints medians of repeats and the ratio.

    PYTHONPATH=. python benchmarks/augment.py                     # all 70,000 MNIST images
    PYTHONPATH=. python benchmarks/augment.py --augmentor-subset 5000 --repeats 3

Setup (not timed): the 70,000 ingested MNIST images (``--images``, image Parquet) are written as
PNG partitions ``split=<s>/label=<l>/<id>.png`` to a temporary folder; Augmentor's source folder
holds the first ``--augmentor-subset`` of them (hard links). The SparkSession is started first
and its start-up is reported apart. Augmentor's ``sample()`` is measured on that subset (its rate
does not depend on the folder size) with its default thread pool; the Spark job runs on all
70,000 images, one augmented sample each, PNG output only (as Augmentor writes), and once more
with PNG + Parquet output (what ``make run`` writes).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.config import load_config  # noqa: E402
from pipelines.imaging.image_struct import encode_png  # noqa: E402
from pipelines.run.session import build_session  # noqa: E402
from pipelines.stages.augment import run_augment  # noqa: E402


def write_png_tree(images_path: str, folder: Path) -> list[Path]:
    """Image Parquet (grey MNIST) -> PNG partitions; returns the files in id order."""
    import pyarrow.parquet as pq

    table = pq.read_table(images_path, columns=["id", "split", "label", "image"])
    ids, splits = table["id"].to_pylist(), table["split"].to_pylist()
    labels = table["label"].to_pylist()
    images = table["image"].combine_chunks()
    data = images.field("data").to_pylist()
    heights, widths = images.field("height").to_pylist(), images.field("width").to_pylist()
    paths = []
    for i in np.argsort(ids):
        target = folder / f"split={splits[i]}" / f"label={labels[i]}"
        target.mkdir(parents=True, exist_ok=True)
        pixels = np.frombuffer(data[i], np.uint8).reshape(heights[i], widths[i])
        path = target / f"{ids[i]}.png"
        path.write_bytes(encode_png(pixels))
        paths.append(path)
    return paths


def time_augmentor(source: Path, n: int) -> float:
    import Augmentor

    out = source.parent / "augmentor-out"
    shutil.rmtree(out, ignore_errors=True)
    pipeline = Augmentor.Pipeline(str(source), output_directory=str(out))
    pipeline.rotate(probability=0.9, max_left_rotation=25, max_right_rotation=25)
    started = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):  # tqdm's progress bar, per image
        pipeline.sample(n)
    seconds = time.perf_counter() - started
    written = sum(1 for _ in out.iterdir())
    if written != n:
        raise RuntimeError(f"Augmentor wrote {written} files, expected {n}")
    return seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", default="out/images")
    parser.add_argument("--augmentor-subset", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--master", default="local[2]")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="augment-bench-"))
    try:
        started = time.perf_counter()
        config = load_config(ROOT / "conf" / "local.yaml", [
            f"spark.master={args.master}", f"augment.input={work / 'png'}",
            f"augment.output={work / 'augmented'}", "augment.splits=null", "augment.limit=null",
            "augment.samples_per_image=1", f"augment.partitions={args.partitions}",
            "augment.sheet_rows=0",
        ])
        spark = build_session(config.spark, app_name="benchmark: augment")
        spark.sparkContext.setLogLevel("ERROR")
        startup = time.perf_counter() - started
        print(f"SparkSession start-up: {startup:.1f} s (not counted below)", flush=True)

        started = time.perf_counter()
        files = write_png_tree(args.images, work / "png")
        subset = work / "augmentor-src"
        subset.mkdir()
        for path in files[: args.augmentor_subset]:
            os.link(path, subset / path.name)
        n_all, n_sub = len(files), min(args.augmentor_subset, len(files))
        print(f"setup: {n_all} PNG files written in {time.perf_counter() - started:.1f} s; "
              f"Augmentor source: {n_sub} of them", flush=True)

        results: dict[str, list[float]] = {k: [] for k in ("augmentor", "spark_png",
                                                           "spark_png_parquet")}
        png_only = config.model_copy(update={"augment": config.augment.model_copy(
            update={"formats": ["png"]})})
        for repeat in range(args.repeats):
            results["augmentor"].append(n_sub / time_augmentor(subset, n_sub))
            for name, cfg in (("spark_png", png_only), ("spark_png_parquet", config)):
                # A fresh output, as Augmentor's: deleting the previous run's 70,000 files
                # (which the job does when it replaces an output) is not timed.
                shutil.rmtree(work / "augmented", ignore_errors=True)
                t = time.perf_counter()
                summary = run_augment(spark, cfg)
                seconds = time.perf_counter() - t
                if summary["samples_written"] != n_all:
                    raise RuntimeError(f"augment wrote {summary['samples_written']} != {n_all}")
                results[name].append(n_all / seconds)
            print(f"repeat {repeat + 1}: " + ", ".join(
                f"{k} {v[-1]:,.0f} img/s" for k, v in results.items()), flush=True)

        base = statistics.median(results["augmentor"])
        print()
        print(f"{'method':<46} {'images':>7} {'median img/s':>13} {'vs Augmentor':>13}")
        print(f"{'Augmentor.Pipeline.rotate(0.9,25,25).sample(n)':<46} {n_sub:>7} "
              f"{base:>13,.0f} {1.0:>12.2f}x")
        for name, label in (("spark_png", "augment job, PNG out"),
                            ("spark_png_parquet", "augment job, PNG + Parquet out")):
            rate = statistics.median(results[name])
            print(f"{label:<46} {n_all:>7} {rate:>13,.0f} {rate / base:>12.2f}x")
        print(f"\n{args.repeats} repeats, medians; master {args.master}, "
              f"{os.cpu_count()} cores; Spark start-up {startup:.1f} s excluded")
        spark.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
