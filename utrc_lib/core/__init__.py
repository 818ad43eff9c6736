"""The algorithm, host-free: config and schedule, importance metrics, methods (registry) returning a
`Plan`, the per-forward reducer, kernels with their torch twins, loop-based twins. Imports torch only
(no transformers, no mamba_ssm)."""
