"""Train a Keras CNN on the driver from image Parquet (architecture from config).

    python jobs/train_cnn.py --config conf/local.yaml
    python jobs/train_cnn.py --config conf/local.yaml --set cnn.architecture=seed
    spark-submit jobs/train_cnn.py --config conf/cluster.yaml --set cnn.epochs=20
"""

import sys

from pipelines.run.cli import run_job
from pipelines.stages.train_cnn import run_train_cnn


def main(argv=None) -> int:
    return run_job("train_cnn", run_train_cnn, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
