"""The job stages, one module each: ``run_<stage>(spark, config) -> summary``, plus evaluation."""
