"""Grouped LoRA in Triton: `y += (x·Aᵀ)·Bᵀ` per token's own slot, two launches per module.

The kernels read a SlotBank's tensors in place (`a [slots, r_cap, in]`, `bt [slots, r_cap, out]`
with the scale folded into Bᵀ: vLLM's stacked layout) and a step's SlotGroups (groups.py):
  - shrink: one program per (block of a group's tokens, split of `in`, group) computes
    `x[tokens]·A[slot]ᵀ` in float32 → `h [splits, n, r]` (partial sums per split of the reduction,
    so decode's few tokens still spread over the GPU without atomics or a zeroing launch);
  - expand: one program per (block of tokens, block of `out`, group) sums the splits, multiplies
    by `Bᵀ[slot]` in float32 and adds into `y`, rounding once into y's dtype.
One code path serves decode (groups of a few tokens: BGMV's case) and prefill (long groups: SGMV's)
alike: a group's weights are read once per block of its tokens, never per token, and base-only
tokens (slot −1) are in no group, so they cost nothing. Grids come from host ints of the plan.

Under Triton's interpreter (`TRITON_INTERPRET=1` before this module is imported: the tests on CPU)
16-bit `tl.dot` is not exact, so every dot then runs on float32 tiles; on a GPU the shrink of
16-bit x and A runs on tensor cores (exact products, float32 accumulation) and the expand, whose
`h` is float32, in IEEE float32 (no TF32: the torch reference does not round h either).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from server.kernels.groups import SlotGroups

INTERPRETED: bool = bool(triton.knobs.runtime.interpret)  # read by @triton.jit as it decorates, below
BLOCK_K = 64  # shrink: `in` per step of the reduction
BLOCK_N = 64  # expand: `out` columns per program
TARGET_PROGRAMS = 256  # shrink: split the reduction until about this many programs run (decode)
MAX_SPLIT = 16
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, h_ptr, tokens_ptr, starts_ptr, slots_ptr, K, R, split_k,
                   stride_xm, stride_xk, stride_as, stride_ar, stride_ak, stride_hs, stride_hm,
                   BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, F32_DOT: tl.constexpr):
    pid_m, pid_k, group = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start = tl.load(starts_ptr + group)
    end = tl.load(starts_ptr + group + 1)
    first = start + pid_m * BLOCK_M
    if first >= end:
        return
    slot = tl.load(slots_ptr + group).to(tl.int64)
    offs_m = first + tl.arange(0, BLOCK_M)  # positions in the grouped order (h's rows)
    mask_m = offs_m < end
    rows = tl.load(tokens_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)  # x's rows
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk  # [BLOCK_M, BLOCK_K]
    a_ptrs = a_ptr + slot * stride_as + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak  # [BLOCK_K, BLOCK_R]
    step = BLOCK_K * split_k
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, step)):
        left = K - k * step
        xt = tl.load(x_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < left), other=0.0)
        at = tl.load(a_ptrs, mask=mask_r[None, :] & (offs_k[:, None] < left), other=0.0)
        if F32_DOT:
            acc += tl.dot(xt.to(tl.float32), at.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(xt, at)
        x_ptrs += step * stride_xk
        a_ptrs += step * stride_ak
    h_ptrs = h_ptr + pid_k * stride_hs + offs_m[:, None] * stride_hm + offs_r[None, :]
    tl.store(h_ptrs, acc, mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _expand_kernel(h_ptr, bt_ptr, y_ptr, tokens_ptr, starts_ptr, slots_ptr, N, R, split_k,
                   stride_hs, stride_hm, stride_bs, stride_br, stride_bn, stride_ym, stride_yn,
                   BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m, pid_n, group = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start = tl.load(starts_ptr + group)
    end = tl.load(starts_ptr + group + 1)
    first = start + pid_m * BLOCK_M
    if first >= end:
        return
    slot = tl.load(slots_ptr + group).to(tl.int64)
    offs_m = first + tl.arange(0, BLOCK_M)
    mask_m = offs_m < end
    rows = tl.load(tokens_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    h_ptrs = h_ptr + offs_m[:, None] * stride_hm + offs_r[None, :]  # [BLOCK_M, BLOCK_R]
    mask_h = mask_m[:, None] & mask_r[None, :]
    h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for s in range(0, split_k):
        h += tl.load(h_ptrs + s * stride_hs, mask=mask_h, other=0.0)
    b_ptrs = bt_ptr + slot * stride_bs + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn  # [BLOCK_R, BLOCK_N]
    bt = tl.load(b_ptrs, mask=mask_r[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
    delta = tl.dot(h, bt, input_precision="ieee")  # [BLOCK_M, BLOCK_N] float32
    y_ptrs = y_ptr + rows[:, None] * stride_ym + offs_n[None, :] * stride_yn
    mask_y = mask_m[:, None] & mask_n[None, :]
    y = tl.load(y_ptrs, mask=mask_y, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + delta).to(y.dtype), mask=mask_y)


def supports(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, bt: torch.Tensor) -> bool:
    """2-D x / y and 3-D slot tensors of float dtypes on one device the kernels run on (CUDA; CPU
    only under the interpreter). Any strides."""
    runs_here = x.is_cuda or (INTERPRETED and x.is_cpu)
    return (runs_here and x.dim() == 2 and y.dim() == 2 and a.dim() == 3 and bt.dim() == 3
            and x.dtype in DTYPES and y.dtype in DTYPES and a.dtype in DTYPES and bt.dtype in DTYPES
            and x.device == y.device == a.device == bt.device)


def add_lora(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, groups: SlotGroups,
             r: int) -> None:
    """x `[tokens, in]`, y `[tokens, out]` += each grouped token's `(x·A[slot][:r]ᵀ)·Bᵀ[slot][:r]`, in place."""
    expand(shrink(x, a, groups, r), bt, y, groups, r)


def shrink(x: torch.Tensor, a: torch.Tensor, groups: SlotGroups, r: int) -> torch.Tensor:
    """`h [splits, n, r]` float32: row i of the splits' sum is `x[tokens[i]]·A[slot]ᵀ` (grouped order)."""
    if a.shape[2] != x.shape[1] or not 0 < r <= a.shape[1]:
        raise ValueError(f"shrink: x {tuple(x.shape)}, a {tuple(a.shape)}, r {r} do not fit")
    if groups.tokens.device != x.device:  # the kernels would read another device's pointer
        raise ValueError(f"shrink: the step's groups are on {groups.tokens.device}, x on {x.device}")
    k = x.shape[1]
    block_m, m_blocks = _m_blocks(groups.max_tokens)
    split = _split(k, m_blocks * groups.count)
    h = torch.empty(split, groups.num_tokens, r, device=x.device, dtype=torch.float32)  # [splits, n, r]
    f32_dot = INTERPRETED or x.dtype == torch.float32 or x.dtype != a.dtype
    _shrink_kernel[(m_blocks, split, groups.count)](
        x, a, h, groups.tokens, groups.starts, groups.slots, k, r, split,
        x.stride(0), x.stride(1), a.stride(0), a.stride(1), a.stride(2), h.stride(0), h.stride(1),
        BLOCK_M=block_m, BLOCK_R=_block_r(r), BLOCK_K=BLOCK_K, F32_DOT=f32_dot)
    return h


def expand(h: torch.Tensor, bt: torch.Tensor, y: torch.Tensor, groups: SlotGroups, r: int) -> None:
    """y's grouped rows += `h·Bᵀ[slot][:r]`, summed in float32 and rounded once into y's dtype."""
    if bt.shape[2] != y.shape[1] or h.shape[1:] != (groups.num_tokens, r) or r > bt.shape[1]:
        raise ValueError(f"expand: h {tuple(h.shape)}, bt {tuple(bt.shape)}, y {tuple(y.shape)}, r {r} do not fit")
    n = y.shape[1]
    block_m, m_blocks = _m_blocks(groups.max_tokens)
    _expand_kernel[(m_blocks, triton.cdiv(n, BLOCK_N), groups.count)](
        h, bt, y, groups.tokens, groups.starts, groups.slots, n, r, h.shape[0],
        h.stride(0), h.stride(1), bt.stride(0), bt.stride(1), bt.stride(2), y.stride(0), y.stride(1),
        BLOCK_M=block_m, BLOCK_R=_block_r(r), BLOCK_N=BLOCK_N)


def _m_blocks(max_tokens: int) -> tuple[int, int]:
    """Tokens per program (16 for decode's few per slot: tl.dot's smallest tile) and programs per group."""
    block_m = 16 if max_tokens <= 16 else 32 if max_tokens <= 32 else 64
    return block_m, triton.cdiv(max_tokens, block_m)


def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _split(k: int, programs: int) -> int:
    """Splits of the shrink's reduction: a power of two, until about TARGET_PROGRAMS programs run."""
    split = 1
    while split < MAX_SPLIT and programs * split * 2 <= TARGET_PROGRAMS and BLOCK_K * split * 2 <= k:
        split *= 2
    return split
