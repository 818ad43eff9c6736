"""Where the algorithm meets a model: `apply` / `Handle`, the capture of the SSM output and the
timescale, one layer loop per host library (transformers Mamba / Mamba-2, mamba-ssm), model loading
and checkpoint conversion."""
