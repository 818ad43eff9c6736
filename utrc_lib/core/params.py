"""Hyperparameters of methods and metrics: declared once, validated once, with clear errors.

A method (`utrc_lib.core.methods.Method.params`) or a metric (`utrc_lib.core.methods.Metric.params`)
declares its hyperparameters as `Param`s; `ReductionConfig(params={...})` passes values, and the
config resolves them once (`ReductionConfig.resolved_params`: every declared default filled in). An
unknown name, a value of the wrong type or outside its range raises ValueError naming the
parameter, its owner and the valid range.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence


@dataclass(frozen=True)
class Param:
    """One hyperparameter.

    kind: "int", "float" or "choice". lo / hi: bounds (None = open); lo_open / hi_open: exclude the
    bound. choices: the valid strings of a "choice". doc: one line for the error messages and docs.
    """

    name: str
    default: Any
    kind: str = "float"
    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple = ()
    doc: str = ""

    def range_text(self) -> str:
        if self.kind == "choice":
            return "one of " + ", ".join(repr(c) for c in self.choices)
        what = "an integer" if self.kind == "int" else "a number"
        if self.lo is None and self.hi is None:
            return what
        left = "(" if self.lo_open else "["
        right = ")" if self.hi_open else "]"
        lo = "-inf" if self.lo is None else f"{self.lo:g}"
        hi = "inf" if self.hi is None else f"{self.hi:g}"
        return f"{what} in {left}{lo}, {hi}{right}"

    def check(self, value, owner: str):
        """The validated value (ints stay ints, strings of numbers are parsed); ValueError otherwise."""
        bad = ValueError(f"{owner}: parameter {self.name!r} must be {self.range_text()}, got {value!r}")
        if self.kind == "choice":
            if not isinstance(value, str) or value.strip() not in self.choices:
                raise bad
            return value.strip()
        if isinstance(value, bool):
            raise bad
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise bad from None
        if not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
            raise bad
        if self.kind == "int":
            if float(value) != int(value):
                raise bad
            value = int(value)
        else:
            value = float(value)
        if self.lo is not None and (value < self.lo or (self.lo_open and value == self.lo)):
            raise bad
        if self.hi is not None and (value > self.hi or (self.hi_open and value == self.hi)):
            raise bad
        return value


def resolve(declared: Sequence[tuple[str, Sequence[Param]]], given: Mapping) -> dict:
    """Validate `given` against the parameters each owner declares; returns every default filled in.

    declared: [(owner name, its Params)]. A name declared by two owners takes one value for both.
    """
    table: dict[str, tuple[str, Param]] = {}
    for owner, params in declared:
        for p in params:
            table.setdefault(p.name, (owner, p))
    unknown = sorted(set(given) - set(table))
    if unknown:
        owners = ", ".join(o for o, _ in declared) or "this method and metric"
        valid = ", ".join(sorted(table)) or "none"
        raise ValueError(f"unknown parameter(s) {unknown} for {owners}; valid: {valid}")
    out = {name: p.default for name, (_, p) in table.items()}
    for name, value in given.items():
        owner, p = table[name]
        out[name] = p.check(value, owner)
    return out


def normalise(params) -> tuple:
    """A hashable, order-free form of a params mapping (or of a sequence of (name, value) pairs, as
    dataclasses.asdict / JSON give it back), or of a 'name=value;name=value' string."""
    if params is None:
        return ()
    if isinstance(params, str):
        pairs = []
        for item in params.replace(",", ";").split(";"):
            if not item.strip():
                continue
            if "=" not in item:
                raise ValueError(f"params: expected 'name=value' items separated by ';', got {item!r}")
            k, v = item.split("=", 1)
            pairs.append((k.strip(), v.strip()))
        params = pairs
    items = params.items() if isinstance(params, Mapping) else params
    try:
        pairs = [(str(k), v) for k, v in items]
    except (TypeError, ValueError):
        raise ValueError(f"params must be a mapping of name -> value, got {params!r}") from None
    names = [k for k, _ in pairs]
    if len(set(names)) != len(names):
        raise ValueError(f"params: a name is given twice in {params!r}")
    return tuple(sorted(pairs))
