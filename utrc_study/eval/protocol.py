"""Evaluation protocols: how a reduced model is scored (issue 26).

  leak_free  (default) each request's scored continuation is protected (per-sample protect_last),
             merges are causal where the method allows it, every sample removes r from its own length,
             and the methods are the published ones (EViT keeps the top-k, PuMer prunes then merges).
  authors    what the authors' released code does (docs/method.md §2): nothing is protected and the
             last n rows of the SHORTENED sequence are scored, whichever positions they now stand for;
             merges are non-causal (their code has no causal constraint); r comes from the padded batch
             length for every sample; their EViT keeps the lowest-scoring tokens (`evit_reference`) and
             their "PuMer" is plain ToMe bipartite merging (`tome`).

`resolve_protocol(config, protocol)` turns a config into (the config to run, protect); every scoring
row records the protocol and the method that actually ran.
"""
from __future__ import annotations

from typing import Optional

from utrc_lib.core.config import ReductionConfig

PROTOCOLS = ("leak_free", "authors")
# the authors' code runs these implementations under the published names
AUTHORS_METHODS = {"evit": "evit_reference", "pumer": "tome"}


def check_protocol(protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; valid: {', '.join(PROTOCOLS)}")
    return protocol


def resolve_protocol(config: Optional[ReductionConfig], protocol: str = "leak_free"
                     ) -> tuple[Optional[ReductionConfig], bool]:
    """(config to run, protect the scored tail) for `protocol`. Dense (None) is the same under both."""
    check_protocol(protocol)
    if protocol == "leak_free":
        return config, True
    if config is None:
        return None, False
    run = config.replace(method=AUTHORS_METHODS.get(config.method, config.method), causal=False,
                         ratio_basis="batch", protect_last=0, protect_from=None)
    return run, False


def resolve_scoring(config: Optional[ReductionConfig], protocol: Optional[str], protect: bool):
    """(config, protect, protocol name) of one scoring call: the protocol's (`resolve_protocol`) when
    `protocol` is given, else the config as given with `protect`, named "leak_free" / "unprotected"."""
    if protocol is not None:
        config, protect = resolve_protocol(config, protocol)
        return config, protect, protocol
    return config, protect, "leak_free" if protect else "unprotected"
