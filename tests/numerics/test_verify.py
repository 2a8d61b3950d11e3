"""The logit verifier against transformers, on every family, variants and the bundled models."""

import json

import pytest
import torch

from posttrain.cli import main
from posttrain.models.verify import verify
from tests.numerics.conftest import VARIANTS


def test_tiny_family_passes_fp32(tiny_checkpoint):
    result = verify(tiny_checkpoint)
    assert result.passed, result
    assert result.max_abs_diff <= 1e-4 and result.tokens > 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_variants_pass_fp32(variant, variant_checkpoints):
    result = verify(variant_checkpoints[variant])
    assert result.passed, result


def test_tiny_family_passes_bf16(tiny_checkpoints):
    result = verify(tiny_checkpoints["gemma3"], dtype=torch.bfloat16)
    assert result.passed, result


def test_flex_backend_passes(tiny_checkpoints):
    assert verify(tiny_checkpoints["gemma3"], attention_backend="flex").passed


def test_cli_prints_json_and_fails_with_exit_1(tiny_checkpoints, capsys):
    assert main(["models", "verify", str(tiny_checkpoints["qwen3"]), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"family", "max_abs_diff", "mean_abs_diff", "tokens", "tolerance", "pass"}
    assert result["family"] == "qwen3" and result["pass"] is True
    assert (
        main(["models", "verify", str(tiny_checkpoints["qwen3"]), "--json", "--tolerance", "-1"])
        == 1
    )
    assert json.loads(capsys.readouterr().out)["pass"] is False


def test_smollm2_passes_fp32(smollm2_dir):
    result = verify(smollm2_dir)
    assert result.family == "llama"
    assert result.passed and result.max_abs_diff <= 1e-4, result


@pytest.mark.slow
def test_gemma3_270m_passes_fp32():
    from posttrain.models.hub import import_model

    try:
        model_dir = import_model("gemma3-270m")
    except FileNotFoundError as err:
        pytest.skip(str(err))
    result = verify(model_dir)
    assert result.family == "gemma3"
    assert result.passed and result.max_abs_diff <= 1e-4, result
