"""Test top-1 of each member of a trained ensemble, and of the averages of its first k members.

``KerasImageEstimator(ensembleSize=K)`` (``cnn.ensemble`` in the train job) keeps each member
as ``<checkpoint_dir>/estimator/<uid>-<digest>-member<i>.keras`` beside the averaged model. This
loads them, runs each on the test split of the image Parquet and prints how much averaging
adds: whether more members (or more diverse ones) would help.

    PYTHONPATH=. python benchmarks/ensemble_members.py --images out/images \\
        --members 'out/_checkpoints/cnn/estimator/*-member*.keras'
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", default="out/images", help="image Parquet (ingest output)")
    p.add_argument("--members", required=True, help="glob of the members' .keras files")
    p.add_argument("--split", default="test")
    return p.parse_args(argv)


def member_number(path: str) -> int:
    match = re.search(r"member(\d+)\.keras$", path)
    if match is None:
        raise ValueError(f"not an ensemble member file (…-member<i>.keras). Received: {path!r}")
    return int(match.group(1))


def main(argv=None) -> int:
    args = parse_args(argv)
    files = sorted(glob.glob(args.members), key=member_number)
    if not files:
        print(f"no file matches --members {args.members!r}", file=sys.stderr)
        return 2
    import keras

    from pipelines.ml.datasets import open_split

    models = [keras.models.load_model(f) for f in files]
    shape = tuple(models[0].inputs[0].shape[1:])
    split = open_split([args.images], args.split, shape)
    images, labels = split.load(4096)  # rows per record batch read
    x = images.astype(np.float32) / 255.0  # as the estimator feeds its models
    probabilities = []
    for path, model in zip(files, models, strict=True):
        p = model.predict(x, batch_size=1024, verbose=0)
        probabilities.append(p)
        print(f"member {member_number(path)}: top-1 {(p.argmax(1) == labels).mean():.2%}")
    for k in range(2, len(probabilities) + 1):
        average = np.mean(probabilities[:k], axis=0)
        print(f"first {k} members averaged: top-1 {(average.argmax(1) == labels).mean():.2%}")
    print(f"({len(labels)} {args.split} images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
