"""The Ray executor: one Ray actor per GPU (or CPU rank), possibly on several nodes, joined
by torch.distributed and fed over ZeroMQ exactly like the worker processes.

Each actor runs the worker process's own loop (``fastvideo.worker.main._WorkerLoop``), so
batches, progress, results (msgspec messages with raw tensor frames), heartbeats, the
arrival check and step control are the multi-process executor's; this module only places
the actors and watches them. Placement: a placement group with one bundle per rank,
``STRICT_PACK`` (a replica's collectives never cross nodes); in throughput mode one bundle
per replica, ``SPREAD`` across nodes (a bundle never spans nodes); ``PACK`` with one bundle
per rank when ``ray_allow_cross_node``. Actors on the driver's node talk to it over ipc://
in a private 0700 folder; actors on other nodes over tcp:// to the driver's node address,
where each rank's batch socket admits that rank's node only. The rendezvous is a TCPStore
hosted by rank 0's actor on 127.0.0.1, or on rank 0's node address when the actors span
nodes. An actor whose long-running ``run`` task ends (a crash, ``ray.kill``, a lost node)
or whose connection to the driver closes (ZeroMQ heartbeats close a tcp:// one whose node
stops answering) fails every pending batch with ``EngineDeadError``, as do silent or
stalled worker heartbeats. Shutdown kills every actor and removes the placement group.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import msgspec
import zmq
from zmq.utils.monitor import recv_monitor_message

try:
    import ray
    from ray.util.placement_group import (
        PlacementGroup,
        placement_group,
        placement_group_table,
        remove_placement_group,
    )
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
except ImportError as e:  # an optional extra
    raise ImportError("executor='ray' needs Ray: pip install 'fastvideo[ray]'") from e

from fastvideo import envs
from fastvideo.config import PipelineConfig
from fastvideo.executor.multiproc import MultiprocExecutor, _live_executors
from fastvideo.executor.ray_actor import RayWorker
from fastvideo.logger import init_logger
from fastvideo.wire.errors import WorkerStartupError
from fastvideo.wire.messages import Shutdown, WorkerFailure, WorkerReady

logger = init_logger(__name__)

# A peer's death often surfaces first as a failed collective on a surviving rank; Ray
# reports the death a moment later. Wait this long before blaming the batch alone.
PEER_DEATH_GRACE_S = 1.5
STOP_WAIT_S = 5.0  # after ray.kill, wait this long for every actor to be gone
# ZeroMQ heartbeats on tcp:// batch sockets: a node that stops answering for this long has
# its connection closed, which fails the engine (see _Connections).
ZMQ_HEARTBEAT_MS = 1000
ZMQ_HEARTBEAT_TIMEOUT_MS = 5000


# --- placement (pure) --------------------------------------------------------------------
@dataclass(frozen=True)
class Placement:
    """Bundles of the placement group, its strategy, and the bundle each rank lives in."""

    bundles: list[dict[str, float]]
    strategy: str
    bundle_of_rank: list[int]


def plan_placement(config: PipelineConfig, gpu: bool) -> Placement:
    """One GPU (CPU: one CPU) per rank; every replica's ranks on one node unless
    ``ray_allow_cross_node``; throughput-mode replicas spread across nodes."""
    world = config.num_gpus
    unit = {"CPU": 1.0, "GPU": 1.0} if gpu else {"CPU": 1.0}
    per_rank = [dict(unit) for _ in range(world)]
    if config.parallel_config.ray_allow_cross_node:
        return Placement(per_rank, "PACK", list(range(world)))
    replicas = config.replicas()
    if config.parallel_config.parallel_mode == "throughput" and replicas > 1:
        size = world // replicas  # a bundle lives on one node: so does its replica
        bundles = [{k: v * size for k, v in unit.items()} for _ in range(replicas)]
        return Placement(bundles, "SPREAD", [rank // size for rank in range(world)])
    return Placement(per_rank, "STRICT_PACK", list(range(world)))


# --- the process's connection to Ray ---------------------------------------------------------
class _RaySession:
    """One Ray connection per process, shared by its engines: joined or started by the
    first, left by the last (a local Ray it started is stopped; a connection the user made
    before is left alone)."""

    _lock = threading.Lock()
    _users = 0
    _ours = False
    _local = False  # a Ray of this machine only: no node will ever join it

    @classmethod
    def started_locally(cls) -> bool:
        return cls._ours and cls._local

    @classmethod
    def acquire(cls, address: str | None, num_cpus: int) -> None:
        with cls._lock:
            if cls._users == 0 and not ray.is_initialized():
                if address:
                    ray.init(address=address)
                else:  # "local": never attach to some other cluster of this machine
                    ray.init(address="local", include_dashboard=False, num_cpus=num_cpus)
                cls._ours, cls._local = True, not address
            elif cls._users == 0:
                logger.info("using this process's existing Ray connection")
            cls._users += 1

    @classmethod
    def release(cls) -> None:
        with cls._lock:
            cls._users = max(0, cls._users - 1)
            if cls._users == 0 and cls._ours:
                cls._ours = False
                if ray.is_initialized():
                    ray.shutdown()


def _wait_exited(pids: list[int], timeout: float) -> None:
    import psutil

    deadline = time.monotonic() + timeout
    for pid in pids:
        try:
            psutil.Process(pid).wait(timeout=max(0.0, deadline - time.monotonic()))
        except (psutil.Error, psutil.TimeoutExpired):
            pass  # gone already, not ours to reap (a zombie counts as gone), or still exiting


@dataclass(frozen=True)
class _Node:
    node_id: str
    ip: str


class _Connections:
    """Each rank's batch socket has one peer, its actor: once that connection closes the
    actor's process or its node is gone (on tcp://, ZeroMQ's own heartbeats close it when a
    node stops answering). Used by the monitor thread only, which closes it.

    Counted from the socket's events: a connection that fails its handshake (a stranger
    refused by the allow-list, a port scan) reports that failure before it disconnects, so
    open = handshakes that succeeded - (disconnects - failed handshakes)."""

    FAILED = (
        zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
        | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
        | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    )

    def __init__(self, sockets: list[zmq.Socket]):
        events = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | self.FAILED
        self._monitors = [sock.get_monitor_socket(events) for sock in sockets]
        self._counts = [[0, 0] for _ in sockets]  # per rank: [succeeded, disconnects - failed]

    def lost(self) -> int | None:
        """A rank whose actor's connection closed, else None."""
        for rank, monitor in enumerate(self._monitors):
            counts = self._counts[rank]
            while monitor.poll(0):
                event = recv_monitor_message(monitor)["event"]
                if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    counts[0] += 1
                elif event == zmq.EVENT_DISCONNECTED:
                    counts[1] += 1
                else:
                    counts[1] -= 1
            if counts[0] > 0 and counts[0] <= counts[1]:
                return rank
        return None

    def close(self) -> None:
        for monitor in self._monitors:
            monitor.close(linger=0)


# --- the executor ----------------------------------------------------------------------------
class RayExecutor(MultiprocExecutor):
    """The multi-process executor's sockets, futures and heartbeats over Ray actors."""

    def __init__(self, model_dir: Path, config: PipelineConfig, device: str):
        self._session = False
        self._pg: PlacementGroup | None = None
        self._actors: list = []
        self._runs: list = []  # each actor's run() task: ready once the actor is gone
        self._nodes: list[_Node] = []  # per rank
        self._auth = None
        self._store_path = ""
        self._connections: _Connections | None = None
        self._watch_done = threading.Event()  # the monitor thread closed its sockets
        self._stop_lock = threading.RLock()  # a future's callback may shut down too
        super().__init__(model_dir, config, device)

    # --- start-up ----------------------------------------------------------------------
    def _start(self, model_dir: Path, config: PipelineConfig, device: str) -> None:
        address = config.ray_address or envs.ray_address()
        _RaySession.acquire(address, max(os.cpu_count() or 1, self.world_size))
        self._session = True
        timeout = config.engine_config.ready_timeout_s or envs.worker_ready_timeout_s()
        placement = plan_placement(config, gpu=device == "cuda")
        self._place(placement, timeout)
        gpu = 1 if device == "cuda" else 0
        cls = ray.remote(RayWorker)
        for rank in range(self.world_size):
            strategy = PlacementGroupSchedulingStrategy(
                self._pg, placement_group_bundle_index=placement.bundle_of_rank[rank]
            )
            self._actors.append(
                cls.options(num_cpus=1, num_gpus=gpu, scheduling_strategy=strategy).remote()
            )
        self._store_path = store_path = self._rendezvous(timeout)
        request_addrs, output_addrs = self._bind_sockets()
        config_dict = msgspec.to_builtins(config)
        local = "cuda:0" if device == "cuda" else "cpu"  # Ray sets CUDA_VISIBLE_DEVICES
        for rank, actor in enumerate(self._actors):
            args = self._worker_args(
                rank, local, model_dir, config_dict, request_addrs[rank], output_addrs[rank],
                store_path,
            )  # fmt: skip
            self._runs.append(actor.run.remote(msgspec.msgpack.encode(args)))
        self._serve_once_ready(config)

    def _place(self, placement: Placement, timeout: float) -> None:
        """Reserve the bundles and learn each rank's node (so addresses can be chosen
        before any actor starts)."""
        self._pg = placement_group(
            placement.bundles, strategy=placement.strategy, name=f"fastvideo-{self._token[:8]}"
        )
        self._wait_placement(placement, timeout)
        bundle_nodes = placement_group_table(self._pg)["bundles_to_node_id"]
        ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}
        for rank in range(self.world_size):
            node_id = bundle_nodes[placement.bundle_of_rank[rank]]
            self._nodes.append(_Node(node_id, ips[node_id]))
        self._driver_node = ray.get_runtime_context().get_node_id()
        self._driver_ip = ips.get(self._driver_node, "127.0.0.1")
        where = ", ".join(f"{r}@{n.ip}" for r, n in enumerate(self._nodes))
        logger.info(
            "Ray placement %s: %d rank(s) on %d node(s) (rank@node: %s)",
            placement.strategy, self.world_size, len({n.node_id for n in self._nodes}), where,
        )  # fmt: skip

    def _wait_placement(self, placement: Placement, timeout: float) -> None:
        """Until Ray has reserved every bundle; fails at once when a local Ray can never
        hold them (a cluster's autoscaler may still add a node: warn, keep waiting)."""
        deadline = time.monotonic() + timeout
        warned, pause = False, 0.5
        while not ray.wait([self._pg.ready()], timeout=pause)[0]:
            pause = min(5.0, pause * 2)
            table = placement_group_table(self._pg)
            state = table.get("stats", {}).get("scheduling_state", "?")
            why = (
                f"Ray cannot place {len(placement.bundles)} bundle(s) of {placement.bundles[0]} "
                f"({placement.strategy}: a replica stays on one node unless "
                f"ray_allow_cross_node=True; scheduling state {state}); the cluster has "
                f"{ray.cluster_resources()}, free {ray.available_resources()}"
            )
            if state == "INFEASIBLE" and _RaySession.started_locally():
                raise WorkerStartupError(f"{why}: this machine's Ray can never hold them")
            if time.monotonic() > deadline:
                raise WorkerStartupError(f"{why}; gave up after {timeout:.0f}s")
            if not warned:
                logger.warning("%s; waiting up to %.0fs", why, timeout)
                warned = True

    def _rendezvous(self, timeout: float) -> str:
        """Rank 0's actor hosts the TCPStore: on loopback when every rank shares its node,
        else on its node address (the only non-loopback listener besides ours)."""
        if self.world_size == 1:
            return ""
        spans = len({n.node_id for n in self._nodes}) > 1
        host = self._nodes[0].ip if spans else "127.0.0.1"
        try:
            ref = self._actors[0].host_store.remote(host, self.world_size, max(60.0, timeout))
            port = ray.get(ref, timeout=timeout)
        except Exception as e:  # noqa: BLE001 - any failure to start rank 0 is a start-up error
            raise WorkerStartupError(f"worker rank 0 could not host the rendezvous: {e}") from e
        return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"

    def _bind_sockets(self) -> tuple[list[str], list[str]]:
        """Each rank's batch and output addresses: ipc:// on the driver's node, else
        tcp:// on the driver's node address, where each rank's batch socket (a PUSH, which
        would hand batches to any peer that connects) admits only its rank's node."""
        local = [n.node_id == self._driver_node for n in self._nodes]
        remote_ips = sorted({n.ip for n in self._nodes if n.node_id != self._driver_node})
        if remote_ips:
            from zmq.auth.thread import ThreadAuthenticator

            self._auth = ThreadAuthenticator(self._ctx)
            self._auth.start()
            self._auth.allow(*remote_ips)
        self._output = self._ctx.socket(zmq.PULL)  # receives only: the token guards it
        out_ipc = out_tcp = ""
        if any(local):
            out_ipc = self._endpoint("out")
            self._output.bind(out_ipc)
        if remote_ips:
            out_tcp = self._bind_tcp(self._output)
        self._inputs, addrs = [], []
        for rank, here in enumerate(local):
            sock = self._ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            if here:
                addrs.append(self._endpoint(f"in{rank}"))
                sock.bind(addrs[-1])
            else:
                sock.zap_domain = b"fastvideo"  # the allow-list above applies
                sock.setsockopt(zmq.HEARTBEAT_IVL, ZMQ_HEARTBEAT_MS)
                sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, ZMQ_HEARTBEAT_TIMEOUT_MS)
                addrs.append(self._bind_tcp(sock))
            self._inputs.append(sock)
        self._connections = _Connections(self._inputs)
        return addrs, [out_ipc if here else out_tcp for here in local]

    def _bind_tcp(self, sock: zmq.Socket) -> str:
        if ":" in self._driver_ip:
            sock.setsockopt(zmq.IPV6, 1)
            sock.bind(f"tcp://[{self._driver_ip}]:*")
        else:
            sock.bind(f"tcp://{self._driver_ip}:*")
        return sock.getsockopt_string(zmq.LAST_ENDPOINT)

    @property
    def _pids(self) -> dict[int, int]:
        """Each ready rank's actor process id (from its WorkerReady)."""
        return {rank: ready.pid for rank, ready in self.ready.items()}

    def _ended_during_startup(self) -> str | None:
        ended = self._ended_rank(0)
        return None if ended is None else self._why_ended(ended)

    def _log_ready(self, slowest: WorkerReady) -> None:
        logger.info(
            "%d Ray worker(s) ready on %s (load %.1fs)",
            self.world_size,
            ", ".join(f"{r.device}@{self._nodes[r.rank].ip}" for r in self.ready.values()),
            slowest.load_seconds,
        )

    # --- liveness ----------------------------------------------------------------------
    SILENT_MEANS = "stopped, hung or its node is unreachable"

    def _who(self, rank: int) -> str:
        pid = f" pid {self._pids[rank]}" if rank in self._pids else ""
        return f"worker rank {rank} (Ray actor{pid} on {self._nodes[rank].ip})"

    def _ended_rank(self, timeout: float, ranks: list[int] | None = None) -> int | None:
        """A rank (of ``ranks``, default all) whose actor is gone, waiting up to ``timeout``."""
        runs = self._runs if ranks is None else [self._runs[r] for r in ranks]
        if not runs:
            return None
        done, _ = ray.wait(runs, num_returns=1, timeout=timeout)
        return self._runs.index(done[0]) if done else None

    def _why_ended(self, rank: int) -> str:
        try:
            code = ray.get(self._runs[rank], timeout=1.0)
            return f"{self._who(rank)} exited with code {code}"
        except ray.exceptions.RayActorError as e:
            first = (str(e).strip().splitlines() or [""])[0]
            return f"{self._who(rank)} died ({type(e).__name__}: {first[:200]})"
        except Exception as e:  # noqa: BLE001 - the task failed in some other way
            return f"{self._who(rank)} failed ({type(e).__name__}: {str(e)[:200]})"

    def _on_failure(self, msg: WorkerFailure) -> None:
        if msg.batch_id is not None:
            pending = self._pending.get(msg.batch_id)
            peers = pending.ranks if pending is not None and len(pending.ranks) > 1 else []
            ended = self._ended_rank(PEER_DEATH_GRACE_S if peers else 0)
            if ended is not None:  # a peer's death surfaced here first
                self._fail_all(f"{self._why_ended(ended)}; the engine has shut down")
                return
        super()._on_failure(msg)

    def _monitor(self) -> None:
        try:
            reason = self._watch()
        finally:  # before anyone terminates the ZeroMQ context
            if self._connections is not None:
                self._connections.close()
            self._watch_done.set()
        if self._closed:
            return
        self._fail_all(f"{reason}; the engine has shut down. Create a new generator to continue.")
        self.shutdown(grace=1.0)  # the others are likely stuck in a collective

    def _watch(self) -> str | None:
        """Until an actor is gone (its task ended, its connection closed, its heartbeats
        stopped or its progress stalled): why; None once the engine is closed."""
        while not self._closed:
            try:
                ended = self._ended_rank(0.25)
            except Exception as e:  # noqa: BLE001 - Ray itself is gone (shut down at exit)
                return f"the Ray connection failed ({type(e).__name__}: {e})"
            if ended is not None:
                return self._why_ended(ended)
            lost = self._connections.lost() if self._connections is not None else None
            if lost is not None:
                return f"{self._who(lost)} lost its connection: its process or its node is gone"
            reason = self._check_beats()
            if reason is not None:
                return reason
        return None

    # --- shutdown ----------------------------------------------------------------------
    def shutdown(self, grace: float = 5.0) -> None:
        """Ask every actor to stop, kill it, remove the placement group, close the sockets,
        leave Ray (stopping a local Ray this process started once no engine uses it).
        Safe to call more than once, from any thread; returns once the actors are gone."""
        with self._stop_lock:
            with self._lock:
                first, self._closed = not self._closed, True
            if not first:
                return
            try:
                self._stop_all(grace)
            finally:
                _live_executors.discard(self)
                if self._session:
                    self._session = False
                    _RaySession.release()
                self._shutdown_done.set()

    def _stop_all(self, grace: float) -> None:
        self._fail_all("the engine was shut down")
        frames = self._encoder.encode(Shutdown(self._token))
        for sock in getattr(self, "_inputs", []):
            try:
                sock.send_multipart(frames, flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        self._stop_actors(grace)
        io = self._io_thread
        if io is not None and io is not threading.current_thread():
            io.join(timeout=2.0)  # it owns the output socket until it sees _closed
        if self._io_thread is not None:  # the monitor thread was started too: it closes
            self._watch_done.wait(timeout=5.0)  # its sockets once it sees _closed
        elif self._connections is not None:
            self._connections.close()
        for sock in [*getattr(self, "_inputs", []), getattr(self, "_output", None)]:
            if sock is not None:
                sock.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
        self._ctx.term()
        shutil.rmtree(self._dir, ignore_errors=True)

    def _stop_actors(self, grace: float) -> None:
        """Let the actors leave on Shutdown within ``grace``, then kill them all and wait
        (bounded: a lost node's actors are only marked dead by Ray) until they are gone."""
        if not ray.is_initialized():
            return  # Ray was shut down first (at interpreter exit): it took the actors along
        try:
            if self._runs:
                ray.wait(self._runs, num_returns=len(self._runs), timeout=grace)
            for actor in self._actors:
                ray.kill(actor, no_restart=True)
            if self._runs:
                ray.wait(self._runs, num_returns=len(self._runs), timeout=STOP_WAIT_S)
            if self._pg is not None:
                remove_placement_group(self._pg)
        except Exception:  # noqa: BLE001 - shutting down must not raise
            logger.exception("error while stopping the Ray actors")
        # Ray reports an actor dead before its process has exited; on this node, wait for
        # the processes themselves (their GPU memory is free only then).
        here = [
            pid
            for rank, pid in self._pids.items()
            if self._nodes[rank].node_id == self._driver_node
        ]
        _wait_exited(here, STOP_WAIT_S)
