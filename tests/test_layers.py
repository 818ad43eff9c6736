"""The package's layers: imports point down only, and core imports no host library."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "utrc_lib"
ORDER = ["core", "hosts", "eval", "experiments", "report"]  # each may import the ones before it
ROOT_SHARED = {"environment", "__init__"}  # utrc_lib/environment.py: paths and versions, for every layer
CLI_SHIMS = {"bench.py", "flops.py", "figures.py", "scaleout.py"}  # `python -m utrc_lib.X` entry points
HOST_LIBRARIES = {"transformers", "mamba_ssm", "causal_conv1d", "lm_eval"}


def _imports(path: Path):
    """(absolute dotted module, line) of every import in `path` (relative imports resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    pkg = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
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


def _layer(module: str):
    parts = module.split(".")
    if parts[0] != "utrc_lib" or len(parts) < 2:
        return None
    return parts[1] if parts[1] in ORDER else None


def test_imports_point_down_only():
    bad = []
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG)
        if len(rel.parts) == 1:
            continue  # the package root (public names), environment.py and the CLI shims
        here = rel.parts[0]
        for mod, line in _imports(path):
            there = _layer(mod)
            if there is not None and ORDER.index(there) > ORDER.index(here):
                bad.append(f"utrc_lib/{rel}:{line} ({here}) imports {mod} ({there})")
            if mod.split(".")[0] == "utrc_lib" and len(mod.split(".")) == 2 and mod.split(".")[1] not in ORDER \
                    and mod.split(".")[1] not in ROOT_SHARED:
                name = mod.split(".")[1]
                if f"{name}.py" in CLI_SHIMS:
                    bad.append(f"utrc_lib/{rel}:{line} imports the CLI entry point {mod}")
    assert not bad, "imports that point up a layer:\n" + "\n".join(sorted(bad))


def test_core_imports_no_host_library():
    bad = [f"utrc_lib/core/{p.name}:{line} imports {mod}"
           for p in (PKG / "core").glob("*.py") for mod, line in _imports(p)
           if mod.split(".")[0] in HOST_LIBRARIES]
    assert not bad, "\n".join(bad)


def test_cli_shims_only_dispatch():
    for name in CLI_SHIMS:
        text = (PKG / name).read_text(encoding="utf-8")
        assert 'if __name__ == "__main__":' in text and len(text.splitlines()) <= 10, name
