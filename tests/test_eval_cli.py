"""`python -m utrc_study.eval`: flag help, argument checks before any model is loaded, --output handling.

None of these tests loads a model or runs lm-eval: the checks must fail first, and the one test of
a failing write replaces the evaluation with canned results.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from utrc_study.eval import __main__ as cli

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model (or running lm-eval) fails the test: argument errors must come first."""
    pytest.importorskip("lm_eval")
    from utrc_lib.integrations import lm_eval as lm_eval_adapter

    def refuse(*a, **k):
        raise AssertionError("a model was loaded although the arguments are invalid")

    monkeypatch.setattr(lm_eval_adapter.UTRCLM, "__init__", refuse)


def _usage_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_every_flag_has_help():
    parser = cli.build_parser()
    missing = [a.option_strings or a.dest for a in parser._actions if not (a.help or "").strip()]
    assert not missing, f"flags without help: {missing}"
    text = parser.format_help()
    assert "see --help" not in text
    assert "utrc_cloze" in text and "lambada_openai" in text  # --tasks states its real default


def test_ratio_without_method_is_a_usage_error(capsys, no_model):
    err = _usage_error(capsys, ["--flops-reduction", "0.2"])
    assert "--flops-reduction" in err and "--method" in err
    err = _usage_error(capsys, ["--method", "none", "--keep-ratio", "0.5"])
    assert "--keep-ratio" in err and "--method" in err
    err = _usage_error(capsys, ["--layers", "1,2", "--metric", "clip"])  # other reduction flags too
    assert "--metric" in err and "--layers" in err


def test_invalid_reduction_is_a_usage_error(capsys, no_model):
    assert "needs keep_ratio" in _usage_error(capsys, ["--method", "utrc"])
    assert "layers" in _usage_error(capsys, ["--method", "utrc", "--keep-ratio", "0.5", "--layers", "1,x"])
    assert "unknown method" in _usage_error(capsys, ["--method", "nope", "--keep-ratio", "0.5"])


def test_ratio_without_method_from_the_command_line():
    """The reported defect, end to end: it used to run dense and exit 0."""
    proc = subprocess.run([sys.executable, "-m", "utrc_study.eval", "--flops-reduction", "0.2"], cwd=ROOT,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout[-1000:] + proc.stderr[-1000:]
    assert "--flops-reduction given without --method" in proc.stderr


def test_model_args_go_through_the_config_builder():
    ns = cli.parse_args(["--method", "utrc", "--flops-reduction", "0.2", "--layers", "3;1", "--seed", "2"])
    args = cli.model_args_from(ns)
    assert args["method"] == "utrc" and args["flops_reduction"] == 0.2 and args["layers"] == [1, 3]
    assert args["seed"] == 2 and "causal" not in args  # the method's own default
    ns = cli.parse_args(["--method", "utrc_reference", "--keep-ratio", "0.7", "--no-protect"])
    assert cli.model_args_from(ns)["protect"] is False
    dense = cli.model_args_from(cli.parse_args([]))
    assert "method" not in dense and dense["pretrained"] == "tiny-mamba2"


def test_output_under_a_file_is_a_usage_error(tmp_path, capsys, no_model):
    blocker = tmp_path / "taken"
    blocker.write_text("a file, not a folder\n")
    err = _usage_error(capsys, ["--method", "utrc", "--flops-reduction", "0.2",
                                "--output", str(blocker / "sub" / "results.json")])
    assert "--output" in err and "is not a directory" in err
    assert "--output" in _usage_error(capsys, ["--output", str(tmp_path)])  # a folder is no output file
    assert cli.output_problem(str(tmp_path / "new" / "deeper" / "r.json")) is None


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs POSIX permissions, not root")
def test_output_in_a_read_only_folder_is_a_usage_error(tmp_path, capsys, no_model):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert "not writable" in _usage_error(capsys, ["--output", str(ro / "r.json")])
    finally:
        ro.chmod(0o700)


def test_results_printed_when_the_write_fails(tmp_path, monkeypatch, capsys):
    """The folder becomes a file during the run: the results still reach stdout, exit code 1."""
    pytest.importorskip("lm_eval")
    out = tmp_path / "out" / "results.json"
    canned = {"results": {"utrc_cloze": {"acc,none": 0.25}},
              "utrc": {"method": "utrc", "keep_ratio": 0.8, "layers": [1], "flops_reduction_token_layer": 0.2}}

    def fake_evaluate(ns, lm=None):
        (tmp_path / "out").write_text("now a file\n")
        return canned

    monkeypatch.setattr(cli, "evaluate", fake_evaluate)
    rc = cli.main(["--method", "utrc", "--flops-reduction", "0.2", "--output", str(out)])
    captured = capsys.readouterr()
    assert rc == 1
    assert "could not write --output" in captured.err
    assert "utrc: method=utrc keep_ratio=0.8" in captured.out
    assert json.loads(captured.out[captured.out.index("\n{") + 1:]) == canned
