"""Augment PNG partitions (or image Parquet) into augmented PNG partitions and image Parquet.

    python jobs/augment.py --config conf/local.yaml
    spark-submit jobs/augment.py --config conf/cluster.yaml --set augment.samples_per_image=5
"""

import sys

from pipelines.run.cli import run_job
from pipelines.stages.augment import run_augment


def main(argv=None) -> int:
    return run_job("augment", run_augment, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
