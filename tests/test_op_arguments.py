"""The fused ops' boundary (kernels/_checks.py, kernels/backend.py): every bad argument gets a
clear error naming it, on every backend (issue 15 items 11, 12 and its "unclear errors"), the
eager backend draws the fused kernels' dropout mask (item 15: one seed, one mask) and runs on
meta tensors."""

from __future__ import annotations

import pytest
import torch
from bridge.kernels.backend import BackendUnavailableError
from bridge.kernels.lora_linear import lora_linear
from bridge.kernels.norm_lora import norm_lora_linear

from tests.conftest import requires_kernel_device
from tests.numerics import assert_close_rel, lora_inputs

BACKENDS = ["eager", "auto", pytest.param("triton", marks=requires_kernel_device())]


def _args(dtype=torch.float32, **kw):
    x, w, b, a, bb = lora_inputs((3,), 8, 6, 2, dtype, requires_grad=False)
    return x, w, b, a, bb


def _norm_args(**over):
    x, w, b, a, bb = _args()
    t = dict(x=x, norm_weight=torch.rand(8) + 0.5, norm_bias=None, weight=w, bias=b, lora_a=a,
             lora_b=bb)
    t.update(over)
    return t


# ---- item 11: integer tensors --------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_lora_linear_refuses_non_floating_tensors_on_every_backend(backend, dtype):
    x, w, b, a, bb = (t.to(dtype) for t in _args())
    with pytest.raises(TypeError, match=rf"x has dtype {str(dtype)[6:]}.*floating.*float32, "
                                        r"float16 or bfloat16"):
        lora_linear(x, w, b, a, bb, scale=1.0, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_norm_lora_refuses_integer_norm_weight(backend):
    t = _norm_args(norm_weight=torch.ones(8, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"norm_weight has dtype int64.*floating"):
        norm_lora_linear(*t.values(), normalization="RMSNorm", eps=1e-5, scale=1.0,
                         backend=backend)


# ---- item 12: devices of the norm parameters ----------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["norm_weight", "norm_bias"])
def test_norm_lora_checks_the_device_of_the_norm_parameters(backend, which):
    t = _norm_args(norm_bias=torch.zeros(8))
    t[which] = t[which].to("meta")
    with pytest.raises(ValueError, match=rf"{which} is on meta.*x is on cpu.*one device"):
        norm_lora_linear(*t.values(), normalization="LayerNorm", eps=1e-5, scale=1.0,
                         backend=backend)


# ---- argument types at the op boundary (kernels/_checks.py) --------------------------------------
@pytest.mark.parametrize("scale, err, message", [
    ("2", TypeError, r"scale must be a real number \(alpha / rank\), got str '2'"),
    (None, TypeError, r"scale must be a real number"),
    (float("nan"), ValueError, r"scale must be finite, got nan"),
    (float("inf"), ValueError, r"scale must be finite, got inf"),
])
@pytest.mark.parametrize("backend", BACKENDS)
def test_scale_is_checked_at_the_op_boundary(backend, scale, err, message):
    with pytest.raises(err, match=message):
        lora_linear(*_args(), scale=scale, backend=backend)
    with pytest.raises(err, match=message):
        norm_lora_linear(*_norm_args().values(), normalization="RMSNorm", eps=1e-5, scale=scale,
                         backend=backend)


@pytest.mark.parametrize("eps, err, message", [
    ("1e-5", TypeError, r"eps must be a real number > 0, got str '1e-05'|eps must be a real "
                        r"number > 0, got str '1e-5'"),
    (float("nan"), ValueError, r"eps must be > 0 and finite, got nan"),
])
def test_eps_is_checked_at_the_op_boundary(eps, err, message):
    with pytest.raises(err, match=message):
        norm_lora_linear(*_norm_args().values(), normalization="RMSNorm", eps=eps, scale=1.0)


@pytest.mark.parametrize("name", ["norm_weight", "norm_bias"])
def test_a_list_as_norm_parameter_is_a_type_error_naming_it(name):
    t = _norm_args(norm_bias=torch.zeros(8))
    t[name] = [1.0] * 8
    with pytest.raises(TypeError, match=rf"{name} must be a torch.Tensor, got list"):
        norm_lora_linear(*t.values(), normalization="LayerNorm", eps=1e-5, scale=1.0)


@pytest.mark.parametrize("seed, err, message", [
    (2**63, ValueError, r"seed must fit in int64"),
    (-(2**63) - 1, ValueError, r"seed must fit in int64"),
    ("7", TypeError, r"seed must be an int or an int64 tensor of one element; got str"),
    (1.5, TypeError, r"seed must be an int or an int64 tensor of one element; got float"),
    (torch.tensor([1.0]), TypeError, r"seed tensor must have an integer dtype"),
])
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_is_checked_at_the_op_boundary_with_or_without_dropout(backend, p, seed, err,
                                                                    message):
    with pytest.raises(err, match=message):
        lora_linear(*_args(), scale=1.0, dropout=p, seed=seed, backend=backend)
    with pytest.raises(err, match=message):
        norm_lora_linear(*_norm_args().values(), normalization="RMSNorm", eps=1e-5, scale=1.0,
                         dropout=p, seed=seed, backend=backend)


# ---- the backend error says why and what works --------------------------------------------------
def test_backend_error_for_a_dtype_names_the_dtypes_that_work(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x, w, b, a, bb = _args(torch.float64)
    with pytest.raises(BackendUnavailableError) as err:
        lora_linear(x, w, b, a, bb, scale=1.0, backend="triton")
    msg = str(err.value)
    assert "dtype float64" in msg and "float32, float16 or bfloat16" in msg, msg
    assert "TRITON_INTERPRET" not in msg and "Ampere" not in msg, msg


def test_backend_error_for_a_trainable_base_says_to_freeze_it(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x, w, b, a, bb = _args()
    w.requires_grad_(True)
    with pytest.raises(BackendUnavailableError) as err:
        lora_linear(x, w, b, a, bb, scale=1.0, backend="triton")
    msg = str(err.value)
    assert "requires grad" in msg and "requires_grad_(False)" in msg, msg
    assert "TRITON_INTERPRET" not in msg and "Ampere" not in msg, msg


def test_backend_error_without_a_gpu_suggests_the_interpreter_only_when_it_is_off(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError) as err:
        lora_linear(*_args(), scale=1.0, backend="triton")
    msg = str(err.value)
    assert "no GPU" in msg and "Ampere" in msg and "TRITON_INTERPRET=1" in msg, msg


@pytest.mark.parametrize("position", ["pre", "post"])
def test_meta_tensors_through_the_eager_kernel_with_a_seed(position):
    x, w, b, a, bb = (t.to("meta") for t in _args())
    y = lora_linear(x, w, b, a, bb, scale=1.0, dropout=0.2, dropout_position=position, seed=3,
                    backend="eager")
    assert y.device.type == "meta" and y.shape == (3, 6)




# ---- item 15: one seed, one mask, on every backend -----------------------------------------------
@requires_kernel_device()
@pytest.mark.parametrize("position", ["pre", "post"])
@pytest.mark.parametrize("seed", [7, torch.tensor([2**40 + 3])])
def test_eager_and_triton_draw_the_same_mask_for_a_seed(position, seed):
    from tests.conftest import KERNEL_DEVICE

    x, w, b, a, bb = lora_inputs((2, 5), 37, 19, 3, torch.float32, device=KERNEL_DEVICE)
    kw = dict(scale=2.0, dropout=0.4, dropout_position=position, seed=seed)
    ys = {}
    for backend in ("eager", "triton"):
        leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in (x, b, a, bb)]
        y = lora_linear(leaves[0], w, leaves[1], leaves[2], leaves[3], backend=backend, **kw)
        y.square().sum().backward()
        ys[backend] = [y] + [t.grad for t in leaves]
    for name, got, want in zip(["y", "dx", "db", "dA", "dB"], ys["triton"], ys["eager"],
                               strict=True):
        assert_close_rel(got, want, 2e-5, f"{position} {name}")


@requires_kernel_device()
def test_norm_lora_eager_and_triton_draw_the_same_mask_for_a_seed():
    from tests.conftest import KERNEL_DEVICE

    t = {k: v.to(KERNEL_DEVICE) if isinstance(v, torch.Tensor) else v
         for k, v in _norm_args(norm_bias=torch.zeros(8)).items()}
    kw = dict(normalization="LayerNorm", eps=1e-5, scale=1.5, dropout=0.5, seed=11)
    y_eager = norm_lora_linear(*t.values(), backend="eager", **kw)
    y_triton = norm_lora_linear(*t.values(), backend="triton", **kw)
    assert_close_rel(y_triton, y_eager, 2e-5, "norm_lora y")


def test_eager_mask_is_the_philox_mask_and_a_drawn_seed_follows_torch_generator():
    from bridge.kernels.philox import SEED_HIGH, philox_keep_mask

    x, w, b, a, bb = _args()
    y = lora_linear(x, w, b, a, bb, scale=1.0, dropout=0.5, seed=5, backend="eager")
    mask = philox_keep_mask(5, x.shape, 0.5, "cpu")
    want = x @ w.t() + b + ((x * mask / 0.5) @ a.t()) @ bb.t()
    assert_close_rel(y, want, 1e-6, "eager y with the Philox mask")
    torch.manual_seed(3)
    y_drawn = lora_linear(x, w, b, a, bb, scale=1.0, dropout=0.5, backend="eager")
    torch.manual_seed(3)
    seed = int(torch.randint(0, SEED_HIGH, (1,)))  # what draw_seed takes from the generator
    y_given = lora_linear(x, w, b, a, bb, scale=1.0, dropout=0.5, seed=seed, backend="eager")
    assert torch.equal(y_drawn, y_given)
