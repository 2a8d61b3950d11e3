"""`VLLMEngine`: the `GenerationEngine` interface over vLLM, run as a process of its own.

vLLM lives in its own environment (`make vllm-env` makes `.venv-vllm`; `docs/architecture.md`
says why), so the engine is a server process started from that environment's Python
(`vllm_side/posttrain_vllm_server.py`) and reached over an authenticated Unix socket. Only plain
numbers and lists cross it; weights go through shared memory:

    generate        token ids in; per sample the sampled token ids, their log-probs under the
                    distribution vLLM sampled from (`logprobs_mode="processed_logprobs"`: after
                    temperature, top-k, top-p) and the finish reason out. Sample `s` of a prompt
                    uses vLLM's per-request seed `prompt_seed(seed, prompt_index) + s`, so it
                    depends only on (weights, seed, prompt index, s), like the native engine.
    update_weights  the trainer's HF-named tensor stream is written, in the engine's dtype, as
                    safetensors parts (`PART_BYTES` at most each) to /dev/shm (a temporary
                    directory if /dev/shm has no room for 1.5x the weights); the server checks
                    every name, shape and dtype against the checkpoint before any reload (a
                    refused update is a `ValueError` and changes nothing), then our worker
                    extension reloads them in place (`model_runner.reload_weights`).
    sleep / wake    no-ops: vLLM's sleep mode frees GPU memory only; on a CPU the engine keeps its
                    weights and KV-cache reservation (`kv_cache_gib`) while the trainer runs.

`raw_logprobs` (log-probs under the raw model) equal `logprobs` when sampling is plain
(temperature 1, no top-k/top-p, no repetition penalty); otherwise vLLM reports only the processed
kind and `raw_logprobs` is NaN on every generated token (0 in padding), so no metric can use it
by mistake. Greedy decoding (`temperature=0`) reports 0.0 as the processed log-prob, the native
engine's convention (the arg-max has probability 1).

If the server dies (killed, crashed, or a reload that failed inside vLLM), a request raises
`EngineDied`; `restart()` starts a fresh one from the model directory, as for `ProcessEngine`.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from multiprocessing.connection import Connection, Listener
from pathlib import Path

import torch
from safetensors.torch import save_file

from posttrain.models.generate import GenerationOutput, checkpoint_eos_ids, trim_at_stop
from posttrain.models.sampling import SamplingParams
from posttrain.rollout.engine import RolloutBatch
from posttrain.rollout.process_engine import DTYPES, START_TIMEOUT_S, EngineDied

SERVER_DIR = Path(__file__).resolve().parent / "vllm_side"
DEFAULT_PYTHON = Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"
PART_BYTES = 256 << 20


def prompt_seed(seed: int, prompt_index: int) -> int:
    """vLLM's request seed for one prompt; its sample `s` is seeded `prompt_seed + s` by vLLM."""
    digest = hashlib.blake2b(f"{seed}:{prompt_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 4  # < 2**60: room for + s, inside int64


def vllm_python(path: str | Path | None = None) -> Path:
    """The vLLM environment's interpreter: `path`, $POSTTRAIN_VLLM_PYTHON, or `.venv-vllm`."""
    found = Path(path or os.environ.get("POSTTRAIN_VLLM_PYTHON") or DEFAULT_PYTHON)
    if not found.exists():
        raise FileNotFoundError(f"rollout.engine: vllm needs the vLLM environment's python, {found} does not "
                                "exist; run `make vllm-env` (or set rollout.vllm.python)")
    return found


def parts_dir(weight_bytes: int) -> str:
    """/dev/shm (memory) when it has room for 1.5x the weights, else the temporary directory."""
    if os.path.isdir("/dev/shm") and shutil.disk_usage("/dev/shm").free >= 1.5 * weight_bytes:
        return "/dev/shm"
    return tempfile.gettempdir()


def write_parts(named_tensors: Iterable[tuple[str, torch.Tensor]], part_dir: Path, dtype: torch.dtype,
                part_bytes: int = PART_BYTES) -> list[str]:
    """Write the stream as safetensors files of about `part_bytes` each, floating-point tensors in
    `dtype`; returns the paths in order. The process holds one part at a time; the files hold the
    whole update until the server has reloaded it (one extra copy of the weights in the engine's
    dtype, in memory when the files are in /dev/shm)."""
    paths: list[str] = []
    part: dict[str, torch.Tensor] = {}
    size = 0
    written: set[str] = set()

    def flush() -> None:
        nonlocal part, size
        path = part_dir / f"part-{len(paths):05d}.safetensors"
        save_file(part, str(path))
        paths.append(str(path))
        written.update(part)
        part, size = {}, 0

    for name, tensor in named_tensors:
        if name in part or name in written:
            raise ValueError(f"weight update: {name!r} is sent twice")
        tensor = tensor.detach().to("cpu", dtype) if tensor.is_floating_point() else tensor.detach().cpu()
        part[name] = tensor.contiguous()
        size += tensor.numel() * tensor.element_size()
        if size >= part_bytes:
            flush()
    if part or not paths:
        flush()
    return paths


def thread_cores(threads: int | None, local_rank: int = 0, local_world_size: int = 1) -> list[int]:
    """The cores this rank's vLLM threads are bound to.

    Each of the node's `local_world_size` ranks gets an equal share of the cores this process may
    use, and `threads` (when given) the first that many of its share. vLLM's own default binding
    reserves one core for its front end, which on a 2-core machine halves generation (measured:
    93 vs 148 tokens/s, `bench/RESULTS.md`); a colocated trainer waits while its engine generates,
    so the engine gets every core of its share.
    """
    available = sorted(os.sched_getaffinity(0))
    share = max(1, len(available) // max(1, local_world_size))
    start = (local_rank % max(1, local_world_size)) * share
    mine = available[start : start + share] or available[:share]
    if threads is not None:
        if threads > len(mine):
            raise ValueError(f"rollout.vllm.threads={threads} but this rank's share of the cores is {len(mine)} "
                             f"({len(available)} usable, {local_world_size} ranks on the node)")
        mine = mine[:threads]
    return mine


class VLLMEngine:
    """The engine interface over a vLLM server process (see the module docstring).

    `tokenizer` defaults to the model directory's; the engine stops on the EOS ids the native
    engine uses (tokenizer, config.json, generation_config.json). vLLM's threads are bound to
    `thread_cores(threads, local_rank, local_world_size)`; `log_path`: where the server's output
    goes.
    """

    def __init__(self, model_dir: str | Path, tokenizer=None, *, dtype: str = "float32",
                 max_model_len: int = 1024, kv_cache_gib: int = 1, threads: int | None = None,
                 local_rank: int = 0, local_world_size: int = 1, python: str | Path | None = None,
                 seed: int = 0, log_path: str | Path | None = None):
        if dtype not in DTYPES:
            raise ValueError(f"the vLLM engine's dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model_dir, self.tokenizer = str(model_dir), tokenizer
        self.eos_ids = sorted(checkpoint_eos_ids(Path(model_dir), tokenizer))
        self.dtype, self.python = dtype, vllm_python(python)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.settings = {"model_dir": self.model_dir, "dtype": dtype, "max_model_len": max_model_len, "seed": seed}
        cores = thread_cores(threads, local_rank, local_world_size)
        self.env = {"VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib), "PYTHONPATH": str(SERVER_DIR),
                    "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cores))}
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkdtemp(prefix="posttrain-vllm-")) / "engine.log"
        self.process: subprocess.Popen | None = None
        self.conn: Connection | None = None
        self._version, self.restarts, self._busy = 0, -1, False
        self.weight_bytes = sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))
        self.restart()

    # -- process ----------------------------------------------------------------------------
    @property
    def policy_version(self) -> int:
        return self._version

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def restart(self) -> None:
        """Stop the current server (if any) and start a fresh one from the model directory."""
        self.close()
        self._version = 0
        sock_dir = tempfile.mkdtemp(prefix="posttrain-vllm-sock-")
        key = secrets.token_bytes(32)
        listener = Listener(os.path.join(sock_dir, "engine"), family="AF_UNIX", authkey=key)
        try:
            env = {**os.environ, **self.env, "POSTTRAIN_VLLM_ADDRESS": listener.address,
                   "POSTTRAIN_VLLM_AUTHKEY": key.hex()}
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "ab") as log:
                self.process = subprocess.Popen([str(self.python), str(SERVER_DIR / "posttrain_vllm_server.py")],
                                                env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                start_new_session=True)
            self.conn = self._accept(listener)
        finally:
            listener.close()
            shutil.rmtree(sock_dir, ignore_errors=True)
        self.conn.send(self.settings)
        self._answer(timeout_s=START_TIMEOUT_S)
        self.restarts += 1

    def _accept(self, listener: Listener) -> Connection:
        accepted: list[Connection] = []

        def accept() -> None:
            try:
                accepted.append(listener.accept())
            except OSError:  # the listener closed: the server never came
                pass

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not accepted:
            thread.join(0.2)
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise EngineDied(f"the vLLM engine did not start; its log, {self.log_path}, ends with:\n{self._log_tail()}")
        return accepted[0]

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _gone(self) -> EngineDied:
        """Close what is left of a server that went away; the error to raise, with its log's tail."""
        self.close()
        return EngineDied(f"the vLLM engine is gone; its log, {self.log_path}, ends with:\n{self._log_tail()}")

    def close(self) -> None:
        """End the server and every vLLM process it started: the server leaves when its socket
        closes (at once if a request is in flight, e.g. a rollout generated ahead); then its
        process group (its own session) is killed, which also takes any vLLM process a killed
        server left behind. The server also ends its group by itself when this process dies."""
        conn, process, busy = self.conn, self.process, self._busy
        self.conn = self.process = None
        if conn is not None:
            try:
                if not busy:
                    conn.send(("close", None))
            except OSError:
                pass
            conn.close()
        if process is not None:
            try:
                process.wait(timeout=0 if busy else 30)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()

    # -- requests ---------------------------------------------------------------------------
    def _answer(self, timeout_s: float | None = None):
        conn, process = self.conn, self.process
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            while not conn.poll(1.0):
                if process.poll() is not None or (deadline is not None and time.monotonic() > deadline):
                    raise EOFError
            status, value = conn.recv()
        except (EOFError, OSError, AttributeError):  # AttributeError: closed by another thread
            raise self._gone() from None
        if status == "fatal":
            self.close()
            raise EngineDied(f"the vLLM engine failed: {value}")
        if status == "error":
            raise ValueError(value[1])
        return value

    def _call(self, method: str, request: dict):
        """One request and its answer; anything but a clean answer or refusal (a dead server, a
        stop signal while waiting) ends the server, so no stale answer is ever read."""
        if self.conn is None:
            raise EngineDied("the vLLM engine is not running; restart() it")
        self._busy = True
        try:
            try:
                self.conn.send((method, request))
            except OSError:  # the server is gone (a broken pipe)
                raise self._gone() from None
            return self._answer()
        except (ValueError, EngineDied):
            raise
        except BaseException:
            self.close()
            raise
        finally:
            self._busy = False

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingParams, n: int = 1, seed: int = 0,
                 prompt_index: Sequence[int] | None = None) -> RolloutBatch:
        """`n` samples of every prompt (see `GenerationEngine.generate`)."""
        prompt_index = list(range(len(prompt_ids))) if prompt_index is None else list(prompt_index)
        if len(prompt_index) != len(prompt_ids):
            raise ValueError(f"prompt_index has {len(prompt_index)} entries for {len(prompt_ids)} prompts")
        if not prompt_ids or any(not p for p in prompt_ids):
            raise ValueError("every prompt needs at least one token")
        strings = [s for s in sampling.stop if isinstance(s, str)]
        request = {
            "prompts": [list(p) for p in prompt_ids], "n": n,
            "seeds": [prompt_seed(seed, i) for i in prompt_index],
            "sampling": {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k,
                         "repetition_penalty": sampling.repetition_penalty, "max_new_tokens": sampling.max_new_tokens,
                         "stop_token_ids": sorted(set(self.eos_ids) | {s for s in sampling.stop if isinstance(s, int)}),
                         "stop_strings": strings},
        }
        per_prompt = self._call("generate", request)
        return self._batch(prompt_ids, prompt_index, per_prompt, sampling, strings)

    def _batch(self, prompt_ids, prompt_index, per_prompt, sampling: SamplingParams, strings) -> RolloutBatch:
        """The server's (ids, log-probs, finish reason) per sample as a `RolloutBatch`. Greedy
        log-probs are 0.0 (our convention); raw log-probs equal the processed ones under plain
        sampling and are NaN on generated tokens otherwise (vLLM reports one kind only)."""
        samples = [(p, s, *sample) for p, group in enumerate(per_prompt) for s, sample in enumerate(group)]
        plain = (sampling.temperature == 1.0 and sampling.top_p == 1.0 and sampling.top_k == 0
                 and sampling.repetition_penalty == 1.0)
        logprobs = [list(map(float, lps)) if sampling.temperature > 0 else [0.0] * len(ids)
                    for _, _, ids, lps, _ in samples]
        out = GenerationOutput(
            prompt_ids=[list(prompt_ids[p]) for p, *_ in samples],
            token_ids=[list(ids) for _, _, ids, _, _ in samples],
            logprobs=logprobs,
            raw_logprobs=logprobs if plain else [[float("nan")] * len(lps) for lps in logprobs],
            finish_reasons=["length" if reason == "length" else "stop" for *_, reason in samples],
            texts=[trim_at_stop(self.tokenizer.decode(ids, skip_special_tokens=True), strings)
                   for _, _, ids, _, _ in samples],
            prompt_index=[prompt_index[p] for p, *_ in samples],
            sample_index=[s for _, s, *_ in samples],
        )
        return RolloutBatch.from_generation(out, self.pad_id, self._version)

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int | None = None) -> None:
        """Write the stream as safetensors parts in shared memory; the server checks and reloads them."""
        part_dir = Path(tempfile.mkdtemp(prefix="posttrain-weights-", dir=parts_dir(self.weight_bytes)))
        try:
            paths = write_parts(named_tensors, part_dir, DTYPES[self.dtype])
            self._call("reload", {"paths": paths})
        finally:
            shutil.rmtree(part_dir, ignore_errors=True)
        self._version = self._version + 1 if version is None else version

    def sleep(self, level: int = 1) -> None:
        """A no-op on the CPU (see the module docstring)."""

    def wake(self) -> None:
        """A no-op on the CPU."""
