"""Ingest MNIST (or a folder of labelled images) into image Parquet partitioned by split.

    python jobs/ingest_mnist.py --config conf/local.yaml
    spark-submit jobs/ingest_mnist.py --config conf/cluster.yaml --set ingest.validation_size=10000
"""

import sys

from pipelines.run.cli import run_job
from pipelines.stages.ingest import run_ingest


def main(argv=None) -> int:
    return run_job("ingest_mnist", run_ingest, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
