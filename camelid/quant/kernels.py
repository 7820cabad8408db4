"""camelid's CPU kernels for quantized matrix-vector products (kernels.cpp), built on first use.

The source is compiled once per machine with the host's own instruction set (`-march=native`)
by `torch.utils.cpp_extension` into torch's extension cache (~/.cache/torch_extensions, or
$TORCH_EXTENSIONS_DIR) and registered as the operators `torch.ops.camelid.*` (`int8_gemv`,
`int4_gemv`, their `*_many` forms for several weights sharing one input, `dequantize`, and
`decode_block`, a whole transformer block for one new token per row, and `decode_blocks`, all of them), which
`torch.compile` keeps inside a compiled decode step. The
build takes 10-20 s the first time and needs the C++ compiler that inductor needs anyway;
where it fails, the quantized layers fall back to their pure-PyTorch formulation with one
warning.
"""

from __future__ import annotations

import hashlib
import platform
import threading
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("kernels.cpp")
_lock = threading.Lock()
_state: dict[str, bool] = {}


def _build_tag() -> str:
    """-march=native code is only valid on this kind of CPU: the cache entry names the CPU's
    feature flags, so a home directory shared between machines keeps one build per kind, and
    the source, so that two checkouts of different versions never rebuild each other's."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    digest = hashlib.sha1((platform.machine() + flags + torch.__version__).encode() + SOURCE.read_bytes())
    return digest.hexdigest()[:12]


def loaded() -> bool:
    """Whether the kernels are loaded, without building them."""
    return _state.get("ok", False)


def available() -> bool:
    """Whether the kernels are loaded, building them on the first call."""
    if "ok" not in _state:
        with _lock:
            if "ok" not in _state:
                _state["ok"] = _build()
    return _state["ok"]


def _build() -> bool:
    if platform.system() == "Windows":
        return False  # GCC/Clang vector extensions; MSVC has no equivalent
    try:
        from torch.utils.cpp_extension import load

        load(name=f"camelid_kernels_{_build_tag()}", sources=[str(SOURCE)],
             extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
             is_python_module=False, verbose=False)
    except Exception as e:  # no compiler, an unsupported platform: the layers' PyTorch path remains
        warnings.warn(f"camelid's quantized CPU kernels could not be built ({type(e).__name__}: "
                      f"{str(e)[:300]}); quantized layers use their slower PyTorch formulation", stacklevel=3)
        return False
    _register_fakes()
    return True


def _register_fakes() -> None:
    """Shapes for tracing (torch.compile, meta tensors): the output is x with out features."""

    def gemv_like(x, codes, *_):
        return x.new_empty((*x.shape[:-1], codes.shape[0]))

    def many_like(x, codes, *_):
        return [gemv_like(x, c) for c in codes]

    @torch.library.register_fake("camelid::dequantize")
    def dequantize_like(codes, scales, mins, group_size, dtype):
        return codes.new_empty((codes.shape[0], codes.shape[1] * (2 if mins is not None else 1)), dtype=dtype)

    @torch.library.register_fake("camelid::gemv_tiles")
    def tiles_like(x, codes, *_):
        return x.new_empty((*x.shape[:-1], codes.shape[0] * 16))

    @torch.library.register_fake("camelid::decode_block")
    def block_like(x, *_):
        return torch.empty_like(x)

    torch.library.register_fake("camelid::decode_blocks")(block_like)

    for op in ("camelid::int8_gemv", "camelid::int4_gemv"):
        torch.library.register_fake(op)(gemv_like)
    for op in ("camelid::int8_gemv_many", "camelid::int4_gemv_many"):
        torch.library.register_fake(op)(many_like)
