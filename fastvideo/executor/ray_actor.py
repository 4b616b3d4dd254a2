"""The Ray actor of one rank (``executor="ray"``): runs in its own process, on any node of
the cluster, and serves batches with the worker process's own loop.

Rank 0's actor first hosts the rendezvous: a TCPStore listening on one address only (the
driver picks loopback or, when the actors span nodes, rank 0's node address). Then every
actor runs ``fastvideo.worker.main._WorkerLoop`` with the sockets, token and store that its
``WorkerArgs`` name; gloo and NCCL use the network interface that leads to the store.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import msgspec

from fastvideo.executor.multiproc import loopback_interface
from fastvideo.wire.messages import WorkerArgs


class RayWorker:
    """One rank: hosts the rendezvous (rank 0), then runs the worker loop until Shutdown.

    Its only data argument is ``WorkerArgs`` encoded with msgspec (bytes)."""

    def __init__(self) -> None:
        self._store = None

    def host_store(self, host: str, world_size: int, timeout_s: float) -> int:
        """Rank 0: a TCPStore listening on ``host`` only (a socket bound here and handed
        over; the store itself would listen on every interface); returns its port."""
        import torch.distributed as dist

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.bind((host, 0))
        listener.listen(max(128, 4 * world_size))
        port = listener.getsockname()[1]
        self._store = dist.TCPStore(
            host, port, world_size, True, timedelta(seconds=timeout_s),
            wait_for_workers=False, master_listen_fd=listener.detach(),
        )  # fmt: skip
        return port

    def run(self, encoded_args: bytes) -> int:
        """The worker process's loop, in this actor; returns its exit code."""
        from fastvideo.worker.main import _WorkerLoop

        args = msgspec.msgpack.decode(encoded_args, type=WorkerArgs)
        if args.world_size > 1:
            _use_interface_towards(_store_host(args.store_path))
        loop = _WorkerLoop(args)
        loop.start_heartbeat()
        try:
            if loop.start(self._store):
                loop.serve()
        finally:
            loop.close()
            self._store = None
        return loop.exit_code


def _store_host(store_path: str) -> str:
    return store_path.removeprefix("tcp://").rpartition(":")[0].strip("[]")


def _use_interface_towards(host: str) -> None:
    """Point gloo and NCCL at the interface this node reaches ``host`` (rank 0's store)
    through, unless the user chose one: loopback on one node, the cluster network
    otherwise."""
    name = loopback_interface() if host in ("127.0.0.1", "::1") else _interface_for(host)
    if name is not None:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", name)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", name)


def _interface_for(host: str) -> str | None:
    import psutil

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect((host, 9))  # UDP: picks the route, sends nothing
        local = probe.getsockname()[0]
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address.split("%")[0] == local for a in addrs):
            return name
    return None
