"""Spark deep-learning pipelines for image classification: a Spark ML library and an application.

The tree is the architecture; each layer imports only the layers below it (import-linter
contracts in ``pyproject.toml``, run by ``make lint`` and the tests):

* :mod:`pipelines.run`: the application's shell: command line, SparkSession, logging, the
  pipeline runner, stage manifests and the run report.
* :mod:`pipelines.stages`: one module per job stage (ingest, visualize, export, augment,
  transfer, train_cnn, score) and the shared evaluation (metrics and plots).
* :mod:`pipelines.config`: the configuration as validated data (no Spark, no TensorFlow).
* :mod:`pipelines.ml`: the library, sparkdl's successor: Spark ML stages, the batch-inference
  engine, the Keras application registry and CNN architectures. Its public API is importable
  from ``pipelines.ml``.
* :mod:`pipelines.io`: storage (one atomic-write path), files written by tasks, image Parquet,
  IDX, digests.
* :mod:`pipelines.imaging`: image struct conversions, resizing, contact sheets, augmentation.
"""
