"""Every flag of every command-line tool has a one-line help text."""
import argparse
import importlib

import pytest

CLIS = ["utrc_lib.core.flops", "utrc_study.experiments.bench", "utrc_study.experiments.scaleout",
        "utrc_study.report.figures", "utrc_study.eval.__main__"]


def _parser_of(module_name, monkeypatch):
    """The ArgumentParser a CLI's main() builds (captured at parse time; nothing runs)."""
    seen = {}

    def capture(self, args=None, namespace=None):
        seen["parser"] = self
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    mod = importlib.import_module(module_name)
    entry = getattr(mod, "main", None) or getattr(mod, "parse_args")
    with pytest.raises(SystemExit):
        entry([])
    return seen["parser"]


@pytest.mark.parametrize("module_name", CLIS)
def test_every_flag_has_help(module_name, monkeypatch):
    parser = _parser_of(module_name, monkeypatch)
    missing = [a.option_strings[0] for a in parser._actions
               if a.option_strings and a.option_strings[0] != "-h" and not (a.help or "").strip()]
    assert not missing, f"{module_name}: flags without help: {missing}"
    assert parser.prog.startswith(("python -m utrc_lib", "python -m utrc_study")), parser.prog
