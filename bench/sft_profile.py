"""Where an SFT step's time goes: our side of `bench/sft_vs_trl.py` under the PyTorch profiler.

    python bench/sft_profile.py [--steps 3] [--activation-checkpointing on|off] [--compile on|off]
                                [--set KEY=VALUE ...]

Runs the same fp32 SFT run as `bench/sft_vs_trl.py --side ours` (SmolLM2-135M-Instruct, GSM8K,
packed rows of 1024, 4 micro-batches per step) with the profiler on, then groups the operators'
self CPU time (the caller thread's wall time inside each ATen operator; worker threads of one
intra-op parallel region are inside that time) into matmuls, attention, elementwise, copies,
the optimiser and the rest, and prints the top operators. The first step (warm-up, lazy
initialisation) is excluded by the profiler's schedule. `--set` passes config overrides (e.g.
`model.attention=flex`).
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sft_vs_trl import GSM8K, run_ours  # noqa: E402

CATEGORIES = (  # first match wins; matched against the operator name
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")),
    ("attention", ("scaled_dot_product", "flash_attention", "efficient_attention", "flex_attention")),
    ("optimiser", ("_foreach", "adam", "lerp", "aten::sqrt", "addcdiv", "addcmul")),
    ("copies", ("aten::copy_", "aten::_to_copy", "aten::clone", "aten::cat", "aten::index", "aten::scatter",
                "aten::gather", "aten::masked", "aten::narrow_copy", "aten::embedding", "aten::repeat")),
    ("allocation", ("aten::empty", "aten::zero", "aten::fill_", "aten::zeros", "aten::ones", "aten::resize")),
    ("elementwise", ("aten::mul", "aten::add", "aten::sub", "aten::div", "aten::silu", "aten::rsqrt",
                     "aten::pow", "aten::mean", "aten::sum", "aten::neg", "aten::exp", "aten::log", "aten::max",
                     "aten::where", "aten::sigmoid", "aten::sin", "aten::cos", "aten::softmax", "aten::_softmax",
                     "aten::logsumexp", "aten::clamp", "aten::eq", "aten::ne", "aten::lt", "aten::gt",
                     "aten::threshold", "aten::_log_softmax")),
)


def category(name: str) -> str:
    for label, keys in CATEGORIES:
        if any(key in name for key in keys):
            return label
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="profiled steps (one more runs first, unprofiled)")
    parser.add_argument("--activation-checkpointing", choices=["on", "off"], default="on")
    parser.add_argument("--compile", choices=["on", "off"], default="off")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--set", nargs="*", default=[], dest="overrides")
    args = parser.parse_args()
    run_args = argparse.Namespace(precision="fp32", model_dir=None, data=GSM8K, steps=args.steps + 1,
                                  activation_checkpointing=args.activation_checkpointing, compile=args.compile,
                                  overrides=args.overrides)
    torch.manual_seed(0)
    from posttrain.train import trainer

    one_step = trainer._one_step
    with tempfile.TemporaryDirectory() as tmp, profile(
        activities=[ProfilerActivity.CPU], schedule=schedule(wait=1, warmup=0, active=args.steps)
    ) as prof:
        def profiled_step(run, micro):  # the profiler's schedule advances once per optimiser step
            out = one_step(run, micro)
            prof.step()
            return out

        trainer._one_step = profiled_step
        result = run_ours(run_args, Path(tmp))
    report(prof, result, args)


def report(prof, result: dict, args: argparse.Namespace) -> None:
    steps = result["step_s"][1:]
    wall = sum(steps)
    totals: dict[str, float] = collections.Counter()
    rows = []
    for event in prof.key_averages():
        seconds = event.self_cpu_time_total / 1e6
        totals[category(event.key)] += seconds
        rows.append((seconds, event.count, event.key))
    profiled = sum(totals.values())
    print(f"fp32, AC {args.activation_checkpointing}, compile {args.compile}, {torch.get_num_threads()} threads; "
          f"{len(steps)} profiled steps, {wall:.1f} s of step time ({wall / len(steps):.1f} s/step, the profiler's "
          f"overhead included), MFU {sum(result['mfu'][1:]) / len(steps):.3f}")
    print(f"{'category':<12} {'s/step':>8} {'share':>7}")
    for label, seconds in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"{label:<12} {seconds / len(steps):8.2f} {seconds / profiled:7.1%}")
    print(f"{'(in ops)':<12} {profiled / len(steps):8.2f}  of {wall / len(steps):.2f} s/step wall")
    print(f"\ntop {args.top} operators by self time (s/step, calls/step):")
    for seconds, count, key in sorted(rows, reverse=True)[: args.top]:
        print(f"  {seconds / len(steps):7.3f}  {count / len(steps):7.0f}  {category(key):<11} {key}")


if __name__ == "__main__":
    main()
