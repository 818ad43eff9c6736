"""Every ```python snippet of README.md runs as written, in order, in one namespace."""
import os
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def snippets() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.S | re.M)


def test_readme_has_snippets():
    assert len(snippets()) >= 3


@pytest.mark.timeout(600)
def test_readme_snippets_run_as_written(capsys):
    if not (README.parent / "data" / "models" / "tiny-mamba2" / "model.safetensors").is_file():
        pytest.skip("embedded model not present")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    namespace: dict = {"__name__": "__readme__"}
    for i, code in enumerate(snippets()):
        try:
            exec(compile(code, f"README.md snippet {i + 1}", "exec"), namespace)
        except Exception as e:  # name the snippet that fails
            raise AssertionError(f"README.md python snippet {i + 1} failed: {type(e).__name__}: {e}\n{code}") from e


def test_readme_quotes_the_pinned_transformers_versions():
    """The README's supported transformers versions are the ones pyproject.toml pins."""
    import re
    import tomllib
    deps = tomllib.loads((README.parent / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = next(d for d in deps if re.match(r"transformers\b", d)).replace(" ", "")
    readme = README.read_text(encoding="utf-8")
    quoted = re.findall(r"Supported: (transformers[^ ,]*(?:,[<>=!][^ ,]*)*)", readme)
    assert quoted == [spec], (quoted, spec)
