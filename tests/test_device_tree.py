"""scripts/device_tree.py: `out` leaves only what a device job needs in the tree, `in` restores the tree
exactly, and a second `out` before `in` is refused."""
import hashlib
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "device_tree.py"
FILES = ["utrc_lib/a.py", "utrc_study/b.py", "scripts/c.py", "pyproject.toml", "tests/test_x.py", "notebooks/01_x.py",
         "data/models/depth-mamba2-64/model.safetensors", "data/models/depth-mamba2-64/config.json",
         "data/models/depth-mamba2-12/config.json", "data/models/tiny-mamba2/config.json",
         "data/benchmarks_v2/cloze_v2.jsonl", "data/benchmarks_v2/docs.jsonl", "data/tokenizer_v2/tokenizer.json",
         "figures/08_depth/evidence/items.parquet", "figures/01_main_results/evidence/items.parquet",
         "figures/01_main_results/plot.png", "docs/x.md"]


def _repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    for f in FILES:
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        (root / f).write_text(f"content of {f}\n")
    (root / ".gitignore").write_text(".cache/\n")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    return root


def _run(root: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--repo", str(root), *args], capture_output=True, text=True)


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in root.rglob("*") if p.is_file() and ".git" not in p.parts and ".cache" not in p.parts}


def test_depth_job_keeps_code_model_and_v2_data_then_restores(tmp_path):
    root = _repo(tmp_path)
    before = _snapshot(root)
    r = _run(root, "out", "depth", "--models", "depth-mamba2-64")
    assert r.returncode == 0, r.stderr
    left = set(_snapshot(root))
    assert "data/models/depth-mamba2-64/model.safetensors" in left and "utrc_lib/a.py" in left
    assert "data/benchmarks_v2/cloze_v2.jsonl" in left and "figures/08_depth/evidence/items.parquet" in left
    for gone in ("data/benchmarks_v2/docs.jsonl", "data/models/depth-mamba2-12/config.json", "tests/test_x.py",
                 "figures/01_main_results/plot.png", "docs/x.md", "notebooks/01_x.py"):
        assert gone not in left, gone
    again = _run(root, "out", "prefill")
    assert again.returncode == 2 and "not undone" in again.stderr
    assert _run(root, "in").returncode == 0
    assert _snapshot(root) == before


def test_jobs_in_a_row_restore_exactly(tmp_path):
    """Empty folders an `in` leaves in the stash must not swallow the next `out` (a moved folder landing
    inside a leftover one)."""
    root = _repo(tmp_path)
    before = _snapshot(root)
    for job in ("depth", "prefill", "evidence", "depth"):
        assert _run(root, "out", job).returncode == 0
        kept = set(_snapshot(root))
        if job == "prefill":
            assert kept == {"utrc_lib/a.py", "utrc_study/b.py", "scripts/c.py", "pyproject.toml", "tests/test_x.py",
                            ".gitignore"}
        if job == "evidence":
            assert "figures/01_main_results/evidence/items.parquet" in kept and "notebooks/01_x.py" in kept
            assert "figures/01_main_results/plot.png" not in kept and "data/models/tiny-mamba2/config.json" in kept
        assert _run(root, "in").returncode == 0
        assert _snapshot(root) == before


def test_unknown_model_is_refused(tmp_path):
    root = _repo(tmp_path)
    r = _run(root, "out", "depth", "--models", "depth-mamba2-99")
    assert r.returncode == 2 and "depth-mamba2-99" in r.stderr
    assert not (root / ".cache" / "device_tree" / "moved.json").exists()


def test_in_merges_into_folders_the_call_recreated(tmp_path):
    """The call's results come back into a folder `out` moved away (the first 09 evidence): `in` merges,
    keeping the new files, and leaves only true clashes in the stash."""
    root = _repo(tmp_path)
    assert _run(root, "out", "prefill").returncode == 0
    assert not (root / "figures").exists()
    new = root / "figures" / "01_main_results" / "evidence" / "new.parquet"
    new.parent.mkdir(parents=True)
    new.write_text("from the device\n")
    r = _run(root, "in")
    assert r.returncode == 0, r.stderr
    assert new.read_text() == "from the device\n"
    assert (root / "figures/01_main_results/evidence/items.parquet").is_file()
    assert (root / "figures/01_main_results/plot.png").is_file() and (root / "docs/x.md").is_file()
    # a clash: the same file recreated by the call stays in the stash and is named
    assert _run(root, "out", "prefill").returncode == 0
    clash = root / "docs" / "x.md"
    clash.parent.mkdir(parents=True)
    clash.write_text("changed\n")
    r = _run(root, "in")
    assert r.returncode == 1 and "docs/x.md" in r.stderr and clash.read_text() == "changed\n"


def test_ignored_weights_are_listed_to_carry_and_counted(tmp_path):
    root = _repo(tmp_path)
    (root / ".gitignore").write_text(".cache/\ndata/models/depth-mamba2-12/model.safetensors\n")
    (root / "data/models/depth-mamba2-12/model.safetensors").write_bytes(b"w" * 2_000_000)
    r = _run(root, "out", "depth", "--models", "depth-mamba2-12")
    assert r.returncode == 0, r.stderr
    assert 'carry: ["data/models/depth-mamba2-12/model.safetensors"]' in r.stdout
    assert "2.0 MB" in r.stdout or "2.1 MB" in r.stdout   # the carried weights count toward the limit
    assert _run(root, "in").returncode == 0
