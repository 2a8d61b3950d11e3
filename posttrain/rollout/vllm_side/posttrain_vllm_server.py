"""The vLLM engine process: `.venv-vllm/bin/python posttrain_vllm_server.py` (started by
`posttrain.rollout.vllm_engine.VLLMEngine`, never by hand).

It connects back to the client over the authenticated socket named in its environment
(`POSTTRAIN_VLLM_ADDRESS`, `POSTTRAIN_VLLM_AUTHKEY`), builds `vllm.LLM` from the settings the
client sends first, and then answers requests until the client closes the connection:

    ("generate", {"prompts", "seeds", "n", "sampling"})  -> per prompt, per sample:
                                                            (token ids, log-probs, finish reason)
    ("reload", {"paths"})                                -> number of tensors reloaded

Messages hold only Python numbers, strings and lists: no tensors cross the socket. Weights arrive
as safetensors files the client wrote to shared memory; every name, shape and dtype is checked
against the checkpoint's own table before vLLM sees one, because a reload that fails half-way
leaves vLLM with a half-loaded model. A reload that fails after the check ends this process (its
weights are then unknown), and the client restarts it. After a reload the prefix cache is
cleared (its blocks hold keys and values of the old weights). The server ends its whole process
group when its parent, the client, goes away.

Runs in the vLLM environment: imports only vllm, torch, safetensors and the standard library.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from multiprocessing.connection import Client
from pathlib import Path

FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
# Checkpoint keys no family loads (stored RoPE frequencies): an update need not carry them.
NOT_WEIGHTS = re.compile(r".*\.rotary_emb\.inv_freq$")


def file_table(path: str | Path) -> dict[str, tuple[list[int], str]]:
    """HF name -> (shape, safetensors dtype) of every tensor in one safetensors file (header only)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    return {k: (list(v["shape"]), v["dtype"]) for k, v in header.items() if k != "__metadata__"}


def checkpoint_table(model_dir: str) -> dict[str, tuple[list[int], str]]:
    """The same table for every weight of a checkpoint directory: the files its
    `model.safetensors.index.json` names, else every `*.safetensors`; stored RoPE frequencies left out."""
    root = Path(model_dir)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(root / f for f in set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(root.glob("*.safetensors"))
    table: dict[str, tuple[list[int], str]] = {}
    for path in files:
        table.update({k: v for k, v in file_table(path).items() if not NOT_WEIGHTS.match(k)})
    if not table:
        raise ValueError(f"{model_dir}: no *.safetensors files")
    return table


def check_parts(paths: list[str], table: dict[str, tuple[list[int], str]]) -> None:
    """Refuse an update with an unknown, repeated or missing name, a wrong shape or a non-float
    dtype: like the native engine, an update holds every weight of the checkpoint exactly once."""
    seen: set[str] = set()
    for path in paths:
        for name, (shape, dtype) in file_table(path).items():
            if NOT_WEIGHTS.match(name):
                continue
            if name not in table:
                raise ValueError(f"weight update: {name!r} is not a tensor of the engine's checkpoint")
            if name in seen:
                raise ValueError(f"weight update: {name!r} is sent twice")
            seen.add(name)
            if shape != table[name][0]:
                raise ValueError(f"weight update: {name!r} has shape {shape}, the engine's is {table[name][0]}")
            if dtype not in FLOAT_DTYPES:
                raise ValueError(f"weight update: {name!r} has dtype {dtype}; expected a floating-point dtype")
    missing = sorted(table.keys() - seen)
    if missing:
        raise ValueError(f"weight update: {len(missing)} tensors of the checkpoint are missing, e.g. {missing[0]!r}")


def build_llm(settings: dict):
    from vllm import LLM

    return LLM(
        model=settings["model_dir"], tokenizer=settings["model_dir"], dtype=settings["dtype"],
        max_model_len=settings["max_model_len"], seed=settings["seed"], enforce_eager=True,
        logprobs_mode="processed_logprobs", enable_prefix_caching=True,
        # A prompt split over scheduler steps (chunked prefill) makes vLLM 0.32's CPU runner
        # rewind a seeded sampler's offset, which CPU generators do not have (the engine dies:
        # "CPU Generator does not use offset"); whole prompts per step avoid that path.
        enable_chunked_prefill=False,
        max_num_batched_tokens=max(settings["max_model_len"], 2048),  # 8192 made one step minutes long
        worker_extension_cls="posttrain_vllm_worker.WeightReloader",
    )


def generate(llm, request: dict) -> list[list[tuple[list[int], list[float], str]]]:
    from vllm import SamplingParams, TokensPrompt

    s = request["sampling"]
    params = [
        SamplingParams(n=request["n"], temperature=s["temperature"], top_p=s["top_p"], top_k=s["top_k"],
                       repetition_penalty=s["repetition_penalty"], max_tokens=s["max_new_tokens"],
                       stop_token_ids=s["stop_token_ids"], stop=s["stop_strings"] or None, logprobs=0,
                       seed=seed, detokenize=bool(s["stop_strings"]), skip_special_tokens=False)
        for seed in request["seeds"]
    ]
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in request["prompts"]], params, use_tqdm=False)
    result = []
    for out in outputs:
        samples = sorted(out.outputs, key=lambda c: c.index)
        for c in samples:
            if c.finish_reason not in ("stop", "length"):
                raise RuntimeError(f"vLLM ended a sample with finish reason {c.finish_reason!r}")
        result.append([
            (list(c.token_ids), [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)], c.finish_reason)
            for c in samples
        ])
    return result


def answer(llm, table: dict, dtype: str, method: str, request: dict) -> tuple[str, object]:
    """("ok", value), ("error", (kind, message)) for a refused request (the engine is unchanged),
    or ("fatal", message) when vLLM itself failed and its state is unknown."""
    from vllm.exceptions import VLLMClientError

    try:
        if method == "reload":
            check_parts(request["paths"], table)
        elif method != "generate":
            raise ValueError(f"unknown request {method!r}")
    except ValueError as err:
        return "error", ("ValueError", str(err))
    try:
        if method == "generate":
            return "ok", generate(llm, request)
        count = llm.collective_rpc("posttrain_reload", args=(request["paths"], dtype))[0]
        if not llm.reset_prefix_cache():  # cached prompt blocks were computed with the old weights
            return "fatal", "the prefix cache could not be cleared after a weight update"
        return "ok", count
    except (ValueError, VLLMClientError) as err:  # vLLM refused the request (a prompt longer than max_model_len)
        if method == "generate":
            return "error", ("ValueError", str(err))
        return "fatal", f"{type(err).__name__}: {err}"
    except Exception as err:  # noqa: BLE001 - reported; the engine ends and is restarted
        return "fatal", f"{type(err).__name__}: {err}"


def watch_parent() -> None:
    """End this server's whole process group (vLLM's processes included) once its parent, the
    client, is gone (killed, or a Ray actor killed), even in the middle of a request."""
    parent = os.getppid()
    while os.getppid() == parent:
        time.sleep(1.0)
    os.killpg(os.getpgrp(), signal.SIGKILL)


def serve(conn) -> None:
    settings = conn.recv()
    table = checkpoint_table(settings["model_dir"])
    llm = build_llm(settings)
    conn.send(("ok", {"pid": os.getpid()}))
    while True:
        try:
            method, request = conn.recv()
        except EOFError:
            return
        if method == "close":
            return
        status, value = answer(llm, table, settings["dtype"], method, request)
        conn.send((status, value))
        if status == "fatal":
            return


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the client decides when this engine stops
    threading.Thread(target=watch_parent, daemon=True).start()
    conn = Client(os.environ["POSTTRAIN_VLLM_ADDRESS"], authkey=bytes.fromhex(os.environ["POSTTRAIN_VLLM_AUTHKEY"]))
    try:
        serve(conn)
    except Exception as err:  # noqa: BLE001 - start-up failures reach the client as text
        try:
            conn.send(("fatal", f"{type(err).__name__}: {err}"))
        except OSError:
            pass
    # However serving ended (closed, the client gone, a failure), vLLM's engine-core processes,
    # which interpreter exit does not always stop, go with this process's group.
    os.killpg(os.getpgrp(), signal.SIGKILL)


if __name__ == "__main__":
    main()
