"""Llama family: Llama 2/3 (incl. `llama3` RoPE scaling), SmolLM2, Mistral."""

from posttrain.models.llama.spec import SPEC

__all__ = ["SPEC"]
