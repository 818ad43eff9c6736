"""Reports of the notebooks: results.json (plotted numbers + parameters + provenance) and token renderings.

results.json layout (one per notebook, `figures/<notebook>/results.json`):
    {"notebook", "created", "parameters" (effective, after quick-mode overrides), "seed",
     "versions" (python, torch, transformers, numpy, utrc_lib, git commit), "flops_definition",
     "evaluation" (how scores were computed), "data" (the plotted numbers), ...extra}

Token rendering (00_walkthrough): `token_fates` turns the recorded plans of one prefill into a fate
per original token (kept to the end, or removed after layer l by merge / prune / hybrid);
`tokens_html` and `plot_token_fates` draw it as coloured text.
"""
from __future__ import annotations

import datetime as _dt
import html
import json
import math
import platform
import subprocess
from pathlib import Path
from typing import Optional, Sequence

from ..environment import REPO

FLOPS_DEFINITION = (
    "FLOPs cut = 1 - mean over layers of (tokens the layer processes / input tokens): the token-layer "
    "fraction, the only definition the authors' code gives (method.md 1); the same keep ratio rho is "
    "used at every reduction layer and solved for the target cut (utrc_lib.core.schedule.keep_ratio_for_flops). "
    "analytic_flops_cut = 1 - reduced / dense FLOPs of utrc_lib.flops (in_proj, conv, scan, out_proj, "
    "norms, LM head on the last position, plus the reduction's own importance / similarity / merge cost).")

EVALUATION = (
    "utrc_lib.evaluate (offline tasks in data/benchmarks: cloze = LAMBADA-style greedy acc + target ppl, "
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


def git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "utrc_lib"], cwd=REPO,
                               capture_output=True, text=True, timeout=10)
        if out.returncode:
            return None
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict:
    """Versions of the software that produced a result."""
    import numpy
    import torch
    import transformers

    from .. import __version__
    from ..experiments.sweep import code_version

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "numpy": numpy.__version__,
            "utrc_lib": __version__, "utrc_code_version": code_version(), "git_commit": git_commit(),
            "platform": platform.platform(), "torch_threads": torch.get_num_threads()}


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


def write_results(out_dir, notebook: str, *, parameters: dict, data: dict, seed: int,
                  figures: Sequence[str] = (), **extra) -> Path:
    """Write `out_dir/results.json` and return its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"notebook": notebook, "created": _dt.datetime.now().isoformat(timespec="seconds"),
           "parameters": parameters, "seed": seed, "versions": versions(),
           "flops_definition": FLOPS_DEFINITION, "evaluation": EVALUATION,
           "figures": sorted(figures), **extra, "data": data}
    path = out / "results.json"
    path.write_text(json.dumps(jsonable(doc), indent=1, allow_nan=False) + "\n")
    return path


# -- token fates ----------------------------------------------------------------------------------
def token_fates(history: Sequence[dict], num_tokens: int, protect_from: Optional[int] = None) -> list[dict]:
    """Fate of each original token of a single-sample prefill, from its recorded reduction history.

    Args:
        history: `handle.last_reducer.history` of a batch-1 prefill run with plan recording on
            (`handle.options(record=True)`, as `utrc_lib.experiments.analysis.run(..., record=True)` does); entries need "plan".
        num_tokens: input length N.
        protect_from: original index from which tokens were protected (shown as "protected").
    Returns:
        one dict per original token: {"fate": kept | merged | hybrid | pruned | protected,
        "layer": reduction layer that removed it (None if kept), "into": original index of the kept
        token it was merged into (None if pruned / kept)}.
    A slot carries the identity of its base (kept) token, whatever position a causal merge gives it.
    """
    fates = [{"fate": "kept", "layer": None, "into": None} for _ in range(num_tokens)]
    if protect_from is not None:
        for i in range(protect_from, num_tokens):
            fates[i]["fate"] = "protected"
    identity = list(range(num_tokens))  # original token carried by each current slot
    for entry in history:
        if "plan" not in entry:
            raise ValueError("history has no plans: run the forward inside handle.options(record=True)")
        plan = entry["plan"]
        if plan.base.shape[0] != 1:
            raise ValueError("token_fates reads batch-1 traces")
        base = plan.base[0].tolist()
        n_src = int(entry["tokens_before"]) - int(entry["tokens_after"])
        src = plan.src[0].tolist()[:n_src]  # sources first, by position
        slot = plan.src_slot[0].tolist()
        w_h = plan.src_weight.get("hidden")
        w_r = plan.src_weight.get("residual")
        for j, s in enumerate(src):
            mh = w_h is not None and float(w_h[0, j]) > 0
            mr = w_r is not None and float(w_r[0, j]) > 0
            fate = "merged" if (mh and mr) else "hybrid" if (mr or mh) else "pruned"
            into = identity[base[slot[j]]] if (mh or mr) else None
            fates[identity[s]].update(fate=fate, layer=int(entry["layer"]), into=into)
        identity = [identity[b] for b in base]
    return fates


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

    Face colour = layer after which the token was removed (white = kept); hatching '///' = pruned in
    the hidden branch (pruned or hybrid); solid = merged; blue = protected.
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
        hatch = "////" if f["fate"] in ("pruned", "hybrid") else None
        ax.add_patch(Rectangle((x, -y - 0.9), w, 0.85, facecolor=colour, edgecolor="#888888" if hatch else "none",
                               linewidth=0.3, hatch=hatch))
        ax.text(x + 0.05, -y - 0.47, shown, fontsize=fontsize, family="monospace", va="center", ha="left")
    ax.set_xlim(0, width_chars)
    ax.set_ylim(-nlines - 0.2, 0.1)
    if title:
        ax.set_title(title, fontsize=10, loc="left")
    handles = [Patch(facecolor=cols[l], label=f"removed after layer {l}") for l in layers]
    handles += [Patch(facecolor="white", edgecolor="#888888", hatch="////", label="pruned in hidden branch"),
                Patch(facecolor="white", edgecolor="#888888", label="kept")]
    if any(f["fate"] == "protected" for f in fates):
        handles.append(Patch(facecolor=cols["protected"], label="protected"))
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(6, len(handles)),
              fontsize=7, frameon=False)


def token_fate_counts(fates: Sequence[dict]) -> dict:
    """{fate: count} of a trace."""
    out: dict = {}
    for f in fates:
        out[f["fate"]] = out.get(f["fate"], 0) + 1
    return out
