"""The dropout RNG convention shared by every fused kernel (and by the CUDA twins in csrc/).

Convention (a CUDA C++ twin must reproduce it bit for bit):

* Generator: ``tl.rand(seed, offset)`` = Philox-4x32, 10 rounds. The int64 seed is split into
  key = (lo, hi) 32-bit halves (``k0 = seed & 0xffffffff``, ``k1 = seed >> 32``); the counter is
  ``(offset, 0, 0, 0)`` with a 32-bit offset; the first output word ``c0`` becomes a float in
  [0, 1) as ``(c0 < 0 ? ~c0 : c0) * 4.6566127342e-10`` (c0 read as int32, product in fp32).
* Element index: the offset of element (row, col) of the logical 2-D tensor [rows, cols] that
  dropout applies to is ``row * cols + col``, computed in 64 bits and truncated to 32 bits: for
  'pre' that is x viewed as [M, K], for 'post' the output viewed as [M, N]. Tensors of more than
  2^31 elements therefore wrap around (offsets repeat modulo 2^32; the int32 counter read as
  uint32 stays distinct up to 2^32 elements).
* Keep rule: keep the element when ``rand >= p``; kept values are scaled by 1 / (1 - p).

The seed is a runtime int64 tensor of one element, loaded in the kernel: a new seed never
recompiles, and a seed drawn on the device (``draw_seed``) needs no host sync.
"""

from __future__ import annotations

import torch
from bridge.kernels._triton_common import HAS_TRITON, tl, triton
from bridge.kernels.backend import interpreter_enabled

SEED_HIGH = 2**31 - 1


def draw_seed(device: torch.device) -> torch.Tensor:
    """A fresh dropout seed from torch's default generator of ``device``: int64 tensor [1].

    Drawn from the default generator, so each step gets a new mask and ranks whose generators
    Megatron keeps in sync (tensor-parallel peers) draw equal seeds.
    """
    return torch.randint(0, SEED_HIGH, (1,), dtype=torch.int64, device=device)


def seed_tensor(seed: int | torch.Tensor, device: torch.device) -> torch.Tensor:
    """An int64 tensor [1] on ``device`` holding ``seed``."""
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1:
            raise ValueError(f"seed tensor must have one element; got shape {tuple(seed.shape)}")
        return seed.reshape(1).to(device=device, dtype=torch.int64)
    return torch.tensor([int(seed)], dtype=torch.int64, device=device)


if HAS_TRITON:

    @triton.jit
    def keep_mask(seed, rows, cols, n_cols, p):
        """Keep mask of the tile (rows[:, None], cols[None, :]) of a logical [*, n_cols] tensor:
        rand(seed, int32(row * n_cols + col)) >= p (see the module docstring)."""
        offs = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
        return tl.rand(seed, offs.to(tl.int32)) >= p

    @triton.jit
    def _dropout_keep_mask_kernel(
        seed_ptr,  # int64 [1]: the seed
        mask_ptr,  # bool/int8 [rows, n_cols] contiguous: output keep mask
        rows,  # number of rows (product of the leading dims)
        n_cols,  # last dim
        p,  # fp32 dropout probability
        BLOCK_R: tl.constexpr,  # rows per program
        BLOCK_C: tl.constexpr,  # columns per program
    ):
        """mask[i, j] = rand(seed, i * n_cols + j) >= p."""
        seed = tl.load(seed_ptr)
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        keep = keep_mask(seed, r, c, n_cols, p)
        ptrs = mask_ptr + r.to(tl.int64)[:, None] * n_cols + c[None, :]
        tl.store(ptrs, keep.to(tl.int8), mask=(r[:, None] < rows) & (c[None, :] < n_cols))

else:  # pragma: no cover
    keep_mask = None


def dropout_keep_mask(
    seed: int | torch.Tensor, shape: tuple[int, ...] | torch.Size, p: float,
    device: torch.device | str,
) -> torch.Tensor:
    """The keep mask the fused kernels use for ``seed`` and a dropout input of ``shape``.

    Args:
        seed: int or int64 tensor of one element.
        shape: [..., C] shape of the tensor dropout applies to (x for 'pre', y for 'post').
        p: dropout probability in [0, 1).
        device: where to run (a CUDA device, or "cpu" under TRITON_INTERPRET=1).

    Returns:
        bool tensor of ``shape``: True where the element is kept.
    """
    device = torch.device(device)
    shape = tuple(int(d) for d in shape)
    if len(shape) == 0:
        raise ValueError("dropout_keep_mask needs a shape with at least one dimension")
    n_cols = shape[-1]
    rows = 1
    for d in shape[:-1]:
        rows *= d
    out = torch.empty((rows, n_cols), dtype=torch.int8, device=device)
    if out.numel():
        big = interpreter_enabled()
        block_r, block_c = (64, 128) if big else (16, 128)
        grid = (triton.cdiv(rows, block_r), triton.cdiv(n_cols, block_c))
        _dropout_keep_mask_kernel[grid](seed_tensor(seed, device), out, rows, n_cols, float(p),
                                        BLOCK_R=block_r, BLOCK_C=block_c)
    return out.view(shape).bool()
