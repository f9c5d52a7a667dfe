"""Running an engine (needs TensorRT, cuda-python and a GPU)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ...core.errors import EdgekdError
from .. import host_facts, padded_chunks
from .build import _call, _check, _device_name, _logger  # noqa: F401
from .plan import import_cudart, import_tensorrt


# --- running (needs TensorRT + cuda-python + a GPU) ---------------------------------------------------

class EngineHandle:
    """A deserialized engine, its execution context, a stream, two events and device buffers grown
    on demand. ``close()`` frees them (the runner's ``unload``; ``__del__`` calls it defensively);
    also a context manager."""

    def __init__(self, engine_path: Path, dla_core: int = -1):
        self.buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)
        self.stream = self.start = self.end = None
        self.context = self.engine = self.runtime = None
        self.closed = True  # nothing to release until the bindings are imported
        self.trt = import_tensorrt()
        self.cudart = import_cudart()
        self.closed = False
        self.runtime = self.trt.Runtime(_logger(self.trt))
        if dla_core >= 0 and dla_core < getattr(self.runtime, "num_DLA_cores", 0):
            self.runtime.DLA_core = dla_core
        self.engine = self.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise EdgekdError(f"TensorRT cannot load {engine_path} (built by another TensorRT version or GPU?)",
                              "rebuild it on this device with `edgekd compile BUNDLE`")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = self.trt.TensorIOMode.INPUT
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) != mode]
        self.batch_range = self._batch_range()
        self.stream = _call(self.cudart, self.cudart.cudaStreamCreate)
        self.start = _call(self.cudart, self.cudart.cudaEventCreate)
        self.end = _call(self.cudart, self.cudart.cudaEventCreate)

    def _batch_range(self) -> tuple[int, int]:
        """(min, max) batch the engine accepts: the fixed batch of a static input, else optimization
        profile 0's (the only one build_engine makes)."""
        name = self.inputs[0]
        shape = tuple(self.engine.get_tensor_shape(name))
        if shape and shape[0] >= 0:
            return int(shape[0]), int(shape[0])
        lo, _opt, hi = self.engine.get_tensor_profile_shape(name, 0)
        return int(lo[0]), int(hi[0])

    def _refused(self, batch: int, by_tensorrt: bool) -> EdgekdError:
        lo, hi = self.batch_range
        span = f"batch {lo}" if lo == hi else f"batch {lo}..{hi}"
        what = "TensorRT refused" if by_tensorrt else "the engine cannot take"
        return EdgekdError(f"{what} batch {batch}: the engine's optimization profile accepts {span}",
                           f"bench batch sizes within {lo}..{hi}, or rebuild the engine with `edgekd compile BUNDLE "
                           f"--profile P` whose bench batch sizes include {batch}"
                           + (" (a DLA engine takes one batch size)" if lo == hi else ""))

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self.buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                _call(self.cudart, self.cudart.cudaFree, ptr)
                self.buffers.pop(name)
            ptr = int(_call(self.cudart, self.cudart.cudaMalloc, nbytes))
            self.buffers[name] = (ptr, nbytes)
        self.context.set_tensor_address(name, ptr)
        return ptr

    def prepare(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Bind ``x`` to the input and return (host input, host output) arrays. A batch outside
        the engine's profile is refused with one EdgekdError naming both (``set_input_shape``
        returns False there; its result is checked, so no -1 shape reaches numpy)."""
        if self.closed:
            raise EdgekdError("this TensorRT engine handle was closed")
        name = self.inputs[0]
        dtype = self.trt.nptype(self.engine.get_tensor_dtype(name))
        host_in = np.ascontiguousarray(x, dtype=dtype)
        batch = int(host_in.shape[0]) if host_in.ndim else 0
        lo, hi = self.batch_range
        if not lo <= batch <= hi:
            raise self._refused(batch, by_tensorrt=False)
        if not self.context.set_input_shape(name, tuple(host_in.shape)):
            raise self._refused(batch, by_tensorrt=True)
        self._buffer(name, host_in.nbytes)
        host_out = None
        for out in self.outputs:  # execute_async_v3 needs an address for every I/O tensor
            shape = tuple(self.context.get_tensor_shape(out))
            if any(d < 0 for d in shape):
                raise EdgekdError(f"TensorRT left output {out!r} with shape {shape} for input shape {host_in.shape}",
                                  "the engine's input shape is not fully specified")
            array = np.empty(shape, dtype=self.trt.nptype(self.engine.get_tensor_dtype(out)))
            self._buffer(out, array.nbytes)
            host_out = array if host_out is None else host_out
        return host_in, host_out

    def infer(self, host_in: np.ndarray, host_out: np.ndarray, events: bool = False) -> None:
        """H2D copy, enqueue, D2H copy, synchronize; with ``events`` the compute is bracketed by
        CUDA events (read with ``compute_ms``)."""
        c = self.cudart
        h2d, d2h = c.cudaMemcpyKind.cudaMemcpyHostToDevice, c.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _call(c, c.cudaMemcpyAsync, self.buffers[self.inputs[0]][0], host_in.ctypes.data, host_in.nbytes, h2d, self.stream)
        if events:
            _call(c, c.cudaEventRecord, self.start, self.stream)
        if not self.context.execute_async_v3(int(self.stream)):
            raise EdgekdError("TensorRT execute_async_v3 failed")
        if events:
            _call(c, c.cudaEventRecord, self.end, self.stream)
        _call(c, c.cudaMemcpyAsync, host_out.ctypes.data, self.buffers[self.outputs[0]][0], host_out.nbytes, d2h, self.stream)
        _call(c, c.cudaStreamSynchronize, self.stream)

    def compute_ms(self) -> float:
        return float(_call(self.cudart, self.cudart.cudaEventElapsedTime, self.start, self.end))

    def close(self) -> None:
        """Free the device buffers, the events and the stream, then the context, engine and
        runtime (in that order: a context before its engine, an engine before its runtime).
        Idempotent; the first CUDA error is raised after everything was released."""
        if getattr(self, "closed", True):
            return
        self.closed = True
        c, failed = self.cudart, []

        def release(fn, arg, what):
            try:
                result = fn(arg)
                err = result[0] if isinstance(result, tuple) else result
                if int(err) != 0:
                    failed.append(f"{what} failed with error {int(err)}")
            except Exception as e:  # keep releasing the rest
                failed.append(f"{what}: {e}")

        if self.stream is not None:
            release(c.cudaStreamSynchronize, self.stream, "cudaStreamSynchronize")
        self.context = None
        for name, (ptr, _) in list(self.buffers.items()):
            if ptr:
                release(c.cudaFree, ptr, f"cudaFree({name})")
        self.buffers.clear()
        for attr in ("start", "end"):
            if getattr(self, attr) is not None:
                release(c.cudaEventDestroy, getattr(self, attr), "cudaEventDestroy")
                setattr(self, attr, None)
        if self.stream is not None:
            release(c.cudaStreamDestroy, self.stream, "cudaStreamDestroy")
            self.stream = None
        self.engine = None
        self.runtime = None
        if failed:
            raise EdgekdError(f"releasing the TensorRT engine's CUDA resources: {failed[0]}")

    def __enter__(self) -> EngineHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class TensorrtRunner:
    """The ``Runner`` for TensorRT engine bundles. ``timed_call`` times what an application sees
    (H2D copy + compute + D2H copy + synchronize, pageable host memory); ``device_timing``
    reports the GPU compute alone (CUDA events around ``execute_async_v3``). ``unload`` (or
    ``close``) frees a handle's device memory, stream and events."""

    name = "tensorrt"

    def load(self, model_path: Path, threads: int = 0, options: dict | None = None) -> Any:
        model_path = Path(model_path)
        if model_path.suffix != ".engine":
            raise EdgekdError(f"{model_path.parent} holds no TensorRT engine yet (compiled: false)",
                              f"build it on the device: edgekd compile {model_path.parent}")
        return EngineHandle(model_path, int((options or {}).get("dla_core", -1)))

    def unload(self, handle: EngineHandle) -> None:
        handle.close()

    close = unload

    def run(self, handle: EngineHandle, x: np.ndarray) -> np.ndarray:
        """Logits for all of ``x``: in chunks of at most the profile's max batch; a chunk below
        its min (a DLA engine's one batch size) is padded by repeating samples, the padding
        dropped. Only here: timing (``timed_call``) refuses batches outside the profile instead."""
        lo, hi = handle.batch_range
        outputs = []
        for chunk, n in padded_chunks(x, hi, lo):
            host_in, host_out = handle.prepare(chunk)
            handle.infer(host_in, host_out)
            outputs.append(host_out[:n].astype(np.float32, copy=True))
        if not outputs:
            raise EdgekdError("no samples to run")
        return outputs[0] if len(outputs) == 1 else np.concatenate(outputs)

    def timed_call(self, handle: EngineHandle, x: np.ndarray):
        host_in, host_out = handle.prepare(x)
        return lambda: handle.infer(host_in, host_out)

    def device_timing(self, handle: EngineHandle, x: np.ndarray, iterations: int = 100) -> dict:
        host_in, host_out = handle.prepare(x)
        times = []
        for _ in range(iterations):
            handle.infer(host_in, host_out, events=True)
            times.append(handle.compute_ms())
        ms = np.asarray(times)
        return {"gpu_compute_ms": {"mean": float(ms.mean()), "p50": float(np.percentile(ms, 50)),
                                   "p99": float(np.percentile(ms, 99))}, "runs": iterations,
                "note": "GPU time between CUDA events around execute_async_v3; latency_ms adds H2D + D2H copies"}

    def input_info(self, handle: EngineHandle) -> dict:
        name = handle.inputs[0]
        shape = list(handle.engine.get_tensor_shape(name))
        lo, hi = handle.batch_range
        return {"name": name, "names": list(handle.inputs), "shape": shape, "batch_range": [lo, hi],
                "fixed_batch": lo if lo == hi else None}

    def describe_environment(self, handle: EngineHandle | None = None) -> dict:
        env = host_facts()
        env["runtime"] = "tensorrt"
        try:
            trt = import_tensorrt()
            env["tensorrt_version"] = trt.__version__
            env["gpu"] = _device_name()
        except EdgekdError:
            pass
        if handle is not None:
            env["engine_batch_range"] = list(handle.batch_range)
        return env


RUNNER = TensorrtRunner()
