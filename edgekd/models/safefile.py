"""What a weights file must hold before its tensors are used: a ``.safetensors`` header that matches the
file (read here with ``json``, before the safetensors package reads the file), and a state_dict of
named dense tensors (every layout edgekd loads). Each problem is one CheckpointError naming the file.

A ``.safetensors`` file is an 8-byte little-endian header length N, N bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``, then the
tensors' bytes; the offsets count from the end of the header, each tensor's span holds exactly
prod(shape) x the dtype's size, and the spans follow each other from 0 to the end of the file (the
format's own rules, checked the same way by safetensors).
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch

from ..config.options import shown
from ..core.errors import CheckpointError

MAX_HEADER = 100_000_000  # bytes; safetensors refuses larger headers
MAX_RANK = 64
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
               "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}
SAFETENSORS_FIX = "pass a complete .safetensors file (as safetensors.torch.save_file writes it)"
STATE_FIX = "save model.state_dict() (layer names -> tensors), or .safetensors"


def damaged(path, problem: str, fix: str = SAFETENSORS_FIX) -> CheckpointError:
    return CheckpointError(f"cannot read weights file {path}: {problem}", fix)


def check_safetensors(path: Path) -> None:
    """Raise one CheckpointError unless ``path``'s header describes the file (see the module docstring)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise damaged(path, f"truncated ({size} bytes; the header length alone takes 8)")
        n = struct.unpack("<Q", head)[0]
        if n > min(MAX_HEADER, size - 8):
            raise damaged(path, f"its header length says {n} bytes, the file holds {size - 8} after it "
                                f"(truncated or not a .safetensors file)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):  # not UTF-8, not JSON, a number past Python's int-str limit
        raise damaged(path, "its header is not JSON text (not a .safetensors file, or corrupt)") from None
    if not isinstance(header, dict):
        raise damaged(path, "its header is not a JSON object of tensors")
    body, spans = size - 8 - n, []
    for name, entry in header.items():
        if name == "__metadata__":
            if not (isinstance(entry, dict) and all(isinstance(v, str) for v in entry.values())):
                raise damaged(path, "its __metadata__ is not a table of strings")
            continue
        spans.append(_span(path, name, entry, body))
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            raise damaged(path, f"tensor {shown(name, 60)} starts at byte {begin} of the data, expected {end} "
                                "(overlapping or gapped tensors)")
        end = stop
    if end != body:
        raise damaged(path, f"its tensors span {end} bytes, the file holds {body} after the header (truncated?)")


def _span(path, name: str, entry, body: int) -> tuple[int, int, str]:
    """(begin, end, name) of one tensor entry, every field checked against the file."""
    what = f"tensor {shown(name, 60)}"
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise damaged(path, f"{what} lacks dtype, shape or data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPE_BYTES:
        raise damaged(path, f"{what} has dtype {shown(dtype, 40)}, not one of {', '.join(DTYPE_BYTES)}")
    if not (isinstance(shape, list) and len(shape) <= MAX_RANK and all(_count(d) for d in shape)):
        raise damaged(path, f"{what} has shape {shown(shape, 60)}, not a list of integers >= 0")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_count(o) for o in offsets)
            and offsets[0] <= offsets[1] <= body):
        raise damaged(path, f"{what} has data_offsets {shown(offsets, 60)}, outside the {body} bytes of data")
    size = math.prod(shape) * DTYPE_BYTES[dtype]
    if size != offsets[1] - offsets[0]:
        raise damaged(path, f"{what} declares shape {shown(shape, 60)} of {dtype} ({_bytes(size)}) but its "
                            f"data_offsets span {offsets[1] - offsets[0]} bytes")
    return offsets[0], offsets[1], name


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _bytes(n: int) -> str:
    return f"{n} bytes" if n < 10**18 else "more than 10^18 bytes"


def check_state(state, path) -> dict:
    """``state`` if it maps names (strings) to dense tensors, else one CheckpointError naming the file."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is damaged: its state_dict is a {type(state).__name__}, not a table "
                              "of tensors", STATE_FIX)
    for key, value in state.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{path} is not a state_dict of named tensors: its key {shown(key, 60)} is not "
                                  f"a string (a layer name)", STATE_FIX)
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path} is not a state_dict of named tensors: {shown(key, 60)} holds a "
                                  f"{type(value).__name__}", STATE_FIX)
        if value.layout != torch.strided or value.is_quantized or value.is_meta:
            layout = "quantized" if value.is_quantized else "meta" if value.is_meta else str(value.layout)
            raise CheckpointError(f"{path}: tensor {shown(key, 60)} is a {layout} tensor, not a dense one",
                                  "save the float model's state_dict (dense tensors)")
    return state


def check_values(own: dict, state: dict, source) -> None:
    """Tensors of ``state`` that would load into ``own``'s float ones without complaint but give a
    broken model: integer, boolean or complex ones (silently cast: a teacher near chance, the
    imaginary part dropped), NaN or infinite values (every output NaN: a teacher at 10%, a student
    whose loss is NaN at its first step), a negative BatchNorm variance (its square root is NaN)."""
    for key, target in own.items():
        value = state.get(key)
        if not isinstance(value, torch.Tensor) or not target.is_floating_point():
            continue
        name = shown(key, 60)
        if not value.is_floating_point():
            raise CheckpointError(f"{source}: tensor {name} is {str(value.dtype).removeprefix('torch.')}, the model's "
                                  f"is {str(target.dtype).removeprefix('torch.')}", "save the float model's state_dict")
        if value.numel() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{source}: tensor {name} holds NaN or infinite values (weights of a run whose "
                                  "loss diverged, or a damaged file)", "use weights saved before the loss became NaN")
        if key.endswith("running_var") and value.numel() and bool((value < 0).any()):
            raise CheckpointError(f"{source}: tensor {name} (a BatchNorm variance) holds negative values",
                                  "use the file as the training saved it")
