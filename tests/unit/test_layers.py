"""The import rule of the layers (README "Layout"), enforced with import-linter on the code's own
imports: app -> actors | learner -> policy | score_store -> transport, one way only."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _lint(monkeypatch) -> int:
    from importlinter.cli import lint_imports

    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(ROOT))
    return lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True)


def test_layers_are_kept(monkeypatch, capsys):
    assert _lint(monkeypatch) == 0, capsys.readouterr().out


def test_an_import_up_a_layer_breaks_the_contract(monkeypatch, capsys, tmp_path):
    """The check can fail: a transport module that imports the app layer is reported."""
    probe = ROOT / "services" / "transport" / "_probe_upward.py"
    probe.write_text("import services.app.cli\n")
    try:
        assert _lint(monkeypatch) == 1
        assert "services.transport._probe_upward -> services.app.cli" in capsys.readouterr().out
    finally:
        probe.unlink()
