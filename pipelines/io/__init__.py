"""Storage on any Spark path (one atomic-write path), files written by tasks, image Parquet, IDX."""
