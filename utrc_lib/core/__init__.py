"""The algorithm, host-free: config and its layer schedule (config.py); importance metrics, the method
registry returning a `Plan` and one anchor's reduction rounds, with the feature-statistics and
matching kernels (methods.py); the plan, how it is built and applied, with the merge kernel (plan.py);
SSM-native methods, the authors' reference mode, loop-based twins, FLOPs accounting. Imports torch
only (no transformers, no mamba_ssm)."""
