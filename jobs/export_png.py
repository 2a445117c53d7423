"""Export image Parquet as PNG files, <output>/split=<split>/label=<label>/<id>.png, written by
the executors (any local path or URI: file://, hdfs://, s3a://...).

    python jobs/export_png.py --config conf/local.yaml
    python jobs/export_png.py -c conf/local.yaml --set export.limit=9 --set "export.splits=[train]"
    spark-submit jobs/export_png.py --config conf/cluster.yaml --set export.mode=skip
"""

import sys

from pipelines.run.cli import run_job
from pipelines.stages.export import run_export


def main(argv=None) -> int:
    return run_job("export_png", run_export, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
