"""Ingest time for the 70,000 MNIST images beside a bare numpy decode of the same files.

    .venv/bin/python benchmarks/ingest_mnist.py [--repeats 3] [--cache data/mnist]

Both are measured in this run, on this machine: the baseline reads the four IDX files into
numpy arrays and does nothing else; the ingest is the job's work after the SparkSession is up
(read + validate the files, build the DataFrame, write Parquet partitioned by split, count
what was written). SparkSession start-up is reported apart. Prints medians and the ratio.
"""

from __future__ import annotations

import argparse
import gzip
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pipelines.config import load_config
from pipelines.run.session import build_session
from pipelines.stages.ingest import run_ingest
from pipelines.stages.mnist import FILE_NAMES, fetch_mnist


def bare_numpy_decode(folder: Path) -> int:
    total = 0
    for name in FILE_NAMES:
        path = next(p for p in (folder / name, folder / f"{name}.gz") if p.exists())
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        offset = 16 if "images" in name else 8
        total += np.frombuffer(raw, dtype=np.uint8, offset=offset).size
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache", default="data/mnist")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(
            Path(__file__).resolve().parents[1] / "conf" / "local.yaml",
            [f"mnist.cache_dir={args.cache}", f"output_root={tmp}", "spark.log_level=ERROR"],
        )
        files = fetch_mnist(config.mnist)
        folder = files.train_images.parent
        started = time.perf_counter()
        spark = build_session(config.spark, "benchmark-ingest")
        startup = time.perf_counter() - started
        run_ingest(spark, config)  # warm-up: JIT, Python workers, file cache
        bare, ours = [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            bare_numpy_decode(folder)
            bare.append(time.perf_counter() - t)
            t = time.perf_counter()
            summary = run_ingest(spark, config)
            ours.append(time.perf_counter() - t)
        spark.stop()
    rows = summary["rows"]
    b, o = statistics.median(bare), statistics.median(ours)
    print(f"cores: {os.cpu_count()}, repeats: {args.repeats}, images: {rows:,}")
    print(f"SparkSession start-up:          {startup:8.2f} s (once, not in the figures below)")
    print(f"bare numpy decode (baseline):   {b:8.3f} s  ({rows / b:,.0f} images/s)")
    print(f"ingest to Parquet (this job):   {o:8.3f} s  ({rows / o:,.0f} images/s)")
    print(f"ratio ingest / bare decode:     {o / b:8.1f} x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
