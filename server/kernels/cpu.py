"""The CPU grouped-LoRA kernel (lora_cpu.c): built once per machine, loaded with ctypes.

Why build at first use instead of shipping a wheel: the kernel is compiled with
`-march=native` for the CPU it runs on (AVX-512 where there is one), and it has
no torch headers, so one `cc` call takes about a second. The shared object is
cached under `<cache_dir>/kernels/`, named by a hash of the source, the flags,
the compiler's version and the CPU's feature flags, so an upgrade or another
machine sharing the cache builds its own.

Everything degrades to the pure-torch path: no compiler, a failed build, a
non-CPU device or a model dtype other than float32 leaves `load_kernel()`
returning None, with one warning in the log. Adapter weights may be float32 or
float16 (settings.slot_dtype); the float16 variant exists where the CPU widens
halves in hardware (F16C), and elsewhere float16 slots take the torch path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("lora_cpu.c")
SOURCES = (SOURCE, SOURCE.with_name("lora_cpu_impl.h"))  # the build key hashes both
FLAGS = ("-O3", "-march=native", "-std=gnu11", "-fopenmp", "-shared", "-fPIC")
BUILD_TIMEOUT_S = 120.0

_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
_ARGTYPES = [_PTR, _I64, _PTR, _I64,  # x, x row stride, y, y row stride
             _PTR, _I64, _I64,  # a, slot stride, row stride
             _PTR, _I64, _I64,  # bt, slot stride, row stride
             _I64, _I64, _I64,  # in, out, r
             _PTR, _PTR, _I64, _PTR,  # block_slot, block_start, nblocks, tokens
             ctypes.c_int]  # threads


@dataclass(frozen=True)
class Blocks:
    """One step's grouping for the kernel: block b is slot `slots[b]` and tokens
    `tokens[starts[b]:starts[b + 1]]` (int64, CPU, contiguous: the kernel reads raw pointers)."""

    slots: torch.Tensor  # [blocks]
    starts: torch.Tensor  # [blocks + 1]
    tokens: torch.Tensor  # [n]
    max_slot: int  # bounds, kept as Python ints so `add` checks them for free:
    max_token: int  # the kernel indexes raw memory with these

    @functools.cached_property
    def slots_ptr(self) -> int:
        return self.slots.data_ptr()

    @functools.cached_property
    def starts_ptr(self) -> int:
        return self.starts.data_ptr()

    @functools.cached_property
    def tokens_ptr(self) -> int:
        return self.tokens.data_ptr()

    @functools.cached_property
    def count(self) -> int:
        return int(self.slots.shape[0])

    @classmethod
    def build(cls, slots: list[int], starts: list[int], tokens: list[int]) -> Blocks:
        as_long = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
        return cls(as_long(slots), as_long(starts), as_long(tokens), max(slots, default=-1), max(tokens, default=-1))


class GroupedLoraKernel:
    """`y[t] += (A[slot] · x[t]) · Bᵀ[slot]` per block, in place: float32 x and y on CPU, A and Bᵀ
    float32 or (where built) float16."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._fns: dict[torch.dtype, ctypes._CFuncPtr] = {}
        for dtype, name in ((torch.float32, "lora_grouped_f32"), (torch.float16, "lora_grouped_f16")):
            fn = getattr(lib, name, None)  # the float16 variant is compiled only where the CPU has F16C
            if fn is not None:
                fn.restype, fn.argtypes = None, _ARGTYPES
                self._fns[dtype] = fn

    @property
    def weight_dtypes(self) -> frozenset[torch.dtype]:
        return frozenset(self._fns)

    def supports(self, x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, bt: torch.Tensor) -> bool:
        """Row-major rows (stride 1 inside a row) on CPU, float32 x / y, A and Bᵀ of one built weight
        dtype; any slot and row strides. Written out (no loop): it runs per module per step."""
        f32 = torch.float32
        return (x.dtype is f32 and y.dtype is f32 and a.dtype is bt.dtype and a.dtype in self._fns
                and x.dim() == 2 and y.dim() == 2 and a.dim() == 3 and bt.dim() == 3
                and x.stride(-1) == 1 and y.stride(-1) == 1 and a.stride(-1) == 1 and bt.stride(-1) == 1
                and x.is_cpu and y.is_cpu and a.is_cpu and bt.is_cpu)

    def add(self, x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, blocks: Blocks,
            r: int | None = None, *, supported: bool = False) -> None:
        """x `[tokens, in]`, y `[tokens, out]` (written in place), a `[slots, r_cap, in]`, bt `[slots, r_cap, out]`;
        only the first `r` rows of each slot are read (default: all), so a bank's tensors need no slicing.
        Whether to call it is the caller's decision (`supports`); `supported=True` says the caller has just
        asked, so the per-module hot path does not ask twice. Shapes and bounds are always checked."""
        if not supported and not self.supports(x, y, a, bt):
            raise ValueError("GroupedLoraKernel: unsupported tensors")
        in_features, out_features = x.shape[1], y.shape[1]
        rows = a.shape[1] if r is None else r
        if a.shape[2] != in_features or bt.shape[2] != out_features or not 0 <= rows <= min(a.shape[1], bt.shape[1]):
            raise ValueError(f"GroupedLoraKernel: shapes x {tuple(x.shape)}, y {tuple(y.shape)}, a {tuple(a.shape)}, "
                             f"bt {tuple(bt.shape)}, r {rows} do not fit")
        if blocks.max_slot >= min(a.shape[0], bt.shape[0]) or blocks.max_token >= min(x.shape[0], y.shape[0]):
            raise IndexError(f"GroupedLoraKernel: slot {blocks.max_slot} / token {blocks.max_token} out of range "
                             f"for {a.shape[0]} slots / {min(x.shape[0], y.shape[0])} tokens")
        a_strides, bt_strides = a.stride(), bt.stride()
        self._fns[a.dtype](x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0),
                           a.data_ptr(), a_strides[0], a_strides[1], bt.data_ptr(), bt_strides[0], bt_strides[1],
                           in_features, out_features, rows, blocks.slots_ptr, blocks.starts_ptr, blocks.count,
                           blocks.tokens_ptr, torch.get_num_threads())


_lock = threading.Lock()
_loaded: dict[Path, GroupedLoraKernel | None] = {}


def load_kernel(cache_dir: Path) -> GroupedLoraKernel | None:
    """The kernel, building it on first use; None (logged once) where it cannot be built."""
    with _lock:
        if cache_dir not in _loaded:
            _loaded[cache_dir] = _build_and_load(cache_dir)
        return _loaded[cache_dir]


def _build_and_load(cache_dir: Path) -> GroupedLoraKernel | None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.warning("no C compiler (cc/gcc, or $CC): the CPU LoRA kernel is off, using the torch path")
        return None
    try:
        target = cache_dir / "kernels" / f"lora_cpu-{_build_key(compiler)}.so"
        if not target.exists():
            _compile(compiler, target)
        return GroupedLoraKernel(ctypes.CDLL(str(target)))
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("the CPU LoRA kernel could not be built (%s): using the torch path", e)
        return None


def _build_key(compiler: str) -> str:
    version = subprocess.run([compiler, "--version"], capture_output=True, timeout=30, check=True).stdout
    h = hashlib.sha256(b"".join(src.read_bytes() for src in SOURCES))
    for part in (" ".join(FLAGS).encode(), version, _cpu_flags()):
        h.update(b"\0" + part)
    return h.hexdigest()[:16]


def _cpu_flags() -> bytes:
    """-march=native depends on the CPU: its feature flags are part of the cache key."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return os.uname().machine.encode()
    return next((line.encode() for line in text.splitlines() if line.startswith(("flags", "Features"))), b"")


def _compile(compiler: str, target: Path) -> None:
    """Compile next to the target and rename: a concurrent builder never loads half a file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run([compiler, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True,
                              timeout=BUILD_TIMEOUT_S)
        if proc.returncode != 0:
            raise OSError(f"{compiler} exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
        os.replace(tmp, target)
        log.info("built the CPU LoRA kernel: %s", target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
