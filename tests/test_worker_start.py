"""How worker processes start: forked from the driver where that is safe, else spawned
(``fastvideo.executor.forked``). The end-to-end checks (forked CPU workers give the
in-process frames and exit with a killed driver) are in test_engine_lifecycle.py."""

from __future__ import annotations

import os
import subprocess
import threading
import time

import pytest

from fastvideo.executor import forked


@pytest.fixture
def cuda_state(monkeypatch):
    state = {"initialized": False}
    monkeypatch.setattr(forked, "cuda_driver_initialized", lambda: state["initialized"])
    monkeypatch.delenv("FASTVIDEO_WORKER_START", raising=False)
    return state


def test_auto_forks_cuda_workers_only_when_safe(cuda_state, monkeypatch):
    threads = {"others": False}
    monkeypatch.setattr(forked, "other_python_threads", lambda: threads["others"])
    assert forked.start_method("cuda")[0] == "fork"
    method, why = forked.start_method("cpu")
    assert method == "spawn" and "CPU workers" in why
    cuda_state["initialized"] = True
    method, why = forked.start_method("cuda")
    assert method == "spawn" and "CUDA is initialised" in why
    cuda_state["initialized"] = False
    threads["others"] = True
    method, why = forked.start_method("cuda")
    assert method == "spawn" and "threads" in why


def test_another_python_thread_is_seen():
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        assert forked.other_python_threads()
    finally:
        stop.set()
        other.join()


def test_the_environment_variable_picks_the_start(cuda_state, monkeypatch):
    monkeypatch.setenv("FASTVIDEO_WORKER_START", "spawn")
    assert forked.start_method("cuda")[0] == "spawn"
    monkeypatch.setenv("FASTVIDEO_WORKER_START", "fork")
    assert forked.start_method("cpu")[0] == "fork"
    cuda_state["initialized"] = True
    with pytest.raises(RuntimeError, match="CUDA is already initialised"):
        forked.start_method("cuda")
    monkeypatch.setenv("FASTVIDEO_WORKER_START", "vfork")
    with pytest.raises(ValueError, match="FASTVIDEO_WORKER_START='vfork'"):
        forked.start_method("cuda")


def test_no_cuda_driver_in_a_cpu_process():
    """This machine's torch has no CUDA: nothing maps libcuda, so nothing initialised it."""
    assert forked.cuda_driver_initialized() is False


def _until_eof(fd: int) -> None:
    while os.read(fd, 4096):
        pass
    raise SystemExit(7)


def test_each_forked_child_sees_only_its_own_death_pipe():
    """A child closes the driver's ends of the pipes of the children forked before it, so
    closing one child's stdin ends that child while the others run on."""
    first = forked.fork_worker({}, _until_eof)
    second = forked.fork_worker({"FASTVIDEO_TEST_MARK": "1"}, _until_eof)
    try:
        assert os.getsid(first.pid) == first.pid  # each in its own session
        assert first.poll() is None and second.poll() is None
        first.stdin.write(b"x" * 100_000)  # more than a pipe holds: the child reads it all
        first.stdin.close()
        assert first.wait(timeout=10) == 7
        time.sleep(0.2)
        assert second.poll() is None, "closing the first child's stdin ended the second"
        with pytest.raises(subprocess.TimeoutExpired):
            second.wait(timeout=0.05)
        second.kill()
        assert second.wait(timeout=10) == -9
        second.kill()  # on an exited child: nothing happens
        assert second.poll() == -9
    finally:
        for child in (first, second):
            if child.poll() is None:
                child.kill()
                child.wait(timeout=10)
        second.stdin.close()


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_workers_started_early_are_told_their_device_type(monkeypatch, device):
    """spawn_workers hands each worker (forked or spawned) the device type it will get,
    which a CUDA worker uses while it waits for its arguments (FA4's import)."""
    from fastvideo.executor import multiproc
    from fastvideo.worker.main import ATTENTION_HINT, DEVICE_HINT

    envs = []
    monkeypatch.setattr(forked, "start_method", lambda d: ("fork", "test"))
    monkeypatch.setattr(forked, "fork_worker", lambda env: envs.append(env) or "forked")
    assert multiproc.spawn_workers(2, device, "sdpa") == ["forked", "forked"]
    expected = ["cuda:0", "cuda:1"] if device == "cuda" else ["cpu", "cpu"]
    assert [env[DEVICE_HINT] for env in envs] == expected
    assert [env[ATTENTION_HINT] for env in envs] == ["sdpa", "sdpa"]
    popen = []
    monkeypatch.setattr(forked, "start_method", lambda d: ("spawn", "test"))
    monkeypatch.setattr(subprocess, "Popen", lambda cmd, **kw: popen.append(kw["env"]) or "proc")
    assert multiproc.spawn_workers(1, device) == ["proc"]
    assert popen[0][DEVICE_HINT] == expected[0] and popen[0][ATTENTION_HINT] == "auto"


@pytest.mark.parametrize("hint", ["cuda:1", "cpu", None])
def test_a_cuda_worker_prepares_its_device_before_its_arguments(monkeypatch, hint):
    """worker.main: with the driver's hint "cuda:i" the FA4 preload starts and device i's
    context is made before the worker blocks on its arguments; a CPU worker (or one
    without the hint) does neither; a failing context is left to the real start-up."""
    import torch

    from fastvideo.kernels_bridge import attention
    from fastvideo.worker import main as worker_main

    order = []
    monkeypatch.setattr(
        attention, "preload_before_args", lambda asked=None: order.append(f"preload {asked}")
    )

    def set_device(device):
        order.append(str(device))
        raise RuntimeError("no such device")  # logged, not raised

    monkeypatch.setattr(torch.cuda, "set_device", set_device)

    def read_args(fd):
        order.append("args")
        raise SystemExit("stop here")

    monkeypatch.setattr(worker_main, "_read_args", read_args)
    if hint is None:
        monkeypatch.delenv(worker_main.DEVICE_HINT, raising=False)
    else:
        monkeypatch.setenv(worker_main.DEVICE_HINT, hint)
    monkeypatch.setenv(worker_main.ATTENTION_HINT, "fa4")
    with pytest.raises(SystemExit, match="stop here"):
        worker_main.main(stdin_fd=0)
    assert order == (["preload fa4", "cuda:1", "args"] if hint == "cuda:1" else ["args"])
