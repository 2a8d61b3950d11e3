"""`make demo`: import the bundled SmolLM2 model and show it answering a chat prompt."""

from __future__ import annotations

import time

import torch


def main() -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.models.hub import import_model

    start = time.perf_counter()
    model_dir = import_model("smollm2-135m-instruct")
    print(f"model directory: {model_dir} ({time.perf_counter() - start:.1f} s)")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    question = "What is the capital of France?"
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**inputs, max_new_tokens=32, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    print(f"user: {question}\nassistant (greedy): {answer}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
