"""Training cost of CNN architectures: images/s and CPU ms per image, in memory, in turns.

One epoch of each architecture after the other per round (so drifting load on a shared machine
hits them alike), median over rounds, on the first ``--rows`` train images held as numpy. On a
loaded machine compare the CPU time per image; an idle 2-core machine runs an epoch in about
CPU / 2.

    PYTHONPATH=. python benchmarks/cnn_architectures.py --images out/images \
        --architectures seed,default --rows 3072 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.config import load_config  # noqa: E402
from pipelines.ml.architectures import resolve_architecture  # noqa: E402
from pipelines.ml.datasets import open_split  # noqa: E402
from pipelines.ml.models import build_architecture, compile_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default="out/images", help="ingested image Parquet")
    parser.add_argument("--architectures", default="seed,default", help="comma-separated names")
    parser.add_argument("--config", default=None, help="a config with more cnn.architectures")
    parser.add_argument("--set", action="append", default=[], help="config overrides")
    parser.add_argument("--rows", type=int, default=3072)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=None, help="default: each one's own")
    args = parser.parse_args()

    import keras
    import numpy as np

    names = args.architectures.split(",")
    models = {}
    data = None
    for name in names:
        cfg = load_config(args.config, [*args.set, f"cnn.architecture={name}"]).cnn
        spec = resolve_architecture(cfg.architecture, cfg.architectures)
        if data is None:
            source = open_split([args.images], "train", tuple(spec.input_shape))
            images, labels = source.load(4096)
            data = (images[:args.rows].astype(np.float32) / 255,
                    keras.utils.to_categorical(labels[:args.rows], cfg.num_classes or 10))
        batch = args.batch or spec.batch_size
        keras.utils.set_random_seed(0)
        model = build_architecture(spec, cfg.num_classes or 10, name=name)
        compile_model(model, spec, -(-args.rows // batch), args.rounds)
        model.fit(data[0][:batch * 2], data[1][:batch * 2], batch_size=batch, verbose=0)
        models[name] = (model, batch, spec.shift_pixels)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.rounds):
        for name, (model, batch, _shift) in models.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            model.fit(*data, batch_size=batch, epochs=1, verbose=0)
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    rows = len(data[0])
    for name, (model, batch, shift) in models.items():
        print(json.dumps({
            "architecture": name, "batch": batch, "params": int(model.count_params()),
            "shift_pixels_not_timed": shift,
            "images_per_s": round(rows / statistics.median(wall[name])),
            "cpu_ms_per_image": round(1000 * statistics.median(cpu[name]) / rows, 3),
            "cpu_s_per_55k_epoch": round(55_000 * statistics.median(cpu[name]) / rows, 1),
        }))
    print(json.dumps({"rows": rows, "rounds": args.rounds, "load_average": os.getloadavg()}))


if __name__ == "__main__":
    main()
