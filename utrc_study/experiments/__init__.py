"""Measurements built on core, hosts and eval: FLOPs accounting, timing, the benchmark CLI, resumable
sweeps (and their multi-process scale-out), the analyses behind the notebooks."""
