"""Augment PNG partitions (or image Parquet) into augmented PNG partitions and image Parquet.

    python jobs/augment.py --config conf/local.yaml
    spark-submit jobs/augment.py --config conf/cluster.yaml --set augment.samples_per_image=5
"""

import sys

from pipelines.augment import run_augment
from pipelines.cli import run_job


def main(argv=None) -> int:
    return run_job("augment", run_augment, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
