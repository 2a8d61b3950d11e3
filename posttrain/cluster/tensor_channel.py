"""`TensorChannel`: tensors between exactly two processes over a gloo group of their own.

    channel, address = TensorChannel.listen(host)         # side 0: a store on a free port
    # hand `address` to the other process, which calls TensorChannel.connect(address)
    channel.join()                                         # side 0: waits for side 1, then the group forms
    channel.send(tensor);  x = channel.recv(shape, dtype);  channel.send_ints([1, 2]);  channel.recv_ints()

The group is a standalone `ProcessGroupGloo` on its own `TCPStore`, not a member of the default
process group, so it lives beside a training world of any size. Tensors go as raw bytes over TCP
(CPU tensors; bfloat16 included), never pickled; the receiver allocates what the sender's ints
said. A peer that dies makes the waiting side's call raise within milliseconds (the socket
closes); a peer that hangs makes it raise after `timeout_s` (or the call's own `timeout_s`). A
`send` returns once the peer has posted the matching `recv` (gloo's pairs rendezvous), so two
sides that both send at once wait for each other until the timeout.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

HEADER_INTS = 8
GROUP_PREFIX = "posttrain-channel"


class TensorChannel:
    """One side of a two-process channel; make it with `listen` (side 0) or `connect` (side 1)."""

    def __init__(self, store: dist.Store, side: int, timeout_s: float):
        self.store, self.side, self.timeout = store, side, timedelta(seconds=timeout_s)
        self.group: dist.ProcessGroup | None = None

    @classmethod
    def listen(cls, host: str, timeout_s: float = 600.0) -> tuple[TensorChannel, str]:
        """Side 0: a store on a free port of this host; returns the channel and its `host:port`."""
        store = dist.TCPStore(host, 0, world_size=2, is_master=True, timeout=timedelta(seconds=timeout_s),
                              wait_for_workers=False)
        return cls(store, 0, timeout_s), f"{host}:{store.port}"

    @classmethod
    def connect(cls, address: str, timeout_s: float = 600.0) -> TensorChannel:
        """Side 1: join the store at `address` and form the group (waits for side 0's `join`)."""
        host, port = address.rsplit(":", 1)
        store = dist.TCPStore(host, int(port), world_size=2, is_master=False, timeout=timedelta(seconds=timeout_s))
        channel = cls(store, 1, timeout_s)
        channel.join()
        return channel

    def join(self) -> None:
        """Form the two-process group; both sides call it (side 1 through `connect`)."""
        store = dist.PrefixStore(GROUP_PREFIX, self.store)
        self.group = dist.ProcessGroupGloo(store, self.side, 2, self.timeout)

    @property
    def peer(self) -> int:
        return 1 - self.side

    def _ready(self) -> dist.ProcessGroup:
        if self.group is None:
            raise RuntimeError("the channel's group is not formed yet: call join() first")
        return self.group

    def send(self, tensor: torch.Tensor) -> None:
        self._ready().send([tensor.detach().cpu().contiguous()], self.peer, 0).wait()

    def recv(self, shape: tuple[int, ...] | list[int], dtype: torch.dtype,
             timeout_s: float | None = None) -> torch.Tensor:
        """A tensor of `shape` and `dtype` from the peer, waiting up to `timeout_s` (default: the
        channel's)."""
        tensor = torch.empty(tuple(shape), dtype=dtype)
        work = self._ready().recv([tensor], self.peer, 0)
        work.wait() if timeout_s is None else work.wait(timedelta(seconds=timeout_s))
        return tensor

    def send_ints(self, values: list[int]) -> None:
        """Up to `HEADER_INTS` integers (a message's kind and the shapes that follow it)."""
        if len(values) > HEADER_INTS:
            raise ValueError(f"a header holds at most {HEADER_INTS} integers, got {len(values)}")
        header = torch.zeros(HEADER_INTS, dtype=torch.long)
        header[: len(values)] = torch.tensor(values, dtype=torch.long)
        self.send(header)

    def recv_ints(self, timeout_s: float | None = None) -> list[int]:
        return self.recv((HEADER_INTS,), torch.long, timeout_s).tolist()

    def close(self) -> None:
        """Drop the group and the store (the sockets close; a peer waiting on them raises)."""
        self.group = None
        self.store = None  # type: ignore[assignment]
