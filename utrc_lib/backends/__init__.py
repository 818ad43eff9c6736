"""One small patch module per host library: transformers Mamba, transformers Mamba-2, mamba-ssm."""
