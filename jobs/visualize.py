"""Contact sheets (PNG) of labelled images from image Parquet: one per split and one per class.

    python jobs/visualize.py --config conf/local.yaml --set visualize.one_hot=true
    spark-submit jobs/visualize.py --config conf/cluster.yaml
"""

import sys

from pipelines.run.cli import run_job
from pipelines.stages.visualize import run_visualize


def main(argv=None) -> int:
    return run_job("visualize", run_visualize, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
