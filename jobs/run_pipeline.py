"""Run the whole pipeline (ingest, visualize, export, augment, transfer, train_cnn, score,
report) in one SparkSession; stages whose manifests match are skipped.

    python jobs/run_pipeline.py --config conf/local.yaml
    python jobs/run_pipeline.py --config conf/local.yaml --from export --force
    python jobs/run_pipeline.py --config conf/local.yaml --only ingest,visualize
    spark-submit --master spark://master-host:7077 --archives dist/env.tar.gz#environment \
        jobs/run_pipeline.py --config conf/cluster.yaml      # set-up: docs/cluster.md

Exit codes: 0 every selected stage succeeded or was up to date, 1 a stage failed (the log names
it and the cause), 2 bad usage or configuration (nothing was started), 3 another run holds the
output root's lock (nothing was written).
"""

import sys

from pipelines.run.cli import run_job
from pipelines.run.runner import add_pipeline_arguments, pipeline_job


def main(argv=None) -> int:
    return run_job("run_pipeline", pipeline_job, argv, __doc__,
                   add_arguments=add_pipeline_arguments)


if __name__ == "__main__":
    sys.exit(main())
