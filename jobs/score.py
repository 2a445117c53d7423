"""Score images with a saved Keras model on the executors; write predictions as Parquet.

    python jobs/score.py --config conf/local.yaml
    python jobs/score.py --config conf/local.yaml --set score.input_format=png \
        --set score.input=out/png --set score.output=out/scores-png
    spark-submit jobs/score.py --config conf/cluster.yaml --set score.splits=null
"""

import sys

from pipelines.run.cli import run_job
from pipelines.stages.score import run_score


def main(argv=None) -> int:
    return run_job("score", run_score, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
