import pytest

from hkd4vlm.synth.generate import generate


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
def launch_two_processes():
    """``launch_two_processes(*cli_args, timeout=..., script=None)``: run ``hkd4vlm CLI_ARGS`` (or ``script``) under ``accelerate launch``
    with two CPU processes (gloo, one thread each) and return the finished process."""
    import os
    import subprocess
    import sys

    def launch(*cli_args: str, timeout: int, script: str | None = None) -> subprocess.CompletedProcess:
        # script: a Python file to run instead of the CLI (its arguments are cli_args)
        cmd = [
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
            *(["-m", "hkd4vlm.cli"] if script is None else [script]),
            *cli_args,
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)

    return launch
