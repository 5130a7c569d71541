import os

import pytest

from hkd4vlm.synth.generate import generate


def pytest_configure(config):
    """Under pytest-xdist (``make test`` runs one worker per core) each worker and what it launches
    computes on one thread: two workers each asking for both cores would stall each other's intra-op threads."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Files holding a test marked ``heavy`` go first. ``make test`` hands whole files to its workers
    (``--dist loadfile``, in collection order with ``--no-loadscope-reorder``): a file of a minute or two
    handed out last would leave one worker running it alone while the other has finished."""
    heavy = {item.path for item in items if item.get_closest_marker("heavy")}
    items.sort(key=lambda item: item.path not in heavy)  # stable: files stay whole and in their order


@pytest.fixture(scope="session")
def free_port():
    """``free_port()``: a TCP port nobody listened on a moment ago (for a server or rendezvous a test starts in
    another process; tests run side by side under pytest-xdist, so none takes a fixed port)."""
    import socket

    def pick() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    return pick


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    """A small medium-level benchmark, generated once per test session."""
    root = tmp_path_factory.mktemp("synth") / "data"
    generate(root, level="medium", sizes={"train": 48, "val": 8, "test": 16}, seed=3, workers=1, baselines=False)
    return root


@pytest.fixture(scope="session")
def sharpen():
    """``sharpen(model, seed)``: add large random noise to every weight, so that a tiny model's answers depend
    strongly on the prompt (a fresh init answers nearly uniformly, which would let a wrong mapping or a
    mixed-up batch pass unnoticed)."""
    import torch

    def add_noise(model, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.15)

    return add_noise


@pytest.fixture(scope="session")
def launch_two_processes(tmp_path_factory, free_port):
    """``launch_two_processes(*cli_args, timeout=..., script=None)``: run ``hkd4vlm CLI_ARGS`` (or ``script``) under ``accelerate launch``
    with two CPU processes (gloo, one thread each) and return the finished process. One launch at a time across
    pytest-xdist's workers (a lock file in the run's shared temporary folder), each on its own rendezvous port."""
    import fcntl
    import subprocess
    import sys

    lock = tmp_path_factory.getbasetemp().parent / "launch_two_processes.lock"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def command(cli_args: tuple[str, ...], script: str | None) -> list[str]:
        return [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--multi_gpu",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(free_port()),
            *(["-m", "hkd4vlm.cli"] if script is None else [script]),
            *cli_args,
        ]

    def launch(*cli_args: str, timeout: int, script: str | None = None) -> subprocess.CompletedProcess:
        # script: a Python file to run instead of the CLI (its arguments are cli_args)
        with open(lock, "a") as held:
            fcntl.flock(held, fcntl.LOCK_EX)
            return subprocess.run(command(cli_args, script), env=env, capture_output=True, text=True, timeout=timeout)

    return launch
