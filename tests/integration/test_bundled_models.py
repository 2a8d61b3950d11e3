"""The bundled-model import keeps a working model, and is idempotent."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from posttrain.models import hub


def test_import_writes_plain_hf_directory(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama"
    assert config["vocab_size"] == 49152
    assert (smollm2_dir / "model.safetensors").exists()
    assert (smollm2_dir / "tokenizer.json").exists()
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(smollm2_dir).chat_template


def test_imported_smollm2_answers_paris(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


def test_second_import_returns_cached_without_converting(smollm2_dir, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("an imported model must not be converted again")

    monkeypatch.setattr(hub, "_convert_gguf", fail)
    assert hub.import_model("smollm2-135m-instruct") == smollm2_dir


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="smollm2-135m-instruct") as err:
        hub.import_model("nonexistent")
    assert "gemma3-270m" in str(err.value)


def test_cli_import_unknown_name_exits_nonzero():
    proc = subprocess.run(
        [sys.executable, "-m", "posttrain", "models", "import", "nonexistent"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    assert "nonexistent" in proc.stderr
    for name in hub.BUNDLED:
        assert name in proc.stderr


def test_cli_list_shows_every_bundled_model():
    proc = subprocess.run(
        [sys.executable, "-m", "posttrain", "models", "list"],
        capture_output=True,
        text=True,
        env={"COLUMNS": "200", **__import__("os").environ},
    )
    assert proc.returncode == 0, proc.stderr
    for name in hub.BUNDLED:
        assert name in proc.stdout


def test_interrupted_import_is_redone(tmp_path, monkeypatch):
    """A directory without the completion marker (a crashed import) is converted again."""
    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text("{}")
    calls = []

    def fake_convert(gguf_path, target):
        calls.append(target)
        (target / "config.json").write_text('{"ok": true}')

    monkeypatch.setattr(hub, "_convert_gguf", fake_convert)
    monkeypatch.setitem(
        hub.BUNDLED,
        "fake",
        hub.BundledModel("fake", "json", "fake==0", "test", lambda: tmp_path / "x.gguf"),
    )
    assert hub.import_model("fake", out) == out
    assert len(calls) == 1
    assert json.loads((out / "config.json").read_text()) == {"ok": True}
    assert hub.is_imported(out)


@pytest.mark.slow
def test_imported_gemma3_generates_coherent_text():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = hub.import_model("gemma3-270m")
    config = json.loads((model_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["vocab_size"] == 262144
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    text = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "France" in text
