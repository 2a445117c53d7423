"""Train a Keras CNN from image Parquet (architecture from config) on the driver, on N executor
tasks (cnn.num_workers) or as an ensemble of K members trained in parallel (cnn.ensemble).

    python jobs/train_cnn.py --config conf/local.yaml
    python jobs/train_cnn.py --config conf/local.yaml --set cnn.architecture=seed
    python jobs/train_cnn.py --config conf/local.yaml --set cnn.ensemble=4 --set cnn.num_workers=1
    spark-submit jobs/train_cnn.py --config conf/cluster.yaml --set cnn.num_workers=2
"""

import sys

from pipelines.run.cli import run_job
from pipelines.stages.train_cnn import run_train_cnn


def main(argv=None) -> int:
    return run_job("train_cnn", run_train_cnn, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
