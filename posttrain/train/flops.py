"""Training FLOPs counted from the architecture, and MFU against a measured matmul peak.

Conventions (model FLOPs, as in MFU; not hardware FLOPs):

* Only matrix products count, at `2 * m * n * k` for an `[m, k] @ [k, n]` product. Norms,
  activations, softmax, RoPE and the loss are left out; so is recomputation under activation
  checkpointing.
* Backward of a trained weight costs twice its forward (input gradient + weight gradient). A
  frozen weight (the base model under LoRA, a frozen head) costs once its forward (input gradient
  only). We count input gradients everywhere, including the first layer's, where autograd may skip
  them when nothing below needs a gradient.
* Attention scores and the weighted sum of values cost `2 * head_dim` each per (query, key)
  pair, per head: `4 * n_heads * head_dim * pairs` per layer forward, twice that backward. Pairs
  are counted exactly per document, causal and including the diagonal: `L * (L + 1) / 2` for a
  document of `L` tokens, and with a sliding window `w` each query sees `min(i, w)` keys. Packed
  documents do not attend to each other, so pairs come from the real document lengths.
* Pass only real documents: padding rows are compute the packer wasted, and leaving them out
  lets MFU show it.
* The LM head costs `2 * hidden * vocab` per position it is applied to; when the loss drops
  ignored positions before the head, pass the trained-position count as `head_tokens`.
* LoRA adds `2 * rank * (in + out)` per token per adapted linear forward, twice that backward.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class TransformerShape:
    """The sizes of a decoder-only transformer that its FLOPs depend on."""

    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    gated_mlp: bool = True  # gate/up/down (SwiGLU) rather than up/down
    tied_head: bool = False  # head shares the embedding matrix (matters only for what trains)
    sliding_window: int | None = None  # keys a sliding layer sees, the query itself included
    n_sliding_layers: int = 0  # how many of the layers use the window

    def __post_init__(self) -> None:
        if not 0 <= self.n_sliding_layers <= self.n_layers:
            raise ValueError(f"n_sliding_layers must be in [0, {self.n_layers}], got {self.n_sliding_layers}")
        if self.n_sliding_layers and not self.sliding_window:
            raise ValueError("n_sliding_layers > 0 needs a sliding_window")

    @classmethod
    def from_model_args(cls, args: Any) -> TransformerShape:
        """From our `ModelArgs` (read by attribute name; the MLP is gated in every family)."""
        layer_types = list(getattr(args, "layer_types", []) or [])
        n_sliding = sum(1 for t in layer_types if t == "sliding_attention")
        return cls(
            n_layers=args.num_layers,
            hidden=args.hidden_size,
            n_heads=args.num_heads,
            n_kv_heads=args.num_kv_heads,
            head_dim=args.head_dim,
            intermediate=args.intermediate_size,
            vocab=args.vocab_size,
            gated_mlp=True,
            tied_head=bool(getattr(args, "tie_embeddings", False)),
            sliding_window=getattr(args, "sliding_window", None) if n_sliding else None,
            n_sliding_layers=n_sliding,
        )

    def layer_linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear in one layer, by role."""
        q_out, kv_out = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        linears = {
            "q": (self.hidden, q_out),
            "k": (self.hidden, kv_out),
            "v": (self.hidden, kv_out),
            "o": (q_out, self.hidden),
            "up": (self.hidden, self.intermediate),
            "down": (self.intermediate, self.hidden),
        }
        if self.gated_mlp:
            linears["gate"] = (self.hidden, self.intermediate)
        return linears

    def matmul_params(self, include_head: bool = True) -> int:
        """Weights that take part in matrix products (embedding lookups excluded)."""
        per_layer = sum(i * o for i, o in self.layer_linears().values())
        return self.n_layers * per_layer + (self.hidden * self.vocab if include_head else 0)


@dataclass(frozen=True)
class LoraAdapter:
    """One adapted linear: `x @ A^T @ B^T` with A `[rank, in]` and B `[out, rank]`."""

    in_features: int
    out_features: int
    rank: int


def lora_adapters(shape: TransformerShape, rank: int, roles: Iterable[str]) -> list[LoraAdapter]:
    """Adapters on the given roles (`q`, `k`, `v`, `o`, `gate`, `up`, `down`) of every layer.

    With a model at hand, build the list from its adapted modules instead, e.g.
    `[LoraAdapter(m.in_features, m.out_features, m.rank) for m in lora_modules(model).values()]`.
    """
    linears = shape.layer_linears()
    unknown = set(roles) - set(linears)
    if unknown:
        raise ValueError(f"unknown linear roles {sorted(unknown)}; expected some of {sorted(linears)}")
    return [LoraAdapter(*linears[r], rank) for _ in range(shape.n_layers) for r in roles]


def attention_pairs(doc_lengths: Iterable[int], window: int | None = None) -> int:
    """(query, key) pairs a causal document mask allows, the diagonal included.

    A document of length L gives L(L+1)/2 pairs; with a window w, query i (1-based) sees
    min(i, w) keys: w(w+1)/2 + (L - w) * w when L > w.
    """
    total = 0
    for length in doc_lengths:
        length = int(length)
        if length < 0:
            raise ValueError(f"document length must be >= 0, got {length}")
        if window is None or length <= window:
            total += length * (length + 1) // 2
        else:
            total += window * (window + 1) // 2 + (length - window) * window
    return total


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one training step (or one forward), split by pass and by part.

    `linear`, `attention`, `head` and `lora` are forward + backward of that part.
    """

    forward: int
    backward: int
    linear: int
    attention: int
    head: int
    lora: int

    @property
    def total(self) -> int:
        return self.forward + self.backward


def training_flops(
    shape: TransformerShape,
    doc_lengths: Sequence[int],
    *,
    head_tokens: int | None = None,
    lora: Sequence[LoraAdapter] | None = None,
    train_head: bool | None = None,
) -> FlopCount:
    """Forward + backward FLOPs over the documents of one step (see the module conventions).

    Args:
        doc_lengths: token count of every real document processed (padding left out). Count
            what one rank runs and compare with one device's peak, or everything and the sum.
        head_tokens: positions the LM head is applied to; default every token.
        lora: the adapters when training LoRA; the base weights are then frozen.
        train_head: whether the head weight gets a gradient; default True for full fine-tuning
            and False under LoRA (set True when the head, or tied embeddings, are trained).
    """
    tokens = sum(int(n) for n in doc_lengths)
    head_tokens = tokens if head_tokens is None else head_tokens
    if not 0 <= head_tokens <= tokens:
        raise ValueError(f"head_tokens must be in [0, {tokens}], got {head_tokens}")
    frozen_base = lora is not None
    if train_head is None:
        train_head = not frozen_base

    linear_fwd = 2 * shape.matmul_params(include_head=False) * tokens
    n_full = shape.n_layers - shape.n_sliding_layers
    pairs = n_full * attention_pairs(doc_lengths)
    if shape.n_sliding_layers:
        pairs += shape.n_sliding_layers * attention_pairs(doc_lengths, shape.sliding_window)
    attention_fwd = 4 * shape.n_heads * shape.head_dim * pairs
    head_fwd = 2 * shape.hidden * shape.vocab * head_tokens
    lora_fwd = sum(2 * a.rank * (a.in_features + a.out_features) for a in lora or ()) * tokens

    linear_bwd = linear_fwd if frozen_base else 2 * linear_fwd
    attention_bwd = 2 * attention_fwd
    head_bwd = 2 * head_fwd if train_head else head_fwd
    lora_bwd = 2 * lora_fwd
    return FlopCount(
        forward=linear_fwd + attention_fwd + head_fwd + lora_fwd,
        backward=linear_bwd + attention_bwd + head_bwd + lora_bwd,
        linear=linear_fwd + linear_bwd,
        attention=attention_fwd + attention_bwd,
        head=head_fwd + head_bwd,
        lora=lora_fwd + lora_bwd,
    )


def mfu(flops: float, seconds: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the peak FLOP/s."""
    if seconds <= 0 or peak_flops <= 0:
        raise ValueError(f"seconds and peak_flops must be positive, got {seconds}, {peak_flops}")
    return flops / seconds / peak_flops


@functools.cache
def measure_matmul_peak(
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    n: int = 2048,
    reps: int = 5,
) -> float:
    """FLOP/s of an `n x n @ n x n` matmul on `device` (the fastest of `reps` after a warm-up).

    The fastest repetition, not the median: a peak is a maximum, and other work on the machine
    (worker processes starting beside the trainer) only ever slows a repetition down, which would
    shrink the denominator and inflate MFU. Cached per process and per arguments, so the cost
    (well under a second at 2048 on CPU) is paid once. A sensible MFU denominator on CPU, where
    no datasheet peak applies.
    """
    dev = torch.device(device)
    a = torch.randn(n, n, device=dev).to(dtype)
    b = torch.randn(n, n, device=dev).to(dtype)
    out = torch.empty(n, n, device=dev, dtype=dtype)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    torch.mm(a, b, out=out)  # warm-up: kernel selection, page faults
    sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        sync()
        times.append(time.perf_counter() - start)
    return 2 * n**3 / min(times)


def peak_for_precision(precision: str, device: str = "cpu") -> float:
    """Measured matmul peak for a `train.precision`: fp32 -> float32, bf16 modes -> bfloat16."""
    dtypes = {"fp32": torch.float32, "bf16_autocast": torch.bfloat16, "bf16": torch.bfloat16}
    if precision not in dtypes:
        raise ValueError(f"unknown precision {precision!r}; expected one of {sorted(dtypes)}")
    return measure_matmul_peak(dtypes[precision], device)
