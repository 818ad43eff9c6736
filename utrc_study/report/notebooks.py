"""The notebooks as plain Python: jupytext sources, their paired .ipynb, and the setup every notebook runs.

Each notebook is written as a jupytext "percent" file, `notebooks/0X_<name>.py` (`# %% [markdown]`
text cells, `# %%` code cells, one `# %% tags=["parameters"]` cell); the paired `notebooks/0X_<name>.ipynb`
is generated from it (papermill and `python -m utrc_study.figures` execute the .ipynb):

    python -m utrc_study.report.notebooks sync     # rewrite every .ipynb from its .py (byte-stable)
    python -m utrc_study.report.notebooks check    # list the pairs whose cells disagree (exit 1 if any)

Generated files have stable cell ids (`cell-00`, `cell-01`, ...) and no outputs, so regenerating an
unchanged source gives a byte-identical file.

Inside a notebook, `ctx = setup("00_walkthrough", globals())` replaces the shared setup block: threads,
seed, warning filter, output folder, FigureSaver, plot style; `ctx.write_results(data=...)` records the
effective parameters, read by name from the notebook's parameters cell (its annotated assignments,
`name: type = value`) and valued from the notebook's globals at write time, i.e. after any quick-mode
overrides.

Output folder (`output_folder`): a notebook run by hand (JupyterLab, nbconvert, papermill without
parameters) leaves `out_dir` empty and writes to the scratch folder `.cache/notebooks/<name>` (a fresh
temp folder in quick mode), never into the committed figures/; the figures runner
(`python -m utrc_study.figures`, i.e. `make figures`) passes `out_dir=<repo>/figures/<name>` (see
`figures_folder`), the only thing that refreshes figures/.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Optional, Sequence

from utrc_lib.environment import CACHE, REPO

NOTEBOOKS = REPO / "notebooks"
FIGURES = REPO / "figures"
SCRATCH = CACHE / "notebooks"
SYNC_COMMAND = "python -m utrc_study.report.notebooks sync"
RUN_LABEL_ENV = "UTRC_RUN_LABEL"   # "fresh run, n=..." / "CPU subset, n=...": on every figure and in results.json
PARAMETERS_TAG = "parameters"
NOTEBOOK_METADATA = {
    "jupytext": {"formats": "ipynb,py:percent"},
    "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
    "language_info": {"name": "python"},
}


# -- .py <-> .ipynb --------------------------------------------------------------------------------
def sources(folder: Path = NOTEBOOKS) -> list[Path]:
    """The notebook sources `folder/[0-9][0-9]_*.py`, sorted."""
    return sorted(Path(folder).glob("[0-9][0-9]_*.py"))


def from_source(path: Path):
    """nbformat v4 notebook built from a percent-format source: stable ids, fixed metadata, no outputs."""
    import jupytext
    import nbformat

    text = Path(path).read_text(encoding="utf-8")
    nb = jupytext.reads(text, fmt="py:percent")
    fresh = nbformat.v4.new_notebook()
    for i, cell in enumerate(nb.cells):
        make = {"markdown": nbformat.v4.new_markdown_cell, "code": nbformat.v4.new_code_cell,
                "raw": nbformat.v4.new_raw_cell}[cell.cell_type]
        new = make(cell.source)
        tags = list(cell.metadata.get("tags", []))
        if tags:
            new.metadata["tags"] = tags
        new["id"] = f"cell-{i:02d}"
        fresh.cells.append(new)
    fresh.metadata.update(json.loads(json.dumps(NOTEBOOK_METADATA)))
    return fresh


def render(path: Path) -> str:
    """The .ipynb text generated from source `path` (what `sync` writes)."""
    import nbformat

    text = nbformat.writes(from_source(path))
    return text if text.endswith("\n") else text + "\n"


def paired(path: Path) -> Path:
    """notebooks/0X_name.py <-> notebooks/0X_name.ipynb."""
    path = Path(path)
    return path.with_suffix(".ipynb" if path.suffix == ".py" else ".py")


def sync(folder: Path = NOTEBOOKS, log=print) -> list[Path]:
    """Rewrite each `folder/0X_*.ipynb` from its `.py` where the text differs; returns the files written."""
    written = []
    for src in sources(folder):
        target, text = paired(src), render(src)
        if not target.is_file() or target.read_text(encoding="utf-8") != text:
            target.write_text(text, encoding="utf-8")
            written.append(target)
            log(f"wrote {target}")
    return written


def _cells(nb) -> list[tuple]:
    return [(c.cell_type, c.source, tuple(c.metadata.get("tags", []))) for c in nb.cells]


def out_of_sync(folder: Path = NOTEBOOKS, names: Optional[Sequence[str]] = None) -> list[str]:
    """One message per notebook whose .py and .ipynb disagree in cell types, sources or tags (or lack a pair).

    names: notebook stems to check (default: every 0X_* file in `folder`).
    """
    import nbformat

    folder = Path(folder)
    problems = []
    every = {p.stem for p in sources(folder)} | {p.stem for p in folder.glob("[0-9][0-9]_*.ipynb")}
    for name in sorted(every if names is None else set(names) & every):
        py, ipynb = folder / f"{name}.py", folder / f"{name}.ipynb"
        if not py.is_file():
            problems.append(f"{ipynb} has no source {py.name}: notebooks are written as .py (jupytext percent) "
                            f"and {ipynb.name} generated with `{SYNC_COMMAND}`")
            continue
        if not ipynb.is_file():
            problems.append(f"{py} has no generated {ipynb.name}: run `{SYNC_COMMAND}`")
            continue
        want, have = _cells(from_source(py)), _cells(nbformat.read(ipynb, as_version=4))
        if want != have:
            where = next((i for i, (a, b) in enumerate(zip(want, have)) if a != b), min(len(want), len(have)))
            problems.append(f"{ipynb} is out of sync with {py.name} (first difference at cell {where}; "
                            f"{len(want)} cells in the .py, {len(have)} in the .ipynb): run `{SYNC_COMMAND}`")
    return problems


# -- parameters ------------------------------------------------------------------------------------
def parameter_names(source: str) -> list[str]:
    """Names the parameters cell declares, in order: targets of annotated assignments `name: type = value`.

    Unannotated helpers in the cell (e.g. `DEFAULT_OUT = ...`) are not parameters.
    """
    names = []
    for node in ast.parse(source).body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id not in names:
            names.append(node.target.id)
    return names


def parameters_cell(name: str, folder: Path = NOTEBOOKS) -> str:
    """Source of the cell tagged `parameters` of notebook `name` (read from its .py, else its .ipynb)."""
    py = Path(folder) / f"{name}.py"
    if py.is_file():
        return percent_parameters_cell(py.read_text(encoding="utf-8"), name)
    import nbformat

    nb = nbformat.read(Path(folder) / f"{name}.ipynb", as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code" and PARAMETERS_TAG in cell.metadata.get("tags", []):
            return cell.source
    raise ValueError(f"notebook {name} has no cell tagged {PARAMETERS_TAG!r}")


def _percent_cells(text: str) -> list[tuple[str, list[str]]]:
    """(cell marker line, body lines) of a jupytext percent source; the header before the first
    marker is cell ("", lines)."""
    cells: list = [("", [])]
    for line in text.splitlines():
        if line.startswith("# %%"):
            cells.append((line, []))
        else:
            cells[-1][1].append(line)
    return cells


def _is_parameters_marker(marker: str) -> bool:
    return "[markdown]" not in marker and f'"{PARAMETERS_TAG}"' in marker.partition("tags=")[2]


def percent_parameters_cell(text: str, name: str = "notebook") -> str:
    """The parameters cell of a jupytext percent source, read without jupytext (plain text)."""
    for marker, body in _percent_cells(text):
        if marker and _is_parameters_marker(marker):
            return "\n".join(body).strip("\n")
    raise ValueError(f"notebook {name} has no cell tagged {PARAMETERS_TAG!r}")


def as_script(text: str, parameters: dict) -> str:
    """A percent source as one Python script with `parameters` assigned right after its parameters
    cell (what papermill's injected cell does); markdown cells are comments already."""
    out, injected = [], False
    for marker, body in _percent_cells(text):
        if marker:
            out.append(marker)
        out.extend(body)
        if marker and _is_parameters_marker(marker):
            out.append("# injected parameters")
            out.extend(f"{k} = {v!r}" for k, v in parameters.items())
            injected = True
    if not injected:
        raise ValueError(f"no cell tagged {PARAMETERS_TAG!r}")
    return "\n".join(out) + "\n"


# -- the setup every notebook runs -----------------------------------------------------------------
class NotebookContext:
    """What `setup` prepared for one notebook run.

    Attributes: name (notebook stem), out (Path of the output folder), save (plotting.FigureSaver into
    out), names (parameter names of the parameters cell), namespace (the notebook's globals).
    """

    def __init__(self, name: str, namespace: dict, out: Path, save, names: Sequence[str]):
        self.name, self.namespace, self.out, self.save, self.names = name, namespace, out, save, list(names)
        self.started = time.perf_counter()

    def parameters(self) -> dict:
        """{name: current value} of every parameter, read from the notebook's globals now."""
        missing = [n for n in self.names if n not in self.namespace]
        if missing:
            raise KeyError(f"{self.name}: parameters {missing} are declared but not defined")
        return {n: self.namespace[n] for n in self.names}

    def write_results(self, *, data: dict, **extra) -> Path:
        """results.json with the effective parameters, the seed and the figures saved so far, and the
        run log beside it (see `utrc_study.report.provenance.write_results`); extra keys go to the top
        level. Prints the path."""
        from .provenance import write_results

        if self.save.label:
            extra = {"run": {"label": self.save.label, "subset": "subset" in self.save.label}, **extra}
        source = self.namespace.get("evidence")
        if source:   # rendered from committed rows: say which, and what computed them
            from .evidence import provenance

            extra = {"evidence": provenance(source), **extra}
        path = write_results(self.out, self.name, parameters=self.parameters(), data=data,
                             seed=self.namespace["seed"], figures=self.save.names,
                             wall_s=time.perf_counter() - self.started, **extra)
        print("wrote", path)
        return path


def figures_folder(name: str) -> Path:
    """figures/<name> of the checkout: the `out_dir` the figures runner passes (nothing else writes there)."""
    return FIGURES / name


def output_folder(name: str, out_dir: Optional[str], quick: bool) -> Path:
    """Where a notebook run writes: `out_dir` when given (the runner passes `figures_folder(name)`),
    else the scratch folder `.cache/notebooks/<name>`, or a fresh temp folder in quick mode. Creates nothing
    (the temp folder aside)."""
    if out_dir:
        return Path(out_dir)
    if quick:
        return Path(tempfile.mkdtemp(prefix=f"utrc-{name}-"))
    return SCRATCH / name


def setup(name: str, namespace: dict, *, folder: Path = NOTEBOOKS,
          parameters_source: Optional[str] = None) -> NotebookContext:
    """The shared first step of every notebook; call as `ctx = setup("<notebook>", globals())`.

    Needs `quick`, `seed` and `out_dir` in `namespace` (the parameters cell). Sets torch to all CPU
    cores and seeds it with `seed`, silences the reference-kernel fallback warning, picks the output
    folder (`output_folder`: empty `out_dir` = scratch, so a hand run never overwrites the committed
    figures), writes the chosen folder back as `namespace["out_dir"]`, creates it, prints it and applies
    the plot style. parameters_source: the parameters cell's text (default: read from the notebook in
    `folder`).
    """
    import torch

    from . import plotting

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    torch.manual_seed(namespace["seed"])
    warnings.filterwarnings("ignore", message=".*falling back to its reference PyTorch implementation.*")
    out = output_folder(name, namespace["out_dir"], bool(namespace["quick"]))
    out.mkdir(parents=True, exist_ok=True)
    namespace["out_dir"] = str(out)
    label = os.environ.get(RUN_LABEL_ENV, "")   # set by the figures runner for runs that are not the committed ones
    save = plotting.FigureSaver(out, label=label)
    plotting.setup()
    names = parameter_names(parameters_source if parameters_source is not None else parameters_cell(name, folder))
    where = "" if out.resolve().is_relative_to(FIGURES.resolve()) else \
        " (scratch: only `make figures` refreshes figures/)"
    print(f"figures and results.json -> {out.resolve()}{where}")
    return NotebookContext(name, namespace, out, save, names)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["sync", "check"])
    ap.add_argument("--folder", default=str(NOTEBOOKS))
    a = ap.parse_args(argv)
    if a.command == "sync":
        written = sync(Path(a.folder))
        print(f"{len(written)} notebook(s) rewritten" if written else "all notebooks in sync")
        return 0
    problems = out_of_sync(Path(a.folder))
    for p in problems:
        print(p, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
