"""Students made of a subset of a teacher's layers: the right weights, loadable by transformers."""

import json

import pytest
import torch

from posttrain.models.hf import load_hf
from posttrain.models.layer_drop import RECORD_FILE, drop_layers, init_student
from tests.tiny_models import build_byte_tokenizer, build_checkpoint_from_config, tiny_config


def four_layer_teacher(family, out_dir):
    config = tiny_config(family, vocab_size=len(build_byte_tokenizer()))
    config.num_hidden_layers = 4
    if family == "gemma3":
        config.layer_types = ["sliding_attention", "full_attention", "full_attention", "sliding_attention"]
    return build_checkpoint_from_config(config, out_dir)


def teacher_through(teacher, layers, ids):
    """The teacher's forward with only `layers` kept, by hand."""
    kept = torch.nn.ModuleList(teacher.layers[i] for i in layers)
    teacher.layers, full = kept, teacher.layers
    try:
        return teacher.logits(teacher(ids))
    finally:
        teacher.layers = full


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_student_is_the_teacher_with_layers_left_out(tmp_path, family):
    teacher_dir = four_layer_teacher(family, tmp_path / "teacher")
    teacher = load_hf(teacher_dir)
    ids = torch.randint(0, teacher.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    layers = [0, 3]
    student = drop_layers(teacher, layers)
    assert student.args.num_layers == 2
    assert student.args.layer_types == [teacher.args.layer_types[i] for i in layers]
    torch.testing.assert_close(student.logits(student(ids)), teacher_through(teacher, layers, ids), rtol=0, atol=0)

    out = init_student(teacher_dir, layers, tmp_path / "student")
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 2
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(ids).logits
    with torch.no_grad():
        ours = student.logits(student(ids))[..., : teacher.vocab_size]
    scale = float(ours.abs().max())
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5 * max(scale, 1.0))
    assert (out / "tokenizer_config.json").is_file()


def test_init_student_reuses_its_output_and_refuses_a_different_one(tmp_path):
    teacher_dir = four_layer_teacher("llama", tmp_path / "teacher")
    out = init_student(teacher_dir, [0, 2], tmp_path / "student")
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert init_student(teacher_dir, [0, 2], out) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    assert json.loads((out / RECORD_FILE).read_text())["layers"] == [0, 2]
    with pytest.raises(ValueError, match="with layers \\[0, 2\\]"):
        init_student(teacher_dir, [1, 3], out)


@pytest.mark.parametrize("layers, message", [([], "empty"), ([0, 4], "layer 4 does not exist"),
                                             ([2, 1], "strictly increasing"), ([1, 1], "strictly increasing")])
def test_bad_layer_lists_are_refused(tmp_path, layers, message):
    teacher = load_hf(four_layer_teacher("llama", tmp_path / "teacher"))
    with pytest.raises(ValueError, match=message):
        drop_layers(teacher, layers)


def test_init_student_refuses_a_bad_layer_list_before_reading_weights(tmp_path, monkeypatch):
    import posttrain.models.layer_drop as layer_drop

    teacher_dir = four_layer_teacher("llama", tmp_path / "teacher")
    monkeypatch.setattr(layer_drop, "load_hf", lambda *a, **k: pytest.fail("weights were read"))
    with pytest.raises(ValueError, match="layer 9 does not exist"):
        init_student(teacher_dir, [0, 9], tmp_path / "student")
    assert not (tmp_path / "student").exists()
