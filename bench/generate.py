"""Generation throughput: our KV-cache `generate` vs transformers `generate`, same batch.

Both sides load the same HF directory in the same dtype, take the same 8 chat prompts (left-padded,
chat template applied by the tokenizer) and decode greedily up to `--max-new-tokens`; each row
stops at EOS. Runs alternate (ours, transformers, ours, ...) so background load hits both alike;
the median of `--repeats` timed runs after one warm-up is reported. Tokens counted are the real
generated tokens (up to and including EOS) — identical on both sides when the outputs match,
which the script checks and reports. Both sides do the same matmuls per step, so differences come
from work skipped: our finished rows leave the batch (transformers keeps decoding them until the
last row ends), and `--prefill packed` skips the prompt padding.

    python bench/generate.py                                   # SmolLM2-135M, fp32 and bf16
    python bench/generate.py --dtypes bfloat16 --max-new-tokens 128 --repeats 5
    python bench/generate.py --threads 1 --prefill packed     # our prefill without padding
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from posttrain.data.chat import ChatRenderer  # noqa: E402
from posttrain.data.rows import PromptExample  # noqa: E402
from posttrain.models.generate import generate  # noqa: E402
from posttrain.models.hf import load_hf  # noqa: E402
from posttrain.models.hub import import_model  # noqa: E402

QUESTIONS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in one sentence.",
    "What is 17 times 23?",
    "Give me three tips for better sleep.",
    "Who wrote Romeo and Juliet?",
    "Translate 'good morning' into Spanish.",
    "Describe how a bicycle works to a child.",
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def cut_after_eos(row: list[int], eos: int) -> list[int]:
    return row[: row.index(eos) + 1] if eos in row else row


def run_ours(model, tokenizer, prompts, max_new_tokens: int, prefill: str) -> list[list[int]]:
    renderer = ChatRenderer(tokenizer)  # prompts are rendered as training renders them
    return generate(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=0, prefill=prefill,
        render=lambda messages: renderer.render_prompt(PromptExample(messages)).input_ids,
    ).token_ids


def run_transformers(model, batch, max_new_tokens: int, eos: int) -> list[list[int]]:
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    return [cut_after_eos(row, eos) for row in out[:, batch["input_ids"].shape[1] :].tolist()]


def timed(fn) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def bench_dtype(model_dir: Path, dtype_name: str, args) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    dtype = DTYPES[dtype_name]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [[{"role": "user", "content": q}] for q in QUESTIONS[: args.batch]]
    ours = load_hf(model_dir, dtype=dtype)
    theirs = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    tokenizer.padding_side = "left"
    batch = tokenizer.apply_chat_template(
        prompts,
        add_generation_prompt=True,
        tokenize=True,
        padding=True,
        return_tensors="pt",
        return_dict=True,
    )
    eos = tokenizer.eos_token_id
    run_a = lambda: run_ours(ours, tokenizer, prompts, args.max_new_tokens, args.prefill)  # noqa: E731
    run_b = lambda: run_transformers(theirs, batch, args.max_new_tokens, eos)  # noqa: E731
    run_a(), run_b()  # warm-up
    times_a, times_b = [], []
    for _ in range(args.repeats):
        t, tokens_a = timed(run_a)
        times_a.append(t)
        t, tokens_b = timed(run_b)
        times_b.append(t)
    n_a, n_b = sum(map(len, tokens_a)), sum(map(len, tokens_b))
    sec_a, sec_b = statistics.median(times_a), statistics.median(times_b)
    return {
        "dtype": dtype_name,
        "prefill": args.prefill,
        "batch": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "ours_tokens": n_a,
        "ours_s": round(sec_a, 3),
        "ours_tok_s": round(n_a / sec_a, 1),
        "transformers_tokens": n_b,
        "transformers_s": round(sec_b, 3),
        "transformers_tok_s": round(n_b / sec_b, 1),
        "speedup": round((n_a / sec_a) / (n_b / sec_b), 2),
        "same_tokens": tokens_a == tokens_b,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default="smollm2-135m-instruct", help="bundled model name or HF directory"
    )
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--batch", type=int, default=8, choices=range(1, len(QUESTIONS) + 1))
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument(
        "--prefill", choices=("left", "packed"), default="left", help="our prefill layout"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = Path(args.model) if Path(args.model).is_dir() else import_model(args.model)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, model {model_dir}")
    print(
        "| dtype | prefill | batch | new tokens (max) | ours tok/s | transformers tok/s "
        "| speedup | same tokens |"
    )
    print("|---|---|---|---|---|---|---|---|")
    results = []
    for name in args.dtypes.split(","):
        r = bench_dtype(model_dir, name, args)
        results.append(r)
        print(
            f"| {r['dtype']} | {r['prefill']} | {r['batch']} | "
            f"{r['ours_tokens']} ({r['max_new_tokens']}) | "
            f"{r['ours_tok_s']} | {r['transformers_tok_s']} | {r['speedup']}x | "
            f"{r['same_tokens']} |"
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
