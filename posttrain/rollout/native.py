"""`NativeEngine`: the `GenerationEngine` over our own decoder and KV-cache `generate`.

One process, one device, a plain (unsharded, adapter-free) `Decoder`. Weight updates arrive as
Hugging Face-named tensors and are mapped with the family key map, the way `load_hf` maps a
checkpoint: vocabulary tables may come with the real number of rows and are zero-padded, every
tensor is cast to the engine's dtype and copied into the existing parameters (no reallocation).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from posttrain.models.common.decoder import Decoder
from posttrain.models.common.spec import ModelSpec
from posttrain.models.generate import default_eos_ids, generate_from_ids
from posttrain.models.hf import VOCAB_PARAMS
from posttrain.models.lora import LoRALinear
from posttrain.models.sampling import SamplingParams
from posttrain.parallel.load import is_distributed
from posttrain.rollout.engine import RolloutBatch


class NativeEngine:
    """Generation on `model` (which the engine owns from now on) with `tokenizer`.

    `spec` (the family's `ModelSpec`) defaults to the one the model was loaded with. EOS ids are
    resolved once here (tokenizer, config.json, generation_config.json).

    `lm_head_fp32`: the head's matmul and the softmax run in fp32 (an fp32 copy of the head,
    refreshed on every update), whatever the weights' dtype.

    Sleep levels: 1 moves the weights to CPU memory (on a CPU engine they stay where they are)
    and `wake()` moves them back unchanged; 2 discards them (parameters on `meta`), `wake()`
    allocates them uninitialised, and `generate` refuses to run until `update_weights` has
    delivered a full set. Either way `generate` and `update_weights` refuse while asleep. The KV
    cache exists only inside a `generate` call, so it holds nothing between calls.
    """

    def __init__(
        self,
        model: Decoder,
        tokenizer,
        *,
        spec: ModelSpec | None = None,
        prefill: str = "left",
        policy_version: int = 0,
        lm_head_fp32: bool = False,
    ):
        if is_distributed(model) or any(isinstance(m, LoRALinear) for m in model.modules()):
            raise ValueError(
                "NativeEngine needs a plain single-device Decoder (no DTensor shards, no LoRA "
                "adapters); merge adapters with merge_lora or stream weights into a fresh model"
            )
        if spec is None and model.hf_source is None:
            raise ValueError("NativeEngine needs spec= for a model not loaded with load_hf")
        self.model = model
        self.tokenizer = tokenizer
        self.spec = spec if spec is not None else model.hf_source.spec
        self.prefill = prefill
        self.device = model.tok_embeddings.weight.device
        self.dtype = model.tok_embeddings.weight.dtype
        self.eos_ids = default_eos_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._version = policy_version
        self._sleep_level = 0
        self._weights_missing = False
        self.lm_head_fp32 = lm_head_fp32
        self._refresh_head()

    def _refresh_head(self) -> None:
        """With `lm_head_fp32`, logits come from an fp32 copy of the (possibly bf16) head."""
        self.model.fp32_head = self.model.head_weight.detach().float() if self.lm_head_fp32 else None

    @property
    def policy_version(self) -> int:
        return self._version

    def generate(
        self,
        prompt_ids: list[list[int]],
        sampling: SamplingParams,
        n: int = 1,
        seed: int = 0,
        prompt_index: Sequence[int] | None = None,
    ) -> RolloutBatch:
        """`n` samples of every prompt; see `GenerationEngine.generate`."""
        self._check_awake("generate")
        if self._weights_missing:
            raise RuntimeError(
                "the engine's weights were discarded by sleep(level=2); call update_weights with a "
                "full set of tensors before generate"
            )
        out = generate_from_ids(
            self.model, self.tokenizer, prompt_ids, sampling, n=n, seed=seed,
            prompt_index=prompt_index, eos_ids=self.eos_ids, prefill=self.prefill,
        )
        return RolloutBatch.from_generation(out, self.pad_id, self._version)

    @torch.no_grad()
    def update_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int | None = None
    ) -> None:
        """Copy a full set of HF-named tensors into the model, one at a time.

        Each tensor's name, shape and dtype are checked before it is copied; an unknown name, a
        tensor given twice, a wrong shape, a non-floating dtype, or a stream that ends without
        some weight is a `ValueError` naming the tensor. The update is all or nothing: the
        previous value of each tensor already overwritten is kept on CPU until the stream ends
        and restored on any failure (so the host briefly holds up to one copy of the weights).
        Checkpoint keys the family ignores (stored RoPE frequencies) are skipped.
        """
        self._check_awake("update_weights")
        params = dict(self.model.named_parameters())
        done: set[str] = set()
        backup: list[tuple[nn.Parameter, torch.Tensor]] = []
        try:
            for hf_name, tensor in named_tensors:
                name = self._checked_name(hf_name, tensor, params, done)
                if name is None:
                    continue
                target = params[name]
                if not self._weights_missing:  # discarded weights have nothing to restore
                    backup.append((target, target.detach().to("cpu", copy=True)))
                target[: tensor.shape[0]].copy_(tensor)
                if name in VOCAB_PARAMS:
                    target[tensor.shape[0] :].zero_()
                done.add(name)
            missing = sorted(set(params) - done)
            if missing:
                hf_names = ", ".join(self.spec.key_map.to_hf(name) for name in missing[:8])
                raise ValueError(f"update_weights got no tensor for {hf_names}; an update holds every weight")
        except BaseException:
            for target, old in reversed(backup):
                target.copy_(old)
            raise
        self._weights_missing = False
        self._refresh_head()
        self._version = self._version + 1 if version is None else version

    def _checked_name(
        self, hf_name: str, tensor: torch.Tensor, params: dict[str, nn.Parameter], done: set[str]
    ) -> str | None:
        """Our parameter name for `hf_name` after checking the tensor fits it (None: ignorable)."""
        try:
            name = self.spec.key_map.from_hf(hf_name)
        except KeyError:
            family = self.spec.family
            raise ValueError(f"update_weights: unknown tensor {hf_name!r} for a {family} model") from None
        if name is None:
            return None
        if name not in params:
            raise ValueError(f"update_weights: tensor {hf_name!r} has no place in this model ({name})")
        if name in done:
            raise ValueError(f"update_weights: tensor {hf_name!r} given twice")
        if not tensor.is_floating_point():
            raise ValueError(f"update_weights: tensor {hf_name!r} has dtype {tensor.dtype}, not a float")
        expected = tuple(params[name].shape)
        shape = tuple(tensor.shape)
        real_rows = (self.model.vocab_size, *expected[1:])  # a vocabulary table without padding
        if shape != expected and not (name in VOCAB_PARAMS and shape == real_rows):
            raise ValueError(
                f"update_weights: tensor {hf_name!r} has shape {shape}, this model needs {expected}"
            )
        return name

    def sleep(self, level: int = 1) -> None:
        """Free the weights' device memory (level 1: to CPU; level 2: discard; see the class)."""
        if level not in (1, 2):
            raise ValueError(f"sleep level must be 1 (offload weights) or 2 (discard weights); got {level}")
        if self._sleep_level:
            raise RuntimeError(f"the engine is already asleep (level {self._sleep_level})")
        self.model.to("cpu" if level == 1 else "meta")
        self.model.fp32_head = None
        torch.cuda.empty_cache()  # a no-op unless CUDA was initialised
        self._sleep_level = level

    def wake(self) -> None:
        """Bring the weights back to the engine's device (level 2: allocated, not restored)."""
        if self._sleep_level == 2:
            self.model.to_empty(device=self.device)
            self.model.init_buffers(self.device)
            self._weights_missing = True
        elif self._sleep_level == 1:
            self.model.to(self.device)
            self._refresh_head()
        self._sleep_level = 0

    def _check_awake(self, what: str) -> None:
        if self._sleep_level:
            raise RuntimeError(f"the engine is asleep (level {self._sleep_level}); call wake() before {what}")
