"""Tensor parallelism over the shared decoder (Megatron-style, no sequence parallelism).

Per block: `wq wk wv` and the MLP's `w1 w3` are split by output columns (each rank owns whole
attention heads and a slice of the MLP's hidden units), `wo` and `w2` by input rows, so each block
needs one all-reduce after attention and one after the MLP. Everything outside the blocks
(embedding, norms, the LM head used by the chunked loss) stays replicated over the `tp` ranks and
sees the same activations on each. The plan is written against our module names, so every family
mapped onto `Decoder` shares it.

Per-head q/k norms (Qwen3, Gemma 3) run on the local heads; their weights are replicated DTensors
over a head-sharded input, so their gradient comes out `Partial` (each rank's heads' share) and is
summed over the tp ranks before use (by FSDP2, or by the step engine without it). LoRA adapters follow
their base layer: colwise keeps `lora_A` whole and splits `lora_B` by rows, rowwise splits
`lora_A` by columns and keeps `lora_B` whole.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from posttrain.models.common.config import ModelArgs
from posttrain.models.lora import LoRALinear

COLWISE = ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3")
ROWWISE = ("attention.wo", "feed_forward.w2")
HEAD_NORMS = ("attention.q_norm", "attention.k_norm")


def check_tp_divisible(args: ModelArgs, tp: int) -> None:
    """ValueError unless heads, key/value heads and MLP hidden units split evenly over `tp`."""
    sizes = {
        "num_heads": args.num_heads,
        "num_kv_heads": args.num_kv_heads,
        "intermediate_size": args.intermediate_size,
    }
    bad = {name: n for name, n in sizes.items() if n % tp}
    if bad:
        detail = ", ".join(f"{name}={n}" for name, n in bad.items())
        raise ValueError(
            f"parallel.tp: {tp} does not divide this model's {detail}; tensor parallelism splits "
            "whole heads and MLP units over the tp ranks, so pick a tp that divides "
            f"{', '.join(f'{k}={v}' for k, v in sizes.items())}"
        )


class LoRAParallel(ParallelStyle):
    """Colwise or rowwise parallelism for a `LoRALinear` (which torch's styles do not know).

    Parameters are split by `placements`; the input is taken as `input_layout` (a local tensor
    from the previous layer) and the output is returned as a local tensor in `output_layout`.
    """

    def __init__(self, placements: dict[str, Placement], input_layout: Placement, output_layout: Placement):
        super().__init__()
        self.placements, self.input_layout, self.output_layout = placements, input_layout, output_layout

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, LoRALinear):
            raise TypeError(f"LoRAParallel applies to LoRALinear, got {type(module).__name__}")
        return distribute_module(module, device_mesh, self._partition, self._prepare_input, self._prepare_output)

    def _partition(self, _name: str, module: nn.Module, mesh: DeviceMesh) -> None:
        for name, param in list(module.named_parameters(recurse=False)):
            dist_param = distribute_tensor(param, mesh, [self.placements[name]], src_data_rank=self.src_data_rank)
            module.register_parameter(name, nn.Parameter(dist_param, requires_grad=param.requires_grad))

    def _prepare_input(self, _module: nn.Module, inputs: tuple, mesh: DeviceMesh) -> DTensor:
        x = inputs[0]
        if not isinstance(x, DTensor):
            return DTensor.from_local(x, mesh, (self.input_layout,), run_check=False)
        return x.redistribute(placements=(self.input_layout,))

    def _prepare_output(self, _module: nn.Module, output: DTensor, _mesh: DeviceMesh) -> torch.Tensor:
        return output.redistribute(placements=(self.output_layout,)).to_local()


def colwise(module: nn.Module) -> ParallelStyle:
    """Split output features: weight/bias rows (for LoRA: `lora_B` rows, `lora_A` whole)."""
    if isinstance(module, LoRALinear):
        placements = {"weight": Shard(0), "bias": Shard(0), "lora_A": Replicate(), "lora_B": Shard(0)}
        return LoRAParallel(placements, input_layout=Replicate(), output_layout=Shard(-1))
    return ColwiseParallel()


def rowwise(module: nn.Module) -> ParallelStyle:
    """Split input features: weight columns, bias whole (for LoRA: `lora_A` columns, `lora_B` whole);
    the partial outputs are summed over the tp ranks."""
    if isinstance(module, LoRALinear):
        placements = {"weight": Shard(1), "bias": Replicate(), "lora_A": Shard(1), "lora_B": Replicate()}
        return LoRAParallel(placements, input_layout=Shard(-1), output_layout=Replicate())
    return RowwiseParallel()


def block_plan(block: nn.Module) -> dict[str, ParallelStyle]:
    """The tensor-parallel plan of one `Block` (module paths relative to the block)."""
    plan = {name: colwise(block.get_submodule(name)) for name in COLWISE}
    plan.update({name: rowwise(block.get_submodule(name)) for name in ROWWISE})
    for name in HEAD_NORMS:
        if _has(block, name):
            # Input [B, L, local heads, head_dim]: sharded on the heads dimension.
            plan[name] = SequenceParallel(sequence_dim=2, use_local_output=True)
    return plan


def _has(module: nn.Module, path: str) -> bool:
    try:
        return module.get_submodule(path) is not None
    except AttributeError:
        return False


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Parallelise every block of `model` over `tp_mesh` in place (meta or real weights).

    Weights are split locally (`src_data_rank=None`): on `meta` nothing moves, and real weights
    must already be identical on every tp rank.
    """
    tp = tp_mesh.size()
    check_tp_divisible(model.args, tp)
    if any(isinstance(m, LoRALinear) and isinstance(m.dropout, nn.Dropout) for m in model.modules()):
        raise ValueError(
            "lora.dropout > 0 does not work with parallel.tp > 1 (each tp rank would drop different "
            "inputs of the same replicated activation); set lora.dropout: 0"
        )
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    for block in model.layers:
        parallelize_module(block, tp_mesh, block_plan(block), src_data_rank=None)
    for name, param in model.named_parameters():  # SequenceParallel makes its weights trainable
        param.requires_grad_(trainable[name])

