"""onnxruntime sessions, and an honest answer to "what device is this running on".

onnxruntime silently falls back to the CPU when the CUDA provider cannot start (missing
or mismatched CUDA/cuDNN libraries), so the device is read back from
`session.get_providers()` after creation, never assumed from what was asked for.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnxruntime as ort

from caption_cli.errors import BundleError, CaptionCliError

DEVICES = ("auto", "cpu", "cuda")
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
GPU_HINT = "pip uninstall onnxruntime && pip install 'caption-cli[gpu]'"


class DeviceError(CaptionCliError):
    """The requested device cannot run the model."""


def default_threads() -> int:
    """CPUs this process may use (respects taskset/cgroup affinity, unlike os.cpu_count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """One operator runs at a time (the graphs are sequential) on `threads` threads.

    The intra-op threads sleep instead of spinning between operators: the cores are
    shared with the decode workers, with the other session's threads and with the beam
    search's numpy work, all of which a spinning thread would starve. On the 2-core CPU
    with a second job running, encoder + search of batches of 16 measured 17-25 img/s
    with spinning and 39-42 img/s without (benchmarks/README.md).
    """
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or default_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: we report the device ourselves
    return options


def cuda_built_in() -> bool:
    """Whether this onnxruntime build has the CUDA provider (it may still fail to start)."""
    return CUDA in ort.get_available_providers()


def session_device(session: ort.InferenceSession) -> str:
    """"cuda" or "cpu": the provider that really runs the graph."""
    return "cuda" if session.get_providers()[0] == CUDA else "cpu"


def open_session(path: Path, device: str = "auto", *, threads: int | None = None) -> ort.InferenceSession:
    """Load one .onnx graph on `device` ("auto" | "cpu" | "cuda").

    auto: CUDA when it really starts, else the CPU. cuda: CUDA or a DeviceError.
    """
    if device not in DEVICES:
        raise DeviceError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if device == "cuda" and not cuda_built_in():
        raise DeviceError(f"device cuda: this onnxruntime build has no CUDA support "
                          f"(providers: {', '.join(ort.get_available_providers())}); "
                          f"install the GPU build ({GPU_HINT}) or use device auto or cpu")
    if device != "cpu" and cuda_built_in():
        _preload_cuda_libraries()
        try:
            session = _create(path, [(CUDA, {"device_id": 0}), CPU], threads)
        except Exception as exc:  # onnxruntime raises its own pybind exception types
            if device == "cuda":
                raise DeviceError(f"device cuda: {path}: onnxruntime could not start it on CUDA "
                                  f"({_first_line(exc)}); use device auto or cpu") from None
            session = _load_on_cpu(path, threads)  # auto: CUDA failed to initialise, use the CPU
    else:
        session = _load_on_cpu(path, threads)
    if device == "cuda" and session_device(session) != "cuda":
        raise DeviceError(f"device cuda: onnxruntime could not start {CUDA} (CUDA or cuDNN libraries missing "
                          f"or not matching this onnxruntime build; see onnxruntime's CUDA requirements); "
                          f"use device auto or cpu")
    return session


def _preload_cuda_libraries() -> None:
    """Load CUDA/cuDNN from the nvidia-* wheels when they are installed (the gpu extra's
    onnxruntime-gpu[cuda,cudnn]); without them onnxruntime looks in the system paths."""
    preload = getattr(ort, "preload_dlls", None)  # onnxruntime >= 1.21
    if preload is None:
        return
    try:
        preload()
    except Exception:  # noqa: BLE001 - missing wheels: the CUDA provider reports what it lacks
        pass


def _create(path: Path, providers: list, threads: int | None) -> ort.InferenceSession:
    # enable_fallback=0: onnxruntime's own fallback prints to stdout and can switch a
    # running session to the CPU behind our back; we choose the fallback ourselves.
    return ort.InferenceSession(str(path), sess_options=session_options(threads), providers=providers,
                                enable_fallback=0)


def _load_on_cpu(path: Path, threads: int | None) -> ort.InferenceSession:
    try:
        return _create(path, [CPU], threads)
    except Exception as exc:  # a graph the CPU cannot load is a broken bundle
        raise BundleError(f"{path}: onnxruntime cannot load it ({_first_line(exc)})") from None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def runtime_info() -> dict:
    """What `caption-cli info` shows about the runtime."""
    return {"onnxruntime": ort.__version__, "available_providers": ort.get_available_providers(),
            "cuda_built_in": cuda_built_in(), "cpu_threads": default_threads()}
