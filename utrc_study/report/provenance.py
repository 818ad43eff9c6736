"""Reports of the notebooks: results.json (plotted numbers + parameters + provenance), the run log,
and token renderings.

results.json layout (one per notebook, `figures/<notebook>/results.json`); byte-identical when the
numbers are (no wall-clock time, no durations, no output paths in it):
    {"notebook", "parameters" (effective, after quick-mode overrides; without the output / cache
     folders), "seed", "computed_on" (the machines that computed the numbers: one record per source of
     rows, e.g. the committed evidence with its manifest's device, GPU and library versions, and the
     rows this run computed itself), "rendered_on" (the machine that ran the notebook and drew the
     figures: {"versions": `utrc_lib.environment.versions()` without git_commit, install-fixed ones
     only}), "flops_definition", "cut_fields", "evaluation" (how scores were computed), "figures",
     ...extra, "data" (the plotted numbers)}
The two machines differ when a notebook renders rows a GPU computed (01 / 02 / 04 from their evidence,
07 from its committed cache); a notebook that computes everything while it runs says so
(`COMPUTED_HERE`).
In every record of "data", a cut is named by what it is (`CUT_FIELDS`): `target_token_layer_cut` (the
token-layer cut a run was configured for; the sweep's `cut` / the benchmark's `flops_cut`),
`token_layer_cut` (the one reached) and `analytic_flops_cut`.

run_log.json beside it (not committed: listed in .gitignore): what differs between two runs of the
same code, {"notebook", "created", "wall_s", "git_commit", "locations" (out_dir, cache_dir),
"timings" ({"<path in data>": seconds} of every `seconds` field moved out of "data")}.
Measured timings that are the point of a notebook (03_efficiency's prefill / decode milliseconds)
are numbers, not bookkeeping, and stay in its results.json.

Token rendering (00_walkthrough): `token_fates` turns the recorded plans of one prefill into a fate
per original token (kept to the end, or removed after layer l by merge / prune / hybrid);
`tokens_html` and `plot_token_fates` draw it as coloured text.
"""
from __future__ import annotations

import datetime as _dt
import html
import json
import math
from pathlib import Path
from typing import Optional, Sequence

from utrc_lib import environment

FLOPS_DEFINITION = (
    "token-layer cut (the paper's FLOPs cut, x-axis of every accuracy figure) = 1 - mean over layers of "
    "(tokens the layer processes / input tokens): the only definition the authors' code gives "
    "(docs/method.md §1); the same keep ratio rho is used at every reduction layer and solved for the "
    "target cut (utrc_lib.core.config.keep_ratio_for_flops). analytic FLOPs cut (analytic_flops_cut) "
    "= 1 - reduced / dense FLOPs of utrc_lib.flops (in_proj, conv, scan, out_proj, norms, LM head on the "
    "last position, plus the reduction's own importance / similarity / merge cost).")

# Names of the record fields that hold a cut, in results.json (source name -> written name).
CUT_FIELDS = {"cut": "target_token_layer_cut", "flops_cut": "target_token_layer_cut"}
CUT_FIELD_MEANING = {
    "target_token_layer_cut": "token-layer cut the run was configured for (paper's definition; the "
                              "parameters cut / cuts / branch_cut; the paper's rows: the cut it reports)",
    "token_layer_cut": "token-layer cut the schedule reaches (equal to the target up to the keep-ratio solve)",
    "analytic_flops_cut": "1 - reduced / dense FLOPs counted by utrc_lib.flops",
}

# Parameters that say where a run writes or reads, not what it computes: recorded in the run log only
# (results.json names the evidence it was rendered from under "evidence", relative to the repository).
LOCATION_PARAMETERS = ("out_dir", "cache_dir", "evidence")
# versions that the install fixes (results.json); the machine's own (python build, platform, threads,
# CUDA, optional kernels) go to the run log, so another machine regenerates the same bytes
STABLE_VERSIONS = ("torch", "transformers", "tokenizers", "numpy", "utrc_lib", "utrc_code_version")
DIGITS = 6   # significant digits of every float in results.json (what the computations resolve)
TIMING_FIELD = "seconds"   # a record key equal to it or ending in "/seconds" is a duration

EVALUATION = (
    "utrc_study.eval.scorer.evaluate (offline tasks in data/benchmarks: cloze = LAMBADA-style greedy acc + target ppl, "
    "choice4 = HellaSwag-style acc/acc_norm, choice2 = PIQA-style acc, ppl = token perplexity of a "
    "64-token continuation); leak-free scoring: the scored continuation tokens are protected from "
    "reduction (protect_last) and read by original position, unless a row says protect=false.")

# Fates of a token in a reduction trace, with display colours (colour-blind safe, print readable).
FATE_LABELS = {
    "kept": "kept to the last layer",
    "merged": "merged (both branches)",
    "hybrid": "pruned in hidden branch, merged in residual",
    "pruned": "pruned (both branches)",
    "protected": "protected (never reduced)",
}
FATE_HATCH = {"hybrid": "////", "pruned": "xxxx"}   # matplotlib hatching per fate (none: merged / kept)


def jsonable(obj):
    """Recursively convert numpy / torch / pandas / tuples / NaN to plain JSON values (NaN -> None)."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        np = None
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "to_dict") and hasattr(obj, "columns"):  # DataFrame
        return jsonable(obj.to_dict(orient="records"))
    if hasattr(obj, "detach") and hasattr(obj, "tolist"):  # torch tensor
        return jsonable(obj.detach().cpu().tolist())
    if np is not None and isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if np is not None and isinstance(obj, np.generic):
        return jsonable(obj.item())
    if isinstance(obj, float):
        return None if (math.isnan(obj) or math.isinf(obj)) else obj
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _is_timing(key: str) -> bool:
    return key == TIMING_FIELD or key.endswith("/" + TIMING_FIELD)


def split_record_fields(obj, path: str = "data"):
    """(clean, timings): `obj` (already `jsonable`) with the cut fields renamed (`CUT_FIELDS`) and the
    duration fields removed, and {"<path>": seconds} of the removed durations."""
    timings: dict = {}

    def walk(o, where):
        if isinstance(o, dict):
            out = {}
            for k, v in o.items():
                if _is_timing(k):
                    timings[f"{where}/{k}"] = v
                    continue
                name = CUT_FIELDS.get(k, k)
                if name in out or (name != k and name in o):
                    raise ValueError(f"{where}: both {k!r} and {name!r} present")
                out[name] = walk(v, f"{where}/{name}")
            return out
        if isinstance(o, list):
            return [walk(v, f"{where}[{i}]") for i, v in enumerate(o)]
        return o

    return walk(obj, path), timings


COMPUTED_HERE = [{"source": "this run", "machine": "the rendering machine (rendered_on): every number was "
                                                  "computed while the notebook ran"}]


def records_machine(source, records) -> dict:
    """The "computed_on" entry of a benchmark file (records with "device", "gpu", "versions"): how many
    records, and each distinct machine (device, GPU, torch / transformers / CUDA / mamba-ssm versions)."""
    keep = ("torch", "cuda", "transformers", "mamba_ssm", "triton", "utrc_code_version")
    seen = []
    for r in records or []:
        m = {"device": r.get("device"), "gpu": r.get("gpu"),
             "versions": {k: v for k, v in (r.get("versions") or {}).items() if k in keep}}
        if m not in seen:
            seen.append(m)
    return {"source": str(source), "rows": len(records or []), "machine": seen}


def rendered_versions(doc: dict) -> dict:
    """The rendering machine's versions of a results.json (older files: the top-level "versions")."""
    return (doc.get("rendered_on") or {}).get("versions") or doc.get("versions") or {}


def results_document(notebook: str, *, parameters: dict, data: dict, seed: int,
                     figures: Sequence[str] = (), computed_on: Optional[list] = None, **extra) -> tuple[dict, dict]:
    """(results.json document, run-log fields) of one notebook run (see the module docstring).
    computed_on: where the numbers were computed (default `COMPUTED_HERE`)."""
    params = {k: v for k, v in parameters.items() if k not in LOCATION_PARAMETERS}
    every = environment.versions()
    commit = every.pop("git_commit", None)
    versions = {k: every[k] for k in STABLE_VERSIONS if k in every}
    machine = {k: v for k, v in every.items() if k not in STABLE_VERSIONS}
    clean, timings = split_record_fields(jsonable(data))
    doc = {"notebook": notebook, "parameters": params, "seed": seed,
           "computed_on": computed_on if computed_on is not None else COMPUTED_HERE,
           "rendered_on": {"versions": versions},
           "flops_definition": FLOPS_DEFINITION, "cut_fields": CUT_FIELD_MEANING, "evaluation": EVALUATION,
           "figures": sorted(figures), **extra, "data": clean}
    log = {"git_commit": commit, "machine": machine,
           "locations": {k: parameters[k] for k in LOCATION_PARAMETERS if k in parameters}, "timings": timings}
    return round_floats(jsonable(doc)), jsonable(log)


def round_floats(obj, digits: int = DIGITS):
    """Every float of a JSON structure to `digits` significant digits (integers and strings unchanged):
    the last digits of a float differ between machines (BLAS, threads), the first six do not."""
    if isinstance(obj, float):
        if obj == 0.0 or not math.isfinite(obj):
            return obj
        return float(f"{obj:.{digits - 1}e}")
    if isinstance(obj, dict):
        return {k: round_floats(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [round_floats(v, digits) for v in obj]
    return obj


def write_results(out_dir, notebook: str, *, parameters: dict, data: dict, seed: int,
                  figures: Sequence[str] = (), wall_s: Optional[float] = None, **extra) -> Path:
    """Write `out_dir/results.json` (byte-stable) and `out_dir/run_log.json` (this run's clock, commit,
    folders and durations); returns the path of results.json. wall_s: seconds the run took so far."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc, log = results_document(notebook, parameters=parameters, data=data, seed=seed, figures=figures, **extra)
    path = out / "results.json"
    path.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
    run_log = {"notebook": notebook, "created": _dt.datetime.now().isoformat(timespec="seconds"),
               "wall_s": None if wall_s is None else round(wall_s, 1), **log}
    (out / RUN_LOG).write_text(json.dumps(run_log, indent=1, allow_nan=False) + "\n")
    return path


RUN_LOG = "run_log.json"


# -- token fates (computed in utrc_study.experiments.analysis; drawn here) -------------------------
from ..experiments.analysis import token_fates  # noqa: E402,F401  (re-exported for the notebooks)


def fate_colours(layers: Sequence[int]) -> dict:
    """Colour of 'removed after layer l' for each anchor (light -> dark with depth) and of 'kept'."""
    import matplotlib

    cmap = matplotlib.colormaps["YlOrRd"]
    n = max(1, len(layers))
    cols = {int(l): matplotlib.colors.to_hex(cmap(0.25 + 0.65 * i / max(1, n - 1))) for i, l in enumerate(layers)}
    cols["kept"] = "#ffffff"
    cols["protected"] = "#c6dbef"
    return cols


def tokens_html(tokens: Sequence[str], fates: Sequence[dict], layers: Sequence[int], title: str = "") -> str:
    """HTML rendering: background = layer after which the token was removed; pruned tokens struck through,
    merged tokens underlined; hover shows the details."""
    cols = fate_colours(layers)
    parts = ["<div style='font-family:monospace;line-height:1.9;max-width:60em'>"]
    if title:
        parts.append(f"<b>{html.escape(title)}</b><br>")
    for i, (t, f) in enumerate(zip(tokens, fates)):
        colour = cols.get(f["layer"], cols["kept"]) if f["layer"] is not None else cols.get(f["fate"], "#fff")
        deco = {"pruned": "line-through", "hybrid": "underline dotted", "merged": "underline"}.get(f["fate"], "none")
        tip = f"#{i}: {FATE_LABELS[f['fate']]}"
        if f["layer"] is not None:
            tip += f" after layer {f['layer']}"
        if f["into"] is not None:
            tip += f", into token #{f['into']} {tokens[f['into']]!r}"
        text = html.escape(t).replace("\n", "&#8629;<br>")
        parts.append(f"<span title='{html.escape(tip, quote=True)}' style='background:{colour};"
                     f"text-decoration:{deco};white-space:pre'>{text}</span>")
    legend = " ".join(f"<span style='background:{cols[l]};padding:0 4px'>removed after layer {l}</span>" for l in layers)
    parts.append(f"<br><small>{legend} &nbsp; <u>merged</u> &nbsp; <s>pruned</s> &nbsp; "
                 f"<span style='text-decoration:underline dotted'>hybrid (pruned in hidden, merged in residual)</span>"
                 f"</small></div>")
    return "".join(parts)


def plot_token_fates(ax, tokens: Sequence[str], fates: Sequence[dict], layers: Sequence[int], *,
                     title: str = "", width_chars: Optional[int] = None, fontsize: float = 8.0) -> None:
    """Matplotlib rendering of `token_fates` as wrapped, coloured text (one box per token).

    Face colour = layer after which the token was removed (white = kept); hatching = fate (`FATE_HATCH`:
    '///' hybrid = pruned in the hidden branch, merged in the residual; 'xxx' pruned in both branches;
    none = merged in both); blue = protected. The legend names every fate present (`FATE_LABELS`).
    """
    from matplotlib.patches import Patch, Rectangle

    cols = fate_colours(layers)
    ax.set_axis_off()
    if width_chars is None:  # characters that fit the axes width (monospace glyph ~0.6 em wide)
        fig = ax.figure
        width_in = ax.get_position().width * fig.get_figwidth()
        width_chars = max(20, int(width_in * 72 / (0.61 * fontsize)))
    x, y = 0, 0
    boxes = []
    for t, f in zip(tokens, fates):
        shown = t.replace("\n", "\u21b5")
        w = max(1, len(shown))
        if x + w > width_chars:
            x, y = 0, y + 1
        boxes.append((x, y, w, shown, f))
        x += w
    nlines = y + 1
    for x, y, w, shown, f in boxes:
        colour = cols.get(f["layer"]) if f["layer"] is not None else cols.get(f["fate"], "#ffffff")
        hatch = FATE_HATCH.get(f["fate"])
        ax.add_patch(Rectangle((x, -y - 0.9), w, 0.85, facecolor=colour, edgecolor="#888888" if hatch else "none",
                               linewidth=0.3, hatch=hatch))
        ax.text(x + 0.05, -y - 0.47, shown, fontsize=fontsize, family="monospace", va="center", ha="left")
    ax.set_xlim(0, width_chars)
    ax.set_ylim(-nlines - 0.2, 0.1)
    if title:
        ax.set_title(title, fontsize=10, loc="left")
    handles = [Patch(facecolor=cols[l], label=f"removed after layer {l}") for l in layers]
    present = {f["fate"] for f in fates}
    for fate in ("merged", "hybrid", "pruned", "kept"):  # fate swatches: grey = any layer's colour
        if fate in present:
            handles.append(Patch(facecolor="white" if fate == "kept" else "#d9d9d9", edgecolor="#888888",
                                 hatch=FATE_HATCH.get(fate), label=FATE_LABELS[fate]))
    if "protected" in present:
        handles.append(Patch(facecolor=cols["protected"], label=FATE_LABELS["protected"]))
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(4, len(handles)),
              fontsize=7, frameon=False)


def token_fate_counts(fates: Sequence[dict]) -> dict:
    """{fate: count} of a trace."""
    out: dict = {}
    for f in fates:
        out[f["fate"]] = out.get(f["fate"], 0) + 1
    return out


def fate_counts_text(counts: dict) -> str:
    """Readable `token_fate_counts`, in `FATE_LABELS` order: "55 kept, 33 merged, 32 hybrid (...)"."""
    short = {"kept": "kept", "merged": "merged", "hybrid": "hybrid (pruned in hidden, merged in residual)",
             "pruned": "pruned", "protected": "protected"}
    return ", ".join(f"{counts[k]} {short[k]}" for k in FATE_LABELS if counts.get(k))
