"""A frozen teacher served by a process of its own (`teacher.placement: separate`).

The server (`serve_teacher`, in the teacher's process) and the client (`RemoteTeacher`, in a
student rank) talk over a `TensorChannel`: tensors as raw bytes over a two-process gloo group,
never pickled objects.

    server -> client   [vocab_size, rows, width, dtype]  then the head weight [rows, width], once
    client -> server   [FORWARD, B, L, documents + 1, max_seqlen]  then ids and positions [2, B, L]
                       (int64) and cu_seqlens (int32)
    server -> client   [OK, B, L, width, dtype]  then the final hidden states [B, L, width]
                       or [FAILED]: the server raised, and the client asks its handle why
    client -> server   [STOP]  at the end

The client's `active()` yields a `RemoteTeacherModel`, which a distillation objective or a top-k
pass uses like a local teacher: called with (ids, positions, packed attention) it returns the
teacher's hidden states, and it has the teacher's `head_weight` and `vocab_size`. The student's
rank computes the teacher's logits tile by tile from them (`ops.linear_distill`), so what crosses
the channel per micro-batch is `B * L * width` values, never `[tokens, vocab]`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol

import torch
import torch.nn as nn

from posttrain.cluster.tensor_channel import TensorChannel
from posttrain.data.batch import PackedBatch
from posttrain.models.common.attention import AttentionMeta, packed_attention
from posttrain.train.roles import FrozenModel
from posttrain.train.step import autocast_context

FORWARD, STOP = 1, 2
OK, FAILED = 0, 1
WIRE_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IDLE_TIMEOUT_S = 365 * 24 * 3600.0  # the server waits for its next request as long as the rank lives


class TeacherGone(RuntimeError):
    """The teacher's process died or failed; the run cannot go on without it."""


def serve_teacher(frozen: FrozenModel, channel: TensorChannel, precision: str) -> None:
    """Answer forward requests with the teacher's hidden states until told to stop. Between
    requests it waits without a limit (evaluation or a checkpoint save may take long; a rank that
    dies closes the socket, which ends the wait). An exception in a forward is signalled to the
    client, then raised."""
    with frozen.active() as model:
        weight = model.head_weight.detach()
        channel.send_ints([model.vocab_size, *weight.shape, WIRE_DTYPES.index(weight.dtype)])
        channel.send(weight)
        while True:
            kind, rows, length, bounds, max_seqlen = channel.recv_ints(IDLE_TIMEOUT_S)[:5]
            if kind == STOP:
                return
            tokens = channel.recv((2, rows, length), torch.long)
            cu_seqlens = channel.recv((bounds,), torch.int32)
            try:
                with autocast_context(precision, "cpu"):
                    hidden = model(tokens[0], tokens[1], packed_attention(cu_seqlens, max_seqlen, rows, length))
            except BaseException:
                channel.send_ints([FAILED])
                raise
            channel.send_ints([OK, *hidden.shape, WIRE_DTYPES.index(hidden.dtype)])
            channel.send(hidden)


class TeacherHandle(Protocol):
    """What runs the server: it says why the server failed, and ends it (after letting it finish
    with `wait`)."""

    pid: int

    def failure(self) -> str: ...
    def close(self, wait: bool) -> None: ...


class RemoteTeacherModel(nn.Module):
    """The client's view of the teacher: a forward that runs in the teacher's process."""

    def __init__(self, channel: TensorChannel, head_weight: torch.Tensor, vocab_size: int,
                 device: torch.device, gone: Callable[[BaseException | None], TeacherGone]):
        super().__init__()
        self.channel, self.device, self.vocab_size, self._gone = channel, device, vocab_size, gone
        self.pending = False  # a request was sent and its answer not read yet
        self.broken = False  # an exchange failed midway: the two sides are out of step
        self.register_buffer("_head", head_weight.to(device), persistent=False)

    @property
    def head_weight(self) -> torch.Tensor:
        """The teacher's LM head, received once when the channel opened."""
        return self._head

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attn: AttentionMeta) -> torch.Tensor:
        if attn.cu_seqlens is None or attn.max_seqlen is None:
            raise ValueError("a remote teacher runs packed batches: the attention needs cu_seqlens and max_seqlen")
        self._request(input_ids, position_ids, attn.cu_seqlens, attn.max_seqlen)
        return self.collect()

    def submit(self, batch: PackedBatch) -> None:
        """Send `batch` to the teacher, which starts on it at once; `collect()` returns its hidden states."""
        self._request(batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen)

    def _request(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cu_seqlens: torch.Tensor,
                 max_seqlen: int) -> None:
        if self.pending:
            raise RuntimeError("a remote teacher answers one request at a time: collect() the last one first")
        rows, length = input_ids.shape
        self.pending = True
        try:
            self.channel.send_ints([FORWARD, rows, length, cu_seqlens.numel(), int(max_seqlen)])
            self.channel.send(torch.stack([input_ids, position_ids]).long())
            self.channel.send(cu_seqlens.int())
        except RuntimeError as err:
            self.broken = True
            raise self._gone(err) from None

    def collect(self) -> torch.Tensor:
        """The hidden states `[B, L, width]` of the last request, on the student's device."""
        if not self.pending:
            raise RuntimeError("collect() without a request: submit() a batch first")
        try:
            status, rows, length, width, dtype = self.channel.recv_ints()[:5]
            if status == FAILED:
                raise self._gone(None)
            hidden = self.channel.recv((rows, length, width), WIRE_DTYPES[dtype])
        except BaseException as err:
            self.broken = True
            if isinstance(err, RuntimeError) and not isinstance(err, TeacherGone):
                raise self._gone(err) from None
            raise
        self.pending = False
        return hidden.to(self.device)


class RemoteTeacher:
    """A `FrozenModel`-like teacher whose forward runs in another process (see the module doc)."""

    def __init__(self, channel: TensorChannel, handle: TeacherHandle, device: torch.device):
        self.channel, self.handle = channel, handle
        try:
            vocab_size, rows, width, dtype = channel.recv_ints()[:4]
            weight = channel.recv((rows, width), WIRE_DTYPES[dtype])
        except RuntimeError as err:
            raise self._gone(err) from None
        self.model = RemoteTeacherModel(channel, weight, vocab_size, device, self._gone)
        self.closed = False

    def _gone(self, err: BaseException | None) -> TeacherGone:
        why = self.handle.failure() or (str(err).splitlines()[0] if err is not None else "unknown")
        return TeacherGone(f"the teacher process (pid {self.handle.pid}) is gone: {why}")

    @contextmanager
    def active(self) -> Iterator[RemoteTeacherModel]:
        with torch.no_grad():
            yield self.model

    def close(self) -> None:
        """End the server's process: told to stop when it waits for a request, killed at once when
        a request is unanswered or an exchange broke off (telling it would wait on its answer)."""
        if self.closed:
            return
        self.closed = True
        in_step = not (self.model.pending or self.model.broken)
        if in_step:
            try:
                self.channel.send_ints([STOP])
            except RuntimeError:
                in_step = False  # already gone
        self.handle.close(wait=in_step)
        self.channel.close()
