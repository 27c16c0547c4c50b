"""The import rule of the layers (README "Layout"), enforced with import-linter on the code's own
imports: bench -> app -> actors | learner -> policy | score_store -> transport, one way only."""

import logging
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _lint(monkeypatch) -> int:
    from importlinter.cli import lint_imports

    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(ROOT))
    # import-linter configures logging with dictConfig, which disables every logger that exists
    # by then (the project's included): put them back for the tests that run after this one.
    loggers = logging.Logger.manager.loggerDict.values()
    enabled = [lg for lg in loggers if isinstance(lg, logging.Logger) and not lg.disabled]
    try:
        return lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True)
    finally:
        for lg in enabled:
            lg.disabled = False


def test_layers_are_kept(monkeypatch, capsys):
    assert _lint(monkeypatch) == 0, capsys.readouterr().out


def test_an_import_up_a_layer_breaks_the_contract(monkeypatch, capsys, tmp_path):
    """The check can fail: a transport module that imports the app layer is reported."""
    probe = ROOT / "spo3" / "transport" / "_probe_upward.py"
    probe.write_text("import spo3.app.cli\n")
    try:
        assert _lint(monkeypatch) == 1
        assert "spo3.transport._probe_upward -> spo3.app.cli" in capsys.readouterr().out
    finally:
        probe.unlink()


def test_the_library_does_not_import_the_benchmarks(monkeypatch, capsys):
    """bench/ is the top layer: an app module that imports it breaks the contract."""
    probe = ROOT / "spo3" / "app" / "_probe_bench.py"
    probe.write_text("import bench.compare.benchmark\n")
    try:
        assert _lint(monkeypatch) == 1
        assert "spo3.app._probe_bench -> bench.compare.benchmark" in capsys.readouterr().out
    finally:
        probe.unlink()
