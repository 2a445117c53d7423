"""Transfer learning: DeepImageFeaturizer + LogisticRegression on image Parquet, evaluated on test.

Writes the PipelineModel, metrics.json and confusion_matrix.png under transfer.output, and says
in the metrics and the log which weights were used (weights: none is NOT transfer learning).

    python jobs/transfer.py --config conf/local.yaml
    spark-submit jobs/transfer.py --config conf/cluster.yaml --set transfer.weights=hdfs:///m/w.h5
"""

import sys

from pipelines.run.cli import run_job
from pipelines.stages.transfer import run_transfer


def main(argv=None) -> int:
    return run_job("transfer", run_transfer, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
