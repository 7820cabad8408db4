"""The compiled decode step: one new token per row over a static or paged KV cache, under torch.compile
(the gpt-fast recipe), built in the background and kept on disk.

Decoding one token is a chain of matrix-vector products bound by memory bandwidth. On CPU,
MKL's sgemv streams weights well below the machine's bandwidth, while inductor turns a product
written as multiply-and-sum into one vectorised, parallel reduction that reads the weight once.
`GemvLinear` is a module swap that does exactly that, only inside a compiled graph and only for
single rows; everywhere else it is nn.Linear. The attention and RoPE swaps come from
`camelid.model.inductor`.

Shapes are static: a compiled step serves one StepShape (rows, cache slots and strides, dtypes,
device), and callers round cache lengths up to buckets (256, 512, ...) so that a handful of
shapes covers every request. A shape is compiled ahead of time (`aot_compile`: traced and
compiled without running, so no live KV cache is touched), on CPU by a background process while
decoding goes on eagerly; the first step after it is saved switches to it. Each compiled step is
saved under the cache directory, keyed by everything its code depends on (the model's module
structure, dtypes and shapes, the step's shape, the compile mode, the CPU's instruction set,
torch's version and camelid's code that it runs), so the next process loads it in a moment
instead of compiling again. Should compilation fail, decoding stays eager, with one warning.

A quantized model whose every block runs as one kernel call (camelid.quant.block) needs no
graph: its steps, on a static or a paged float32 cache, are `DirectStep`'s plain calls from the
first token, with nothing to compile; any other model or cache takes the compiled graph.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import io
import itertools
import logging
import os
import platform
import subprocess
import sys
import time
import types
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from camelid.model import KVCache, PagedKVCache, RotaryTable, Transformer
from camelid.model.inductor import use_inductor_layers
from camelid.quant import tiles
from camelid.quant.block import DirectStep, use_decode_blocks
from camelid.quant.fuse import FuseSharedInputProducts

BUCKET = 256
log = logging.getLogger("camelid.generate")


def bucket(length: int, limit: int) -> int:
    """`length` rounded up to a power of two of at least BUCKET slots, at most `limit` (but never
    below `length`)."""
    return max(length, min(limit, max(BUCKET, 1 << (length - 1).bit_length())))


class GemvLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() and x.shape[-2] == 1:
            return (x.unsqueeze(-2) * self.weight).sum(-1)
        return F.linear(x, self.weight)


def use_gemv_linears(model: Transformer) -> Transformer:
    """Swap every nn.Linear for a GemvLinear sharing its weight. A tied model's head becomes a
    GemvLinear over the embedding matrix too; it is set as a plain attribute, not registered as
    a submodule, so that the model's state dict keeps no separate `output.weight`."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, _gemv_from(child.weight))
    if model.output is None:
        object.__setattr__(model, "output", _gemv_from(model.tok_embeddings.weight))
    return model


def _gemv_from(weight: torch.Tensor) -> GemvLinear:
    with torch.device("meta"):
        layer = GemvLinear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
    return layer


def decode_step(model: Transformer, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Logits [B, V] for tokens [B, 1] at positions [B, 1] (the function that is compiled)."""
    return model.head(model.hidden(tokens, positions, cache)[:, -1])


@dataclass(frozen=True)
class StepShape:
    rows: int
    slots: int
    layout: tuple              # the cache's memory: `cache_layout`
    cache_dtype: torch.dtype
    token_dtype: torch.dtype
    device: str

    @classmethod
    def of(cls, tokens: torch.Tensor, cache: KVCache | PagedKVCache) -> "StepShape":
        k = cache.layers[0].k
        return cls(tokens.size(0), cache.max_len, cache_layout(cache), k.dtype, tokens.dtype, str(k.device))


def cache_layout(cache: KVCache | PagedKVCache) -> tuple:
    """How a cache lies in memory, all a compiling process needs to rebuild one like it
    (`rebuild_cache`): a static cache's key tensors are views of a parent [rows, K, slots, D]
    buffer, whose strides they keep; a paged cache has its pools' shape and its block table, a
    view of the batcher's whole table."""
    if isinstance(cache, PagedKVCache):
        return ("paged", tuple(cache.layers[0].k.shape), _view_layout(cache.table))
    return ("static", _view_layout(cache.layers[0].k))


def _view_layout(t: torch.Tensor) -> tuple:
    return t.untyped_storage().nbytes() // t.element_size(), tuple(t.shape), tuple(t.stride()), t.storage_offset()


def rebuild_cache(layout: tuple, layers: int, dtype: torch.dtype) -> KVCache | PagedKVCache:
    """A cache laid out as `layout` says, over uninitialised memory (for tracing: never read).
    Each tensor gets a buffer of its own: the compiler must see no aliasing."""
    def view(spec: tuple, kind: torch.dtype) -> torch.Tensor:
        numel, shape, stride, offset = spec
        return torch.empty(numel, dtype=kind).as_strided(shape, stride, offset)

    if layout[0] == "paged":
        _, pool, table = layout
        return PagedKVCache.over([(torch.empty(pool, dtype=dtype), torch.empty(pool, dtype=dtype))
                                  for _ in range(layers)], view(table, torch.long))
    return KVCache.over([(view(layout[1], dtype), view(layout[1], dtype)) for _ in range(layers)])


class CompiledDecoder:
    """The compiled steps of one model, one per StepShape, built on demand.

    `step` answers from a compiled step when its shape is ready and None otherwise (the caller
    decodes eagerly). A shape asked for the first time is loaded from the cache directory if
    it is there (a moment), and otherwise compiled:

    - in the background (CPU, `background`): by a separate, lowest-priority process that
      rebuilds the model's structure without its weights, compiles, and saves the step. It
      starts when decoding pauses (`start_builds`: the generation that asked for the step has
      ended) and decoding takes the step as soon as it is saved. A thread would not do: tracing
      is Python and would hold the interpreter's lock against the decoding thread. The process
      finishes its work even if this one ends first, so the next run finds the step;
    - or here and now (without `background`, on GPUs, or without a cache directory).
    """

    def __init__(self, model: Transformer, cache_dir: Path | None = None, background: bool = True,
                 mode: str | None = None, trace_only: bool = False):
        device = next(model.parameters()).device
        self.fingerprint = _fingerprint(model)
        self.skeleton = _skeleton(model)  # the structure without weights, for a compiling process
        # the layers for inductor go into a copy that shares the weights: the caller's model
        # stays as it was (its state dict, quantize_model, the eager path)
        # (`trace_only`: a compiling process's model, whose weights are never read: no copies of them)
        self.model = use_decode_blocks(use_inductor_layers(use_gemv_linears(_copy_of(model, lambda t: t))),
                                       copy_weights=not trace_only)
        # every block one kernel call: decode steps need no graph (block.DirectStep)
        self.direct = DirectStep(self.model) if DirectStep.takes(self.model) else None
        self.cache_dir = cache_dir
        self.wait_for_steps = not background  # the caller wants compiled steps from the first token on
        self.background = background and cache_dir is not None and device.type == "cpu" and ahead_of_time()
        self.mode = mode
        self.options = compile_options(device, mode)
        self.steps: dict[StepShape, Callable] = {}
        self.wanted: dict[StepShape, dict] = {}      # asked for, to build once decoding pauses
        self.building: dict[StepShape, _Build] = {}
        self.failed = False
        self.counts = {"compiled": 0, "loaded": 0}  # steps compiled here, and loaded from the cache directory
        self.model_key = _structure_key(self.model, mode)

    def matches(self, model: Transformer) -> bool:
        """Whether `model` is still the model this decoder copied: no layer swapped (quantized),
        no weight cast or moved since, no quantized weight changed in place since its tiles were
        made (camelid/quant/tiles.py)."""
        return _fingerprint(model) == self.fingerprint and not tiles.stale(self.model)

    # ---- using the steps ---------------------------------------------------------------------------
    def step(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
             build: bool = True) -> torch.Tensor | None:
        """Logits [B, V] for tokens [B, 1] at positions [B, 1], or None while this shape is not
        compiled yet. A shape not asked for before is loaded, or built (in the background where
        it can be, else now), unless `build` is False (a short generation, for which neither
        would pay) and the caller did not ask to wait for compiled steps."""
        if self.failed:
            return None
        if self._direct(tokens, cache):
            return self._run(self.direct, tokens, positions, cache)
        shape = StepShape.of(tokens, cache)
        fn = self.steps.get(shape)
        if fn is None:
            if shape in self.building:
                fn = self._collect(shape)
            elif shape not in self.wanted and (build or self.wait_for_steps):
                fn = self._obtain(shape, tokens, positions, cache)
        return self._run(fn, tokens, positions, cache)

    def prepare(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> Callable | None:
        """The compiled step for these inputs' shape, loaded or compiled now if need be (waiting
        for a background build already under way)."""
        if self._direct(tokens, cache):
            return self.direct
        shape = StepShape.of(tokens, cache)
        if shape in self.wanted or shape in self.building:
            self.wait()
            return self.steps.get(shape)
        if shape not in self.steps and not self.failed:
            return self._obtain(shape, tokens, positions, cache, background=False)
        return self.steps.get(shape)

    def ready(self, tokens: torch.Tensor, cache: KVCache) -> bool:
        return self._direct(tokens, cache) or StepShape.of(tokens, cache) in self.steps

    def _direct(self, tokens: torch.Tensor, cache: KVCache) -> bool:
        return self.direct is not None and self.direct.suits(tokens, cache)

    def wait(self) -> None:
        """Build every step asked for in the background, wait for them, and take them."""
        while self.wanted or self.building:
            self.start_builds()
            for shape, build in list(self.building.items()):
                build.join()
                self._collect(shape)

    def start_builds(self) -> None:
        """Start compiling the next step asked for, if none is being compiled: called when
        decoding pauses (a generation ends, a request is answered). Compiling beside a decoding
        process on the same cores slows its decoding several times over, even at the lowest
        priority, so a step asked for is built after the generation that asked, for the next."""
        if self.failed or any(b.running() for b in self.building.values()):
            return
        for shape in list(self.building):
            self._collect(shape)
        if self.wanted:
            shape, job = next(iter(self.wanted.items()))
            del self.wanted[shape]
            try:
                self.building[shape] = _Build(self._path(shape), job)
            except Exception as e:  # an unwritable cache directory, no process to spare
                self._fail(e)

    def _run(self, fn, tokens, positions, cache) -> torch.Tensor | None:
        if fn is None:
            return None
        try:
            return fn(self.model, tokens, positions, cache)
        except Exception as e:  # torch._dynamo / inductor errors: keep generating, eagerly
            self._fail(e)
            return None

    # ---- obtaining them -----------------------------------------------------------------------------
    def _obtain(self, shape: StepShape, tokens, positions, cache, background: bool | None = None) -> Callable | None:
        """Load the shape's step from the cache directory, else ask for it to be built in the
        background (`start_builds`), else compile it here; None when it is not ready (or failed)."""
        path = self._path(shape)
        try:
            with torch.inference_mode():
                self.model.rope.table(tokens.device, shape.slots)  # built here, never while tracing
                fn = self._load(path) if path is not None and path.exists() else None
                if fn is None and (self.background if background is None else background):
                    self.wanted[shape] = _job(self.skeleton, path, tokens, cache, self.mode)
                elif fn is None:
                    fn = compile_step((self.model, tokens, positions, cache), self.options, path)
                    self.counts["compiled"] += 1
        except Exception as e:  # a compiler error, no compiler, an unwritable cache directory
            self._fail(e)
            return None
        if fn is not None:
            self.steps[shape] = fn
        return fn

    def _collect(self, shape: StepShape) -> Callable | None:
        """A background build's step once it has ended (None while it runs)."""
        build = self.building[shape]
        if build.running():
            return None
        del self.building[shape]
        fn = self._load(build.path) if build.path.exists() else None
        if fn is None and build.own:
            self._fail(RuntimeError(f"the compiling process ended with code {build.proc.returncode} and no usable "
                                    f"step; its log is {build.log}"))
        if fn is not None:
            self.steps[shape] = fn
        return fn  # another process's build that failed: this one builds it when next asked

    def _load(self, path: Path) -> Callable | None:
        """A saved step, or None when it cannot be used (written by another torch, damaged): the
        file goes, so that the step is compiled afresh."""
        try:
            with open(path, "rb") as f:
                fn = torch.compiler.load_compiled_function(f)
        except Exception as e:
            log.info("could not load %s (%s: %s); compiling it again", path, type(e).__name__, e)
            path.unlink(missing_ok=True)
            return None
        self.counts["loaded"] += 1
        return fn

    def _path(self, shape: StepShape) -> Path | None:
        if self.cache_dir is None:
            return None
        key = hashlib.sha256(f"{self.model_key}|{shape}".encode()).hexdigest()[:24]
        return self.cache_dir / f"decode-{key}.bin"

    def _fail(self, e: Exception) -> None:
        if not self.failed:
            self.failed = True
            warnings.warn(f"compiled decoding failed ({type(e).__name__}: {str(e)[:300]}); continuing without "
                          "compilation", stacklevel=3)


def compile_options(device: torch.device, mode: str | None) -> dict:
    return {
        # the step's inputs have fixed shapes by construction (the StepShape is the key): no
        # guards, and no size and stride checks of every buffer on each call
        "guard_filter_fn": _no_guards,
        "size_asserts": False,
        # a layer's quantized products that share an input run as one kernel call
        "post_grad_custom_post_pass": FuseSharedInputProducts(),
        # CUDA graphs replay the whole step with one launch on a GPU
        "triton.cudagraphs": mode == "reduce-overhead" or (mode is None and device.type == "cuda"),
    }


def _no_guards(entries: list) -> list[bool]:
    return [False] * len(entries)


def _private_copy(function: Callable) -> Callable:
    """`function` over a private copy of its code object. Dynamo keeps compiled graphs per code
    object, and with the module guards skipped it would hand one decoder's graph to another
    decoder's model of a different structure; each gets its own cache entry this way."""
    code = function.__code__
    return types.FunctionType(code.replace(co_name=f"{code.co_name}_{next(_copies)}"), function.__globals__,
                              None, function.__defaults__, function.__closure__)


_copies = itertools.count()


@functools.lru_cache(maxsize=1)
def ahead_of_time() -> bool:
    """Whether this torch compiles ahead of time (`aot_compile`, and saving and loading the
    result); older ones compile on the first call instead."""
    return hasattr(torch.compile(_no_guards), "aot_compile") and hasattr(torch.compiler, "load_compiled_function")


def compile_step(example: tuple, options: dict, path: Path | None) -> Callable:
    """Compile `decode_step` for the example inputs' shapes without running it (the live KV
    cache is never written), and save it to `path` if given. Without ahead-of-time compilation
    (older torch) the returned function compiles on its first call, and keeps dynamo's guards
    on the inputs' shapes."""
    if not ahead_of_time():
        options = {**options, "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
        return torch.compile(_private_copy(decode_step), fullgraph=True, dynamic=False, options=options)
    fn = torch.compile(decode_step, fullgraph=True, dynamic=False, options=options).aot_compile((example, {}))
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fn.save_compiled_function(str(path))  # written to a temporary file and renamed
        except Exception as e:  # a read-only cache directory, an unpicklable piece: still usable now
            log.info("could not save the compiled step to %s (%s: %s)", path, type(e).__name__, e)
    return fn


# ---- compiling in another process --------------------------------------------------------------------

def _copy_of(model: Transformer, tensor: Callable[[torch.Tensor], torch.Tensor]) -> Transformer:
    """The model's module tree copied, each weight and buffer `t` replaced by `tensor(t)` (the
    same tensor: shared; a meta tensor: a skeleton) and the rotary tables shared."""
    memo: dict[int, object] = {id(model.rope): model.rope}
    for t in list(model.parameters()) + list(model.buffers()):
        memo[id(t)] = tensor(t)
    return copy.deepcopy(model, memo)


def _skeleton(model: Transformer) -> bytes:
    """The model with every weight replaced by a meta tensor of its shape and dtype, pickled:
    all a compiler needs (module classes, shapes, dtypes), a few kilobytes."""
    def meta(t: torch.Tensor) -> torch.Tensor:
        m = torch.empty_like(t, device="meta")
        return nn.Parameter(m, requires_grad=False) if isinstance(t, nn.Parameter) else m

    skeleton = _copy_of(model, meta)
    skeleton.rope = RotaryTable(model.config)  # tables are made where they are used
    tiles.record_scales_dtypes(model, skeleton)  # a choice the weights' values make
    buffer = io.BytesIO()
    torch.save(skeleton, buffer)
    return buffer.getvalue()


def _job(skeleton: bytes, path: Path, tokens: torch.Tensor, cache: KVCache | PagedKVCache, mode: str | None) -> dict:
    """What a compiling process needs to know: the model's skeleton and the step's inputs as
    shapes, dtypes and the cache's layout (`cache_layout`: the process rebuilds it with the
    same strides)."""
    return {"skeleton": skeleton, "path": str(path), "rows": tokens.size(0), "mode": mode,
            "dtype": cache.layers[0].k.dtype, "layout": cache_layout(cache), "slots": cache.max_len}


class _Build:
    """A step being compiled by a background process: this process's own, or (when the step's
    lock file names a live process) another's, which this one only waits for. The lock keeps two
    `camelid generate` runs from compiling the same step at once."""

    def __init__(self, path: Path, job: dict):
        self.path, self.proc = path, None
        path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = path.with_suffix(".lock")
        try:
            fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if _alive(self.lock):
                self.own = False
                return
            self.lock.unlink(missing_ok=True)  # left by a process that died: take over
            fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        self.own = True
        stem = f"{path.stem}-{os.getpid()}"
        job_path, self.log = path.with_name(stem + ".job"), path.with_name(stem + ".log")
        with os.fdopen(fd, "w") as lock_file:
            try:
                torch.save(job, job_path)
                with open(self.log, "w") as out:
                    self.proc = subprocess.Popen(
                        [sys.executable, "-m", "camelid.generate.compiled", str(job_path)], stdout=out,
                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                        start_new_session=True)  # not stopped by the terminal's Ctrl-C
            except BaseException:
                self.lock.unlink(missing_ok=True)
                raise
            lock_file.write(str(self.proc.pid))

    def running(self) -> bool:
        if self.own:
            return self.proc.poll() is None
        return not self.path.exists() and _alive(self.lock)

    def join(self) -> None:
        while self.running():
            if self.own:
                self.proc.wait()
            else:
                time.sleep(0.5)


def _alive(lock: Path) -> bool:
    """Whether the build a lock file stands for still runs: the process it names is alive (or
    the file is brand new, its writer about to name the process)."""
    try:
        text, age = lock.read_text(), time.time() - lock.stat().st_mtime
    except OSError:
        return False  # gone: that build has ended
    if not text.strip():
        return age < 10
    try:
        os.kill(int(text), 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:  # alive, under another user
        pass
    return True


def _compile_job(job_path: str) -> None:
    """The compiling process: rebuild the model's structure (uninitialised memory: never read),
    compile the step for the job's shape and save it."""
    _yield_the_cpu()
    job = torch.load(job_path, weights_only=False)
    path = Path(job["path"])
    try:
        _compile_from(job)
    finally:
        Path(job_path).unlink(missing_ok=True)
        path.with_suffix(".lock").unlink(missing_ok=True)
    Path(job_path).with_suffix(".log").unlink(missing_ok=True)  # kept only when something went wrong


def _yield_the_cpu() -> None:
    """Run only when the CPU would otherwise idle (Linux's SCHED_IDLE, inherited by inductor's
    compile workers), else at the lowest priority: a decoding process's threads wait for each
    other at every operation, so any share of a core taken from one of them slows them all."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        if hasattr(os, "nice"):
            os.nice(19)


def _compile_from(job: dict) -> None:
    model = torch.load(io.BytesIO(job["skeleton"]), weights_only=False)
    model.to_empty(device="cpu")
    from camelid.quant import QuantizedLinear, kernels

    if any(isinstance(m, QuantizedLinear) and m.fused for m in model.modules()):
        kernels.available()  # camelid's operators, registered before tracing meets them
    decoder = CompiledDecoder(model, mode=job["mode"], trace_only=True)
    cache = rebuild_cache(job["layout"], len(model.layers), job["dtype"])
    tokens = torch.zeros(job["rows"], 1, dtype=torch.long)
    with torch.inference_mode():
        model.rope.table(torch.device("cpu"), job["slots"])
        compile_step((decoder.model, tokens, tokens.clone(), cache), decoder.options, Path(job["path"]))


def _fingerprint(model: nn.Module) -> tuple:
    """Which tensors the model holds, with their dtypes and devices: changes when a layer is
    swapped (quantize_model) or the weights are cast or moved."""
    return tuple((id(t), t.dtype, t.device) for t in list(model.parameters()) + list(model.buffers()))


def _structure_key(model: nn.Module, mode: str | None) -> str:
    """Everything the compiled code depends on but its input shapes: the module classes, every
    parameter's and buffer's name, shape, dtype and device, the model config, the compile mode,
    the CPU's instruction set (inductor's C++ is built for it), torch's version and the sources
    of camelid's code that the step runs."""
    from camelid.model import inductor, kv_cache, transformer
    from camelid.quant import block, fuse, kernels, layers

    parts = [torch.__version__, repr(model.config), str(mode), torch.backends.cpu.get_cpu_capability(),
             platform.machine()]
    parts += [f"{name}:{type(m).__module__}.{type(m).__qualname__}" for name, m in model.named_modules()]
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    parts += [f"{n}:{tuple(t.shape)}:{t.dtype}:{t.device}" for n, t in tensors]
    files = {Path(module.__file__) for module in (transformer, kv_cache, inductor, block, fuse, layers, kernels, tiles)}
    # and the code of any other camelid module swapped into the model (camelid.lora's LoRALinear)
    files |= {Path(sys.modules[type(m).__module__].__file__) for m in model.modules()
              if type(m).__module__.startswith("camelid.")}
    for path in sorted(files):  # camelid's code in the step
        parts.append(hashlib.sha256(path.read_bytes()).hexdigest())
    parts.append(hashlib.sha256(Path(__file__).read_bytes()).hexdigest())
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


if __name__ == "__main__":
    _compile_job(sys.argv[1])
