"""Where the algorithm meets a model: `apply` / `Handle`, the per-prefill `ForwardReducer` and the taps
of the SSM output and the timescale (handle.py), one layer loop per host library (transformers Mamba /
Mamba-2, mamba-ssm), model loading and checkpoint conversion."""
