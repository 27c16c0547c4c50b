"""docs/configuration.md is what spo3.app.settings_doc renders from the settings models."""

from __future__ import annotations

from pathlib import Path

from spo3.app import settings_doc
from spo3.score_store.score_math import ScoreParams


def test_configuration_doc_is_current() -> None:
    path = settings_doc.DEFAULT_PATH
    assert path.is_file(), f"{path} is missing: run `make docs`"
    assert path.read_text() == settings_doc.render(), f"{path} is stale: run `make docs`"
    assert settings_doc.main(["--check"]) == 0


def test_check_fails_on_a_stale_copy(tmp_path: Path) -> None:
    copy = tmp_path / "configuration.md"
    assert settings_doc.main(["--out", str(copy)]) == 0
    assert settings_doc.main(["--check", "--out", str(copy)]) == 0
    copy.write_text(copy.read_text().replace("| `g_max` |", "| `g_maximum` |"))
    assert settings_doc.main(["--check", "--out", str(copy)]) == 1
    copy.unlink()
    assert settings_doc.main(["--check", "--out", str(copy)]) == 1


def test_every_field_is_rendered_with_its_description() -> None:
    text = settings_doc.render()
    for section in settings_doc.SECTIONS:
        assert f"## {section.model.__name__}" in text
    for name, info in ScoreParams.model_fields.items():
        assert f"| `{name}` |" in text
        assert (info.description or "").split()[0] in text
