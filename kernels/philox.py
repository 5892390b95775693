"""The dropout RNG convention shared by every fused kernel, the CUDA twins in csrc/ and the eager
path: one seed means one mask on every backend.

Convention (bit for bit everywhere):

* Generator: Philox-4x32-10 (Triton's ``tl.randint4x``). The int64 seed is split into the key
  (``seed & 0xffffffff``, ``seed >> 32``); the counter is ``(g, 0, 0, 0)``; one call gives four
  32-bit words ``w0..w3``.
* Element (row, col) of the logical [rows, C] tensor that dropout applies to ('pre': x viewed as
  [M, K]; 'post': the output viewed as [M, N]) takes word ``col % 4`` of the call with
  ``g = (row * ceil(C / 4) + col // 4) mod 2^32``: one call per 4 elements, all four words used
  (as torch's own dropout does). Rows start a new group, so the groups of a row never straddle
  two rows; the tail group of a row whose C is not a multiple of 4 leaves words unused. Tensors
  of more than 2^34 elements wrap around (counters repeat modulo 2^32).
* Uniform: word w read as int32 becomes ``(w < 0 ? ~w : w) * 4.6566127342e-10`` in fp32, in
  [0, 1) (Triton's ``uint_to_uniform_float``).
* Keep rule: keep the element when ``uniform >= p``; kept values are scaled by 1 / (1 - p).

Where it is drawn: ``keep_mask`` (Triton, inside the fused kernels: one ``tl.randint4x`` over the
[rows, BLOCK / 4] groups of a tile), csrc/philox.cuh (``keep_bits4``) for the CUDA row pass, and
``philox_keep_mask`` (plain torch int64 arithmetic, any device) for the eager path.
``dropout_keep_mask`` returns the mask for a shape: the Triton kernel on a CUDA device, the torch
implementation elsewhere (CPU, meta, or CUDA without Triton).

One mask per seed, on every backend: the eager backends of the ops (``eager_keep_mask`` in
kernels/lora_linear.py) and the adapters' dropout module (bridge/peft/dropout.py,
``LoRADropout``) draw this mask too, and when no seed is given each takes one from torch's
default generator exactly as the fused ops do (``draw_seed``). So one seed, or one generator
state, drops the same elements whether 'auto' picks eager on one machine and Triton or CUDA on
another: results differ by rounding only.

The seed is a runtime int64 tensor of one element, loaded in the kernel: a new seed never
recompiles, and a seed drawn on the device (``draw_seed``) needs no host sync.
"""

from __future__ import annotations

import math
import numbers

import torch
from bridge.kernels._triton_common import HAS_TRITON, tl, triton
from bridge.kernels.backend import interpreter_enabled

SEED_HIGH = 2**31 - 1
_INT64 = (-(2**63), 2**63 - 1)

# Philox-4x32-10 constants (Salmon et al., 2011), as Triton and csrc/philox.cuh use them
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_M32 = 0xFFFFFFFF
_UNIFORM_SCALE = 4.6566127342e-10  # largest int32 times this rounds below 1.0 in fp32
# Groups drawn per chunk by the torch implementation: bounds its int64 temporaries (~12 live
# tensors of 8 bytes per group, about 100 MB) whatever the tensor's size.
_TORCH_CHUNK_GROUPS = 1 << 20


def draw_seed(device: torch.device) -> torch.Tensor:
    """A fresh dropout seed from torch's default generator of ``device``: int64 tensor [1].

    Drawn from the default generator, so each step gets a new mask and ranks whose generators
    Megatron keeps in sync (tensor-parallel peers) draw equal seeds.
    """
    return torch.randint(0, SEED_HIGH, (1,), dtype=torch.int64, device=device)


def seed_tensor(seed: int | torch.Tensor, device: torch.device) -> torch.Tensor:
    """An int64 tensor [1] on ``device`` holding ``seed`` (an int or an integer tensor of one
    element, within int64)."""
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1:
            raise ValueError(f"seed tensor must have one element; got shape {tuple(seed.shape)}")
        if seed.dtype.is_floating_point or seed.dtype.is_complex or seed.dtype == torch.bool:
            raise TypeError(f"seed tensor must have an integer dtype; got {seed.dtype}")
        return seed.reshape(1).to(device=device, dtype=torch.int64)
    return torch.tensor([_check_int_seed(seed)], dtype=torch.int64, device=device)


def _check_int_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or an int64 tensor of one element; got "
                        f"{type(seed).__name__} {seed!r}")
    if not _INT64[0] <= seed <= _INT64[1]:
        raise ValueError(f"seed must fit in int64 ([-2**63, 2**63 - 1]); got {seed}")
    return seed


if HAS_TRITON:

    @triton.jit
    def keep_mask(seed, rows, cols, n_cols, p):
        """Keep mask [len(rows), len(cols)] of the tile (rows[:, None], cols[None, :]) of a
        logical [*, n_cols] tensor (see the module docstring), one Philox call per 4 elements.

        ``cols`` must be aligned runs of four (``k0 + tl.arange(0, BLOCK)`` with k0 and BLOCK
        multiples of 4, as every tile of the fused kernels is): each run takes the four words of
        its group's call. ``seed`` is the int64 scalar, ``p`` the fp32 probability.
        """
        BLOCK: tl.constexpr = cols.shape[0]
        # first column of each run of four, [BLOCK // 4]: split the runs in halves twice
        first, _ = tl.split(tl.reshape(cols, (BLOCK // 4, 2, 2)))
        first, _ = tl.split(first)
        groups = rows.to(tl.int64)[:, None] * ((n_cols + 3) // 4) + (first // 4)[None, :]
        w0, w1, w2, w3 = tl.randint4x(seed, groups.to(tl.int32))  # counter (g mod 2^32, 0, 0, 0)
        k0 = tl.uint_to_uniform_float(w0) >= p
        k1 = tl.uint_to_uniform_float(w1) >= p
        k2 = tl.uint_to_uniform_float(w2) >= p
        k3 = tl.uint_to_uniform_float(w3) >= p
        # [R, BLOCK//4, 2, 2] with [..., a, b] = word 2a + b, then row-major back to [R, BLOCK]
        keep = tl.join(tl.join(k0, k2), tl.join(k1, k3))
        return tl.reshape(keep, (rows.shape[0], BLOCK))

    @triton.jit
    def _dropout_keep_mask_kernel(
        seed_ptr,  # int64 [1]: the seed
        mask_ptr,  # bool/int8 [rows, n_cols] contiguous: output keep mask
        rows,  # number of rows (product of the leading dims)
        n_cols,  # last dim
        p,  # fp32 dropout probability
        BLOCK_R: tl.constexpr,  # rows per program
        BLOCK_C: tl.constexpr,  # columns per program (a multiple of 4)
    ):
        """mask[i, j] = keep_mask(seed, i, j, n_cols, p)."""
        seed = tl.load(seed_ptr)
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        keep = keep_mask(seed, r, c, n_cols, p)
        ptrs = mask_ptr + r.to(tl.int64)[:, None] * n_cols + c[None, :]
        tl.store(ptrs, keep.to(tl.int8), mask=(r[:, None] < rows) & (c[None, :] < n_cols))

else:  # pragma: no cover
    keep_mask = None


def _mulhilo(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of a * b for uint32 values a (in int64) and a 32-bit constant b,
    from 16-bit halves of b so that no int64 product overflows."""
    b_hi, b_lo = b >> 16, b & 0xFFFF
    p_lo, p_hi = a * b_lo, a * b_hi  # each < 2^48
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (p_lo + ((p_hi & 0xFFFF) << 16)) & _M32
    return hi, lo


def _philox4x32_10(counter: torch.Tensor, k0, k1) -> list[torch.Tensor]:
    """The four words of Philox-4x32-10 for counters (counter, 0, 0, 0), uint32 values in int64
    tensors; k0, k1 the key words (ints, or int64 0-d tensors for a seed kept on the device)."""
    c0 = counter
    c1 = c2 = c3 = torch.zeros_like(counter)
    for _ in range(10):
        hi_b, lo_b = _mulhilo(c2, _ROUND_B)
        hi_a, lo_a = _mulhilo(c0, _ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _M32
        k1 = (k1 + _KEY_B) & _M32
    return [c0, c1, c2, c3]


def _uniform(word: torch.Tensor) -> torch.Tensor:
    """Triton's uint_to_uniform_float: the word read as int32, negatives folded with ~, scaled
    in fp32 (int -> fp32 rounds to nearest, as the kernels' conversion does)."""
    folded = torch.where(word >= 2**31, _M32 - word, word)
    scale = torch.tensor(_UNIFORM_SCALE, dtype=torch.float32, device=word.device)
    return folded.to(torch.float32) * scale


def _check_p(p: float) -> float:
    number = isinstance(p, numbers.Real) or (isinstance(p, torch.Tensor) and p.numel() == 1)
    value = float(p) if number and not isinstance(p, bool) else math.nan
    if not 0.0 <= value <= 1.0:  # NaN fails the range check too
        raise ValueError(f"dropout probability p must be a float in [0, 1]; got {p!r}")
    return value


def _rows_cols(shape: tuple[int, ...] | torch.Size) -> tuple[tuple[int, ...], int, int]:
    shape = tuple(int(d) for d in shape)
    if len(shape) == 0:
        raise ValueError("the dropout keep mask needs a shape with at least one dimension")
    if any(d < 0 for d in shape):
        raise ValueError(f"shape must have non-negative sizes; got {shape}")
    return shape, math.prod(shape[:-1]), shape[-1]


def philox_keep_mask(
    seed: int | torch.Tensor, shape: tuple[int, ...] | torch.Size, p: float,
    device: torch.device | str,
) -> torch.Tensor:
    """The keep mask of the convention (module docstring) in plain torch: bool tensor of ``shape``
    on ``device`` (any device, meta included), True where the element is kept. Bit-identical to
    the Triton ``keep_mask`` and csrc's ``keep_bits4``.

    A seed tensor stays on the device (no host sync). Works in chunks of rows so its int64
    temporaries stay near 100 MB for any size.

    Args:
        seed: int or integer tensor of one element.
        shape: [..., C] shape of the tensor dropout applies to (x for 'pre', y for 'post').
        p: dropout probability in [0, 1].
        device: where to build the mask.
    """
    device = torch.device(device)
    shape, rows, n_cols = _rows_cols(shape)
    p = _check_p(p)
    groups = -(-n_cols // 4)
    if device.type == "meta" or rows * n_cols == 0:
        return torch.empty(shape, dtype=torch.bool, device=device)
    if isinstance(seed, torch.Tensor):
        s = seed_tensor(seed, device).reshape(())
        k0, k1 = s & _M32, (s >> 32) & _M32
    else:
        s = _check_int_seed(seed)
        k0, k1 = s & _M32, (s >> 32) & _M32
    p_t = torch.tensor(p, dtype=torch.float32, device=device)
    out = torch.empty((rows, groups, 4), dtype=torch.bool, device=device)
    step = max(1, _TORCH_CHUNK_GROUPS // max(groups, 1))
    cols = torch.arange(groups, dtype=torch.int64, device=device)
    for r0 in range(0, rows, step):
        r = torch.arange(r0, min(rows, r0 + step), dtype=torch.int64, device=device)
        counter = (r[:, None] * groups + cols[None, :]) & _M32
        words = _philox4x32_10(counter, k0, k1)
        out[r0:r0 + r.numel()] = torch.stack([_uniform(w) >= p_t for w in words], dim=-1)
    return out.reshape(rows, groups * 4)[:, :n_cols].reshape(shape)


def _triton_keep_mask(seed: int | torch.Tensor, shape: tuple[int, ...], rows: int, n_cols: int,
                      p: float, device: torch.device) -> torch.Tensor:
    out = torch.empty((rows, n_cols), dtype=torch.int8, device=device)
    if out.numel():
        block_r, block_c = (64, 128) if interpreter_enabled() else (16, 128)
        grid = (triton.cdiv(rows, block_r), triton.cdiv(n_cols, block_c))
        _dropout_keep_mask_kernel[grid](seed_tensor(seed, device), out, rows, n_cols, p,
                                        BLOCK_R=block_r, BLOCK_C=block_c)
    return out.view(shape).bool()


def dropout_keep_mask(
    seed: int | torch.Tensor, shape: tuple[int, ...] | torch.Size, p: float,
    device: torch.device | str, *, backend: str | None = None,
) -> torch.Tensor:
    """The keep mask the fused kernels use for ``seed`` and a dropout input of ``shape``.

    Args:
        seed: int or int64 tensor of one element.
        shape: [..., C] shape of the tensor dropout applies to (x for 'pre', y for 'post').
        p: dropout probability in [0, 1].
        device: where to build the mask.
        backend: "triton" (the mask kernel; a CUDA device, or the CPU under
            TRITON_INTERPRET=1), "torch" (``philox_keep_mask``), or None: Triton on a CUDA
            device when Triton is importable, torch elsewhere. Both give the same bits.

    Returns:
        bool tensor of ``shape``: True where the element is kept.
    """
    device = torch.device(device)
    shape, rows, n_cols = _rows_cols(shape)
    p = _check_p(p)
    if backend is None:
        backend = "triton" if HAS_TRITON and device.type == "cuda" else "torch"
    if backend == "torch":
        return philox_keep_mask(seed, shape, p, device)
    if backend != "triton":
        raise ValueError(f"backend must be 'triton', 'torch' or None; got {backend!r}")
    if not HAS_TRITON:
        raise RuntimeError("dropout_keep_mask(backend='triton'): triton is not importable; "
                           "use backend='torch' (same mask)")
    if device.type != "cuda" and not interpreter_enabled():
        raise RuntimeError(f"dropout_keep_mask(backend='triton') on {device}: needs a CUDA "
                           "device or TRITON_INTERPRET=1; use backend='torch' (same mask)")
    return _triton_keep_mask(seed, shape, rows, n_cols, p, device)


def aot_specs() -> list[dict]:
    """The mask kernel for ``kernels/aot.py`` (its launch in ``dropout_keep_mask``)."""
    sig = {"seed_ptr": "*i64", "mask_ptr": "*i8", "rows": "i32", "n_cols": "i32", "p": "fp32"}
    return [{"kernel": _dropout_keep_mask_kernel, "variant": "", "configs": None, "sig": sig,
             "fixed": {"BLOCK_R": 16, "BLOCK_C": 128}, "uses_dot": False}]
