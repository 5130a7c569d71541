"""Every measurement in a fresh process forked from a preloaded forkserver, with its own peak-memory counters."""

from __future__ import annotations

import multiprocessing
import os
import platform
import resource
import sys
import traceback
from collections.abc import Callable

from .settings import BenchError

#: what the forkserver imports once, so that every measurement process starts fast from the same baseline
#: (what ``load_model`` of a tiny LLaVA and the training loop import lazily, ~4 s per process otherwise)
PRELOAD = [
    "torch",
    "transformers",
    "transformers.modeling_utils",
    "transformers.generation.utils",
    "transformers.models.auto.modeling_auto",
    "transformers.models.auto.processing_auto",
    "transformers.models.llava.modeling_llava",
    "transformers.models.llava.processing_llava",
    "transformers.models.qwen2.modeling_qwen2",
    "transformers.models.clip.modeling_clip",
    "transformers.models.clip.image_processing_pil_clip",
    "accelerate",
    "torch.utils.tensorboard",
    "hkd4vlm.models.loading",
    "hkd4vlm.models.scoring",
    "hkd4vlm.infer.msei",
    "hkd4vlm.engine.loop",
    "hkd4vlm.distill.stages",
    "hkd4vlm.distill.cache",
]


def environment(requested_device: str | None, requested_threads: int | None) -> dict:
    """The device and torch thread count that every measurement will use."""
    import torch

    device = requested_device or ("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else _cpu_name()
    return {
        "device": device,
        "device_name": name,
        "threads": requested_threads or torch.get_num_threads(),
        "cuda": device.startswith("cuda"),
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _maxrss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


def _child(conn, fn: Callable, kwargs: dict, threads: int | None, device: str | None) -> None:
    try:
        # one device visible, so that the training loop (accelerate picks the first GPU) uses it too
        if device == "cpu":
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
        elif device and device.startswith("cuda:"):
            index = int(device.split(":", 1)[1])
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            os.environ["CUDA_VISIBLE_DEVICES"] = visible.split(",")[index] if visible else str(index)
        import torch
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        if threads:
            torch.set_num_threads(threads)
        cuda = device is not None and device.startswith("cuda")
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = _maxrss_mb()
        out = fn(**kwargs)
        out.update(start_rss_mb=start, peak_rss_mb=_maxrss_mb(), torch_threads=torch.get_num_threads())
        if cuda:
            out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
        # the figure of the device the work ran on (the teacher cache is built on the CPU)
        out["peak_memory_mb"] = out["peak_cuda_mb"] if out.get("device") == "cuda" else out["peak_rss_mb"]
        conn.send(("ok", out))
    except BaseException:  # the parent re-raises it with the child's traceback
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def in_fresh_process(fn: Callable, *, threads: int | None = None, device: str | None = None, **kwargs) -> dict:
    """``fn(**kwargs)`` in a new process forked from a forkserver that has only imported the libraries
    (a clean start and its own peak-memory counters); its dict gets the memory figures added."""
    # a CUDA check while the server imports must not initialise CUDA there: its forks could not use it
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    ctx = multiprocessing.get_context("forkserver")  # Linux and macOS (peak memory needs ``resource`` anyway)
    ctx.set_forkserver_preload(PRELOAD)  # only takes effect before the server starts
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, fn, kwargs, threads, device))
    proc.start()
    send.close()
    try:
        status, payload = receive.recv()
    except EOFError:
        proc.join()
        raise BenchError(f"the {fn.__name__} process died (exit code {proc.exitcode}); out of memory?") from None
    proc.join()
    if status != "ok":
        args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items() if k != "s")
        raise BenchError(f"{fn.__name__}({args}) failed:\n{payload}")
    return payload
