"""Losses through the LM head that never materialise the `[tokens, vocab]` logits.

    linear_cross_entropy(hidden, weight, labels, ...)   SFT loss (z-loss, label smoothing)
    linear_logprobs(hidden, weight, targets, ...)       per-token log-probs (+ entropy): DPO, GRPO
    linear_kl(hidden, weight, labels, teacher_...)      KL(teacher || student), recomputing backward
    linear_distill(hidden, weight, labels, teacher_...) forward/reverse KL, JSD + CE: distillation
    linear_topk(hidden, weight, labels, k=...)          a teacher's top-k table (no gradients)

Contract (the same for every op):

* `hidden` is `[B, L, d]` or `[N, d]` (after the final norm); `weight` is the head, `[V_padded, d]`
  (an `nn.Linear` weight or a tied embedding), the way our models expose it.
* `labels`/`targets` are already shifted (`labels[t]` is the token position t predicts), with
  `ignore_index` (-100) where nothing is trained; ops never shift. Ignored positions are removed
  before the head, so they cost nothing.
* `vocab_size` is the real vocabulary; rows from it on are padding (our models pad to a multiple
  of 64): they are never read, get no probability mass and a zero gradient.
* Work is done in tiles of `chunk_size` tokens x `vocab_chunk_size` vocabulary rows by one
  autograd function (`head_stats`); each tile's GEMM runs in the input (or autocast) dtype, all
  softmax math and every accumulation across tiles in fp32, and results are fp32 whatever the input
  dtype. The backward recomputes each tile's logits; `linear_cross_entropy(grads_in_forward=True)`
  computes the gradients in the forward instead (faster where GEMMs dominate, more memory).
* Loss normalisation: `reduction="mean"` divides by `num_valid`, the trained-token count of the
  *global* batch (all ranks and micro-batches). Each call then returns its share of the global
  mean, and the shares add up to the same loss and gradients however tokens are split.

DTensor / FSDP2: the ops take plain tensors and raise `ValueError` on a DTensor. The head weight
must be the full, unsharded parameter at the time of the call, which FSDP2 provides in two places:

1. Between the forward and backward of the root `fully_shard` module: FSDP2 does not reshard the
   root's parameters after its forward (they would be all-gathered again at once for backward).
   So keep the LM head, and a tied embedding, in the root unit (do not `fully_shard` the head on
   its own) and call the op on `model.<head>.weight` after `hidden = model(...)`. Its gradient then
   lands on the unsharded parameter and FSDP2 reduce-scatters it like any other.
2. Inside the forward of the module that owns the head, if the head is its own FSDP unit: wrap
   head and loss in one module whose forward calls the op.

`weight.full_tensor()` is not a substitute: it all-gathers outside FSDP2's schedule, and its
backward treats the rank-local gradient as replicated instead of summing it across ranks.
Note also that FSDP2 *averages* gradients over data-parallel ranks by default; with a global
`num_valid` the per-rank losses are already shares of the global mean, so the trainer sums
instead (`set_gradient_divide_factor(1.0)`, or scale the loss by the world size).
"""

from posttrain.ops.distill import DistillLoss, TopK, linear_distill
from posttrain.ops.kl import linear_kl
from posttrain.ops.linear_ce import linear_cross_entropy
from posttrain.ops.logprobs import linear_logprobs
from posttrain.ops.topk import linear_topk

__all__ = ["DistillLoss", "TopK", "linear_cross_entropy", "linear_distill", "linear_kl", "linear_logprobs",
           "linear_topk"]
