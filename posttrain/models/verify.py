"""Logit verifier: our decoder against the `transformers` implementation of the same directory.

Two fixed multi-prompt batches are run through both models:

* **packed** — the prompts packed into two rows (position ids restarting per document, a trailing
  padding pseudo-document, `packed_attention`); the reference gets the same rows and position ids
  without a mask, from which transformers derives the same document masking.
* **padded** — the prompts left-padded into one batch with an attention mask (`padded_attention`),
  compared with the reference given the same mask and position ids.

Only real tokens are compared (padding is skipped), over the real vocabulary. Both sides see
tensors of the same shapes: fp32 results of a 30-layer model already move by ~1e-4 when only the
batch shape changes (different matmul blocking), which would swamp the tolerance. That packed rows
equal separate per-document forwards is tested directly on small models (tests/numerics).

The result reports the largest and mean absolute logit difference; it passes when the largest
difference is within the dtype's tolerance.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from posttrain.models.common.attention import packed_attention, padded_attention
from posttrain.models.common.decoder import Decoder
from posttrain.models.hf import load_hf

TOLERANCES = {torch.float32: 1e-4, torch.bfloat16: 0.5}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PROMPTS = (
    "The capital of France is Paris, and the capital of Italy is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Water boils at 100 degrees Celsius at sea level because",
    "Once upon a time, in a small village by the sea, there lived",
    "Question: What is 12 times 7? Answer:",
    "Photosynthesis converts light energy into chemical energy stored in glucose molecules.",
)
PACKED_ROWS = 2


@dataclass(frozen=True)
class VerifyResult:
    family: str
    max_abs_diff: float
    mean_abs_diff: float
    tokens: int
    tolerance: float
    passed: bool

    def to_dict(self) -> dict:
        return {
            "family": self.family,
            "max_abs_diff": self.max_abs_diff,
            "mean_abs_diff": self.mean_abs_diff,
            "tokens": self.tokens,
            "tolerance": self.tolerance,
            "pass": self.passed,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


class _DiffStats:
    """Running max / mean of |ours - reference| over compared token positions."""

    def __init__(self) -> None:
        self.max = 0.0
        self.sum = 0.0
        self.count = 0
        self.tokens = 0

    def add(self, ours: torch.Tensor, ref: torch.Tensor) -> None:
        diff = (ours.float() - ref.float()).abs()
        self.max = max(self.max, diff.max().item())
        self.sum += diff.sum().item()
        self.count += diff.numel()
        self.tokens += diff.shape[0]


def prompt_ids(model_dir: Path, vocab_size: int) -> list[list[int]]:
    """The fixed prompts through the directory's tokenizer, or seeded random ids without one."""
    if (model_dir / "tokenizer.json").is_file() or (model_dir / "tokenizer.model").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        return [tokenizer(text)["input_ids"] for text in PROMPTS]
    generator = torch.Generator().manual_seed(0)
    lengths = [12, 17, 23, 9, 30, 14]
    return [torch.randint(0, vocab_size, (n,), generator=generator).tolist() for n in lengths]


def pack_rows(
    docs: list[list[int]], rows: int, pad_id: int
) -> dict[str, torch.Tensor | int | list]:
    """Pack documents greedily into `rows` equal-length rows; each row ends with a padding
    pseudo-document (position ids restart at 0 for it too)."""
    assignment: list[list[int]] = [[] for _ in range(rows)]
    for i in sorted(range(len(docs)), key=lambda i: -len(docs[i])):
        shortest = min(range(rows), key=lambda r: sum(len(docs[j]) for j in assignment[r]))
        assignment[shortest].append(i)
    length = max(sum(len(docs[j]) for j in row) for row in assignment) + 3
    input_ids = torch.full((rows, length), pad_id, dtype=torch.long)
    position_ids = torch.zeros(rows, length, dtype=torch.long)
    boundaries, spans = [0], []  # spans: (doc index, row, start)
    for r, row in enumerate(assignment):
        start = 0
        for j in row:
            n = len(docs[j])
            input_ids[r, start : start + n] = torch.tensor(docs[j])
            position_ids[r, start : start + n] = torch.arange(n)
            spans.append((j, r, start))
            start += n
            boundaries.append(r * length + start)
        position_ids[r, start:] = torch.arange(length - start)
        boundaries.append((r + 1) * length)
    cu_seqlens = torch.tensor(boundaries, dtype=torch.int32)
    max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    return dict(
        input_ids=input_ids,
        position_ids=position_ids,
        cu_seqlens=cu_seqlens,
        max_seqlen=max_seqlen,
        spans=spans,
    )


def left_pad(docs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask and position ids (0 on padding) of left-padded documents."""
    length = max(len(d) for d in docs)
    input_ids = torch.full((len(docs), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(docs), length, dtype=torch.long)
    for i, doc in enumerate(docs):
        input_ids[i, length - len(doc) :] = torch.tensor(doc)
        mask[i, length - len(doc) :] = 1
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    return input_ids, mask, position_ids


@torch.no_grad()
def compare(
    ours: Decoder, reference: torch.nn.Module, docs: list[list[int]], pad_id: int
) -> _DiffStats:
    """Run both batches through both models and collect the logit differences."""
    device = ours.tok_embeddings.weight.device
    vocab = ours.vocab_size
    stats = _DiffStats()

    packed = pack_rows(docs, PACKED_ROWS, pad_id)
    rows, length = packed["input_ids"].shape
    attn = packed_attention(packed["cu_seqlens"].to(device), packed["max_seqlen"], rows, length)
    input_ids, position_ids = packed["input_ids"].to(device), packed["position_ids"].to(device)
    hidden = ours(input_ids, position_ids, attn)
    ref_logits = reference(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
    for j, r, start in packed["spans"]:
        real = slice(start, start + len(docs[j]))
        stats.add(ours.logits(hidden[r, real])[:, :vocab], ref_logits[r, real])

    input_ids, mask, position_ids = left_pad(docs, pad_id)
    input_ids, mask, position_ids = input_ids.to(device), mask.to(device), position_ids.to(device)
    hidden = ours(input_ids, position_ids, padded_attention(mask))
    ref_logits = reference(
        input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False
    ).logits
    for i, doc in enumerate(docs):
        real = slice(input_ids.shape[1] - len(doc), None)
        stats.add(ours.logits(hidden[i, real])[:, :vocab], ref_logits[i, real])
    return stats


def load_reference(
    model_dir: Path, dtype: torch.dtype, device: str, attn_implementation: str = "sdpa"
) -> torch.nn.Module:
    """The transformers model of the directory (its default sdpa attention unless told)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, attn_implementation=attn_implementation, local_files_only=True
    )
    return model.to(device).eval()


def verify(
    model_dir: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    attention_backend: str = "sdpa",
    tolerance: float | None = None,
    reference_attention: str = "sdpa",
) -> VerifyResult:
    """Compare our model with transformers on the directory's fixed prompt batches."""
    model_dir = Path(model_dir)
    if dtype not in TOLERANCES:
        raise ValueError(f"verify supports dtypes {list(DTYPES)}; got {dtype}")
    tolerance = TOLERANCES[dtype] if tolerance is None else tolerance
    ours = load_hf(
        model_dir, device=device, dtype=dtype, attention_backend=attention_backend
    ).eval()
    reference = load_reference(model_dir, dtype, device, reference_attention)
    config = ours.hf_source.config
    pad_id = config.get("pad_token_id")
    pad_id = 0 if pad_id is None else int(pad_id)
    docs = prompt_ids(model_dir, ours.vocab_size)
    stats = compare(ours, reference, docs, pad_id)
    return VerifyResult(
        family=ours.hf_source.spec.family,
        max_abs_diff=stats.max,
        mean_abs_diff=stats.sum / max(stats.count, 1),
        tokens=stats.tokens,
        tolerance=tolerance,
        passed=stats.max <= tolerance,
    )
