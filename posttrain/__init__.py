"""posttrain: post-training for open-weight LLMs (SFT, DPO, distillation, GRPO)."""

__version__ = "0.1.0"
