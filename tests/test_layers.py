"""The two packages and their layers: `utrc_lib` (the library) never imports `utrc_study` (the study
harness); inside each, imports point down only; core imports no host library."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LIB, STUDY = REPO / "utrc_lib", REPO / "utrc_study"
# each may import the ones before it (the library's root modules are shared by every layer)
ORDER = {"utrc_lib": ["core", "hosts", "integrations"], "utrc_study": ["eval", "experiments", "report"]}
LIB_ROOT = {"environment", "scoring", "__init__", "flops"}   # utrc_lib/<name>.py
CLI_SHIMS = {LIB / "flops.py", STUDY / "bench.py", STUDY / "figures.py", STUDY / "scaleout.py"}
HOST_LIBRARIES = {"transformers", "mamba_ssm", "causal_conv1d", "lm_eval"}


def _imports(path: Path):
    """(absolute dotted module, line) of every import in `path` (relative imports resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    pkg = parts[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[:len(pkg) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
                if node.module is None:  # from .. import x, y: each name may be a module
                    for a in node.names:
                        yield f"{mod}.{a.name}", node.lineno
                    continue
            else:
                mod = node.module
            yield mod, node.lineno


def _files(pkg: Path):
    return sorted(pkg.rglob("*.py"))


def test_library_never_imports_the_study_harness():
    bad = [f"{p.relative_to(REPO)}:{line} imports {mod}" for p in _files(LIB) for mod, line in _imports(p)
           if mod.split(".")[0] == "utrc_study"]
    assert not bad, "utrc_lib must not import utrc_study:\n" + "\n".join(bad)


def test_imports_point_down_only():
    bad = []
    for pkg in (LIB, STUDY):
        order = ORDER[pkg.name]
        for path in _files(pkg):
            rel = path.relative_to(pkg)
            if len(rel.parts) == 1:
                continue  # the package root (public names), shared root modules and the CLI shims
            here = rel.parts[0]
            for mod, line in _imports(path):
                parts = mod.split(".")
                if parts[0] != pkg.name or len(parts) < 2:
                    continue
                if parts[1] in order and order.index(parts[1]) > order.index(here):
                    bad.append(f"{pkg.name}/{rel}:{line} ({here}) imports {mod} ({parts[1]})")
                if pkg is LIB and len(parts) == 2 and parts[1] not in order and parts[1] not in LIB_ROOT:
                    bad.append(f"{pkg.name}/{rel}:{line} imports {mod}")
                if pkg is LIB and parts[1] == "flops" and len(parts) == 2:
                    bad.append(f"{pkg.name}/{rel}:{line} imports the CLI entry point {mod}")
                if pkg is STUDY and len(parts) == 2 and (STUDY / f"{parts[1]}.py") in CLI_SHIMS:
                    bad.append(f"{pkg.name}/{rel}:{line} imports the CLI entry point {mod}")
    assert not bad, "imports that point up a layer:\n" + "\n".join(bad)


def test_core_imports_no_host_library():
    bad = [f"utrc_lib/core/{p.name}:{line} imports {mod}"
           for p in (LIB / "core").glob("*.py") for mod, line in _imports(p)
           if mod.split(".")[0] in HOST_LIBRARIES]
    assert not bad, "\n".join(bad)


def test_importing_the_library_loads_no_harness_and_no_host_library():
    import subprocess
    import sys

    code = ("import sys, utrc_lib; bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "{'utrc_study', 'transformers', 'lm_eval', 'matplotlib', 'pandas'}); print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_cli_shims_only_dispatch():
    for path in CLI_SHIMS:
        text = path.read_text(encoding="utf-8")
        assert 'if __name__ == "__main__":' in text and len(text.splitlines()) <= 10, path
