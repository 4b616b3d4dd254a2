"""The Ray executor (``executor="ray"``) with CPU actors: the same latents and frames as the
worker processes for CFG, Ulysses and ring plans on 2 and 3 actors; an actor killed
mid-request (EngineDeadError within seconds, nothing left behind, then a new engine serves
an offline list on two throughput replicas); a local Ray the engine starts and stops; two
Ray nodes on one machine serving one replica each, then the second node lost mid-request.
Those start Ray and are marked slow; placement and configuration checks are not.

Tolerance: the actors run the worker processes' loop with the same plan and the same thread
count, so latents match within relative error 1e-6 (L2 norm of the difference over the
reference's; measured: 0, bit-identical) and uint8 frames within one level; a different
seed is checked to be far outside that tolerance. Throughput-mode outputs (one rank per
replica) are compared with the in-process executor (frames within one level).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import psutil
import pytest
import torch
import zmq

from fastvideo import EngineDeadError, PipelineConfig, VideoGenerator

# Token authentication for every Ray of this module (a local ray.init turns it on anyway);
# Ray reads the mode once, at import, so it is set before.
os.environ.setdefault("RAY_AUTH_MODE", "token")
ray = pytest.importorskip(
    "ray", reason="executor='ray' needs the optional extra: pip install 'fastvideo[ray]'"
)

PROMPT = "a red fox walking through a snowy forest at dawn"
SMALL = dict(height=48, width=80, num_frames=5, num_inference_steps=3, seed=7,
             negative_prompt="blurry")  # fmt: skip
PROMPTS = ["a red fox in the snow", "a blue whale in the deep sea"]
LATENT_RTOL = 1e-6
KILL_TO_ERROR_LIMIT_S = 5.0


def _ray_gen(folder, **kw) -> VideoGenerator:
    return VideoGenerator.from_pretrained(str(folder), device="cpu", executor="ray", **kw)


def _rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    assert ours.shape == ref.shape and ours.dtype == ref.dtype == torch.float32
    return ((ours - ref).norm() / ref.norm()).item()


def _max_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def _wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


class _Replicas:
    """Wraps executor.submit to record the replica of every batch."""

    def __init__(self, executor):
        self.used: list[int] = []
        self._submit = executor.submit
        executor.submit = self

    def __call__(self, batch, on_progress=None):
        self.used.append(batch.replica)
        return self._submit(batch, on_progress)


class _LongRequests:
    """``count`` 1000-step requests, each on its own thread; ``denoising`` is set once each
    of their batches has passed denoising step 2; ``outcomes`` holds (error, when) each."""

    def __init__(self, gen: VideoGenerator, count: int):
        self.denoising = threading.Event()
        self.outcomes: list[tuple[BaseException | None, float]] = []
        stepping: set[str] = set()
        submit = gen.executor.submit

        def observed_submit(batch, progress=None):
            def on_progress(event):
                if event.stage == "denoising" and event.step >= 2:
                    stepping.add(event.batch_id)
                    if len(stepping) >= count:
                        self.denoising.set()
                if progress is not None:
                    progress(event)

            return submit(batch, on_progress)

        gen.executor.submit = observed_submit
        self.threads = [
            threading.Thread(target=self._run, args=(gen, seed), daemon=True)
            for seed in range(count)
        ]
        for thread in self.threads:
            thread.start()

    def _run(self, gen: VideoGenerator, seed: int) -> None:
        error = None
        try:
            gen.generate_video(PROMPT, height=128, width=128, num_frames=17,
                               num_inference_steps=1000, seed=seed)  # fmt: skip
        except BaseException as e:  # noqa: BLE001 - the tests check it
            error = e
        self.outcomes.append((error, time.monotonic()))

    def join(self, timeout: float) -> bool:
        for thread in self.threads:
            thread.join(timeout=timeout)
        return not any(t.is_alive() for t in self.threads)

    def check_dead_within(self, since: float, limit: float, needle: str) -> None:
        for error, at in self.outcomes:
            print(f"\n{needle} -> {type(error).__name__} after {(at - since) * 1000:.0f} ms")
            assert isinstance(error, EngineDeadError), repr(error)
            assert needle in str(error), str(error)
            assert at - since < limit


@pytest.fixture(scope="module")
def inproc_list(tiny_a):
    """In-process outputs of PROMPTS (seeds 7, 8, ...): the reference for replicas."""
    with VideoGenerator.from_pretrained(str(tiny_a[0]), executor="inproc") as gen:
        outputs = gen.generate_video(PROMPTS, **SMALL)
    assert _max_diff(outputs[0].frames, outputs[1].frames) > 10, "prompts must matter"
    return outputs


def _check_against(outputs, reference) -> None:
    """Throughput-mode outputs equal the in-process ones, prompt by prompt."""
    for i, (ours, ref) in enumerate(zip(outputs, reference, strict=True)):
        assert ours.plan == "2 replicas of single rank", ours.plan
        assert _max_diff(ours.frames, ref.frames) <= 1, f"prompt {i}"


# --- one local Ray for the class, started by the test ---------------------------------------
# (id, num_gpus, forced PipelineConfig fields, [(guidance, output_type, expected plan)])
CASES = [
    ("2-cfg-ulysses", 2, {}, [(5.0, "latent", "CFG 2"), (5.0, "np", "CFG 2"),
                              (1.0, "latent", "Ulysses 2")]),
    ("3-ring", 3, dict(ring_degree=3), [(5.0, "latent", "ring 3"), (1.0, "np", "ring 3")]),
]  # fmt: skip


def _generate(gen: VideoGenerator, runs, seed: int = SMALL["seed"]) -> list:
    params = {**SMALL, "seed": seed}
    return [
        gen.generate_video(PROMPT, guidance_scale=g, output_type=o, **params) for g, o, _ in runs
    ]


@pytest.mark.slow
class TestOnALocalRay:
    @pytest.fixture(scope="class", autouse=True)
    def local_ray(self):
        assert not ray.is_initialized(), "a previous test left Ray running"
        ray.init(address="local", include_dashboard=False, num_cpus=3)
        yield
        ray.shutdown()

    @pytest.mark.parametrize(
        "num_gpus, forced, runs", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
    )
    def test_same_output_as_worker_processes(self, tiny_a, num_gpus, forced, runs):
        folder = str(tiny_a[0])
        with VideoGenerator.from_pretrained(
            folder, num_gpus=num_gpus, device="cpu", **forced
        ) as mp:
            expected = _generate(mp, runs)
        with _ray_gen(folder, num_gpus=num_gpus, **forced) as gen:
            executor = gen.executor
            # One node: every socket of ours is ipc://, the rendezvous on loopback.
            endpoints = [s.getsockopt_string(zmq.LAST_ENDPOINT) for s in executor._inputs]
            assert all(e.startswith("ipc://") for e in endpoints), endpoints
            assert executor._store_path.startswith("tcp://127.0.0.1:")
            got = _generate(gen, runs)
            other_seed = _generate(gen, runs[:1], seed=SMALL["seed"] + 1)[0]
            # Control messages reach every rank and come back in rank order.
            replies = executor.control("lora_list", {}).result(timeout=30)
            assert [(r.rank, r.error) for r in replies] == [(r, "") for r in range(num_gpus)]
        for (g, kind, plan), ours, ref in zip(runs, got, expected, strict=True):
            assert ours.plan == ref.plan == plan, (ours.plan, ref.plan, plan)
            if kind == "latent":
                rel = _rel_err(ours.latents, ref.latents)
                print(f"\n{plan} g={g}: latent rel err vs worker processes {rel:.1e}")
                assert rel < LATENT_RTOL
            else:
                assert ref.frames.std() > 1.0, "flat frames would prove nothing"
                assert _max_diff(ours.frames, ref.frames) <= 1
        power = _rel_err(other_seed.latents, expected[0].latents)
        assert power > 1000 * LATENT_RTOL, f"another seed is only {power:.1e} away"

    def test_killed_actor_fails_fast_leaves_nothing_and_a_new_engine_serves(
        self, tiny_a, inproc_list
    ):
        """ray.kill of one actor mid-request: EngineDeadError within seconds, no actor,
        placement group or reserved CPU left; then a new engine (throughput mode) serves an
        offline list on both of its replicas."""
        folder = str(tiny_a[0])
        gen = _ray_gen(folder, num_gpus=2)
        try:
            executor = gen.executor
            pids = dict(executor._pids)
            long = _LongRequests(gen, 1)
            assert long.denoising.wait(timeout=60), "the long request never reached step 2"
            killed_at = time.monotonic()
            ray.kill(executor._actors[1])
            assert long.join(30), "generate_video did not return after an actor died"
            long.check_dead_within(killed_at, KILL_TO_ERROR_LIMIT_S, "rank 1")
            gen.shutdown()
            # Nothing left: no actor processes, no placement group, no reserved CPUs.
            assert all(_gone(pid) for pid in pids.values()), pids
            groups = ray.util.placement_group_table()
            assert groups and all(g["state"] == "REMOVED" for g in groups.values()), groups
            assert _wait_until(lambda: ray.available_resources().get("CPU") == 3.0, 10), (
                ray.available_resources()
            )
            assert not os.path.exists(executor._dir) and not executor.is_alive
            with pytest.raises(EngineDeadError):
                gen.generate_video(PROMPT, **SMALL)
        finally:
            gen.shutdown()
        with _ray_gen(folder, num_gpus=2, parallel_mode="throughput") as fresh:
            table = ray.util.placement_group_table(fresh.executor._pg)
            assert table["strategy"] == "SPREAD" and len(table["bundles"]) == 2, table
            replicas = _Replicas(fresh.executor)
            outputs = fresh.generate_video(PROMPTS, **SMALL)
        assert sorted(set(replicas.used)) == [0, 1], replicas.used
        _check_against(outputs, inproc_list)


# --- a Ray the engine starts (and stops) itself ------------------------------------------------
@pytest.mark.slow
def test_engine_starts_and_stops_its_own_local_ray(tiny_a, inproc_list):
    assert not ray.is_initialized(), "a previous test left Ray running"
    with _ray_gen(tiny_a[0], num_gpus=1) as gen:
        assert ray.is_initialized()
        out = gen.generate_video(PROMPTS[0], **SMALL)
    assert not ray.is_initialized(), "the engine must stop the Ray it started"
    assert out.plan == "single rank"
    assert _max_diff(out.frames, inproc_list[0].frames) <= 1


# --- two Ray nodes on this machine ---------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class _Cluster:
    address: str
    sessions: list[int]  # head's, then the second node's: each node's processes


@pytest.fixture
def two_ray_nodes():
    """A head node (resource node_a) and a second node (node_b), 2 CPUs each, each its own
    ``ray start --block`` in its own session with its own temp dir and random ports, with
    token authentication (Ray's per-user token file, which a local ``ray.init`` also uses).
    Torn down by killing those two sessions (``ray stop`` would stop every Ray of the
    machine)."""
    assert not ray.is_initialized(), "a previous test left Ray running"
    assert os.environ.get("RAY_AUTH_MODE") == "token", "the nodes would accept anyone"
    exe = os.path.join(os.path.dirname(sys.executable), "ray")
    random_ports = [
        f"--{name}-port=0"
        for name in ("node-manager", "object-manager", "min-worker", "max-worker",
                     "dashboard-agent-listen", "dashboard-agent-grpc", "runtime-env-agent",
                     "metrics-export")
    ]  # fmt: skip
    port = _free_port()
    nodes: list[tuple[subprocess.Popen, str]] = []

    def start(name: str, args: list[str]) -> None:
        temp = tempfile.mkdtemp(prefix=f"fvray-{name}-")  # short: Ray's socket paths
        log = open(os.path.join(temp, "start.log"), "w")  # noqa: SIM115 - closed by the child
        resources = f'--resources={{"{name}": 2}}'
        cmd = [exe, "start", "--block", "--disable-usage-stats", "--num-cpus=2",
               f"--temp-dir={temp}", resources, *random_ports, *args]  # fmt: skip
        nodes.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True), temp))  # fmt: skip

    try:
        start("node_a", ["--head", f"--port={port}", "--include-dashboard=false"])
        assert _wait_until(lambda: _started(nodes[0][1]), 60), "the head node did not start"
        start("node_b", [f"--address=127.0.0.1:{port}"])
        assert _wait_until(lambda: _started(nodes[1][1]), 60), "the second node did not start"
        yield _Cluster(f"127.0.0.1:{port}", [proc.pid for proc, _ in nodes])
    finally:
        if ray.is_initialized():
            ray.shutdown()
        for proc, _ in nodes:
            _kill_session(proc.pid)
        for proc, temp in nodes:
            proc.wait(timeout=10)
            sid = proc.pid
            assert _wait_until(lambda sid=sid: not _session_members(sid), 10), "Ray left processes"
            shutil.rmtree(temp, ignore_errors=True)


def _started(temp: str) -> bool:
    """``ray start`` says so once its node has registered with the head."""
    with open(os.path.join(temp, "start.log")) as f:
        return "Ray runtime started" in f.read()


def _kill_session(sid: int) -> None:
    """SIGKILL every process of a session started here (Ray puts workers in process groups
    of their own, so killing the leader's group would miss them)."""
    for pid in _session_members(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _session_members(sid: int) -> list[int]:
    members = []
    for p in psutil.process_iter(["pid", "status"]):
        try:
            if os.getsid(p.pid) == sid and p.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(p.pid)
        except (OSError, psutil.Error):
            pass
    return members


@pytest.mark.slow
def test_two_nodes_serve_one_replica_each_then_one_node_is_lost(tiny_a, inproc_list, two_ray_nodes):
    """A replica on each node, both serving an offline list; then the second node's
    processes are killed mid-request: every request fails fast with EngineDeadError and
    shutdown does not hang on the lost node."""
    gen = _ray_gen(tiny_a[0], num_gpus=2, parallel_mode="throughput",
                   ray_address=two_ray_nodes.address)  # fmt: skip
    try:
        executor = gen.executor
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        resources = {n["NodeID"]: n["Resources"] for n in ray.nodes()}
        labels = [
            {k for k in resources[node.node_id] if k in ("node_a", "node_b")}
            for node in executor._nodes
        ]
        assert sorted(map(sorted, labels)) == [["node_a"], ["node_b"]], labels
        # The rank off the driver's node talks to it over tcp://, the other over ipc://.
        endpoints = sorted(s.getsockopt_string(zmq.LAST_ENDPOINT)[:6] for s in executor._inputs)
        assert endpoints == ["ipc://", "tcp://"], endpoints
        assert not executor._store_path.startswith("tcp://127.0.0.1:"), "actors span nodes"
        replicas = _Replicas(executor)
        outputs = gen.generate_video(PROMPTS, **SMALL)
        assert sorted(set(replicas.used)) == [0, 1], replicas.used
        _check_against(outputs, inproc_list)

        remote = next(
            r for r, n in enumerate(executor._nodes) if n.node_id != executor._driver_node
        )
        session = os.getsid(executor._pids[remote])
        # The driver joins the first node registered at its address: the head.
        assert session == two_ray_nodes.sessions[1], "expected the second node off the driver's"
        long = _LongRequests(gen, 2)
        assert long.denoising.wait(timeout=60), "the long requests never reached step 2"
        lost_at = time.monotonic()
        _kill_session(session)  # the second node's raylet, its workers, everything
        assert long.join(30), "generate_video did not return after a node was lost"
        long.check_dead_within(lost_at, KILL_TO_ERROR_LIMIT_S, f"rank {remote}")
    finally:
        start = time.monotonic()
        gen.shutdown()
        stopped_in = time.monotonic() - start
    print(f"shutdown after the node loss took {stopped_in:.1f}s")
    assert stopped_in < 15, "shutdown hung on the lost node"
    assert not ray.is_initialized(), "the engine must leave the cluster it joined"


def test_missing_ray_is_named(monkeypatch):
    """Without the extra, the error says how to install it (checked with ray hidden)."""
    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.delitem(sys.modules, "fastvideo.executor.ray_executor", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'fastvideo\[ray\]'"):
        import fastvideo.executor.ray_executor  # noqa: F401


# --- pure: placement and configuration (no Ray started) --------------------------------------
@pytest.mark.parametrize(
    "fields, gpu, strategy, bundles, bundle_of_rank",
    [
        # latency (and auto) plans span every rank: one node
        (dict(num_gpus=4), True, "STRICT_PACK", [{"CPU": 1.0, "GPU": 1.0}] * 4, [0, 1, 2, 3]),
        # throughput: a bundle per replica (never split), spread over the nodes
        (dict(num_gpus=4, parallel_mode="throughput", throughput_replicas=2), True, "SPREAD",
         [{"CPU": 2.0, "GPU": 2.0}] * 2, [0, 0, 1, 1]),
        (dict(num_gpus=3, parallel_mode="throughput"), False, "SPREAD", [{"CPU": 1.0}] * 3,
         [0, 1, 2]),
        (dict(num_gpus=2, ray_allow_cross_node=True), True, "PACK",
         [{"CPU": 1.0, "GPU": 1.0}] * 2, [0, 1]),
        (dict(num_gpus=2), False, "STRICT_PACK", [{"CPU": 1.0}] * 2, [0, 1]),
    ],
)  # fmt: skip
def test_placement_keeps_each_replica_on_one_node(fields, gpu, strategy, bundles, bundle_of_rank):
    from fastvideo.executor.ray_executor import plan_placement

    placement = plan_placement(PipelineConfig(**fields), gpu=gpu)
    assert placement.strategy == strategy
    assert placement.bundles == bundles
    assert placement.bundle_of_rank == bundle_of_rank


@pytest.mark.parametrize(
    "address, error, match",
    [
        ("ray://10.0.0.1:10001", ValueError, "Ray Client"),
        ("", TypeError, "ray_address must be"),
        (6379, TypeError, "ray_address must be"),
    ],
)
def test_bad_ray_address_is_refused_before_anything_starts(address, error, match):
    with pytest.raises(error, match=match):
        PipelineConfig(executor="ray", ray_address=address).validate()
    PipelineConfig(executor="ray", ray_address="10.0.0.1:6379").validate()
    with pytest.raises(TypeError, match="ray_allow_cross_node"):
        PipelineConfig(ray_allow_cross_node="yes").validate()
