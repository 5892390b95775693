"""bridge.layers.LayerNormColumnParallelLinear inside megatron-core's own layer spec (CPU, world
size 1): megatron's attention builds it as ``linear_qkv`` and its MLP as ``linear_fc1`` with the
arguments each supported version passes (``stride``; ``name`` from 0.18), the model computes what
the local spec computes (values and every gradient), checkpoints interchange with the local spec,
and LoRA trains it, eager and with the fused Triton path."""

from __future__ import annotations

import inspect
import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("megatron.core", reason="megatron-core not installed (pip install -e .[test])")

import megatron.core  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
from megatron.core.tensor_parallel import ColumnParallelLinear  # noqa: E402
from megatron.core.transformer.identity_op import IdentityOp  # noqa: E402

from bridge.layers import LayerNormColumnParallelLinear, get_gpt_layer_norm_linear_spec  # noqa: E402
from bridge.peft import LoRA, LoRALinear  # noqa: E402
from tests.conftest import requires_kernel_device  # noqa: E402
from tests.megatron_utils import gpt_inputs, make_config, tiny_gpt_model  # noqa: E402
from tests.numerics import rel_err  # noqa: E402

pytestmark = pytest.mark.usefixtures("megatron_tp1")

LAYERS = 2
# Llama-style (RMSNorm, SwiGLU: megatron builds fc1 with stride=2) and GPT-2-style (LayerNorm with
# bias, GeLU, linear biases: the norm-fused linear returns a bias beside its output).
CASES = {
    "rmsnorm-swiglu": dict(),
    "layernorm-gelu-bias": dict(normalization="LayerNorm", gated_linear_unit=False,
                                activation_func=F.gelu, add_bias_linear=True),
}
# The local spec's norms and the fused linear's norm parameters: the same tensors under the
# transformer-engine names the local spec already maps its checkpoint keys to.
LOCAL_TO_FUSED = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                  "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}


def build(case: str, fused: bool, seed: int = 0, num_layers: int = LAYERS):
    cfg = CASES[case]
    normalization = cfg.get("normalization", "RMSNorm")
    spec = (get_gpt_layer_norm_linear_spec(normalization=normalization) if fused
            else get_gpt_layer_local_spec(normalization=normalization))
    return tiny_gpt_model(seed=seed, num_layers=num_layers, layer_spec=spec, hidden_dropout=0.0,
                          attention_dropout=0.0, **cfg)


def perturb(model, seed: int):
    """Move every parameter off its initial value (norm weights start at one, biases at zero), so
    a parameter that is not carried over shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def to_fused_key(key: str) -> str:
    for old, new in LOCAL_TO_FUSED.items():
        key = key.replace(old, new)
    return key


def loss_of(model, seed: int = 0) -> torch.Tensor:
    ids, pos, mask = gpt_inputs(seed=seed)
    labels = torch.roll(ids, -1, dims=1)
    return model(ids, pos, mask, labels=labels).float().mean()


def test_constructor_takes_what_megatron_passes(monkeypatch):
    """``stride`` reaches the weight's partition attribute; ``name`` reaches the base class
    exactly where its signature has it (megatron-core 0.18+), and is accepted everywhere."""
    seen = {}
    original = ColumnParallelLinear.__init__

    def spy(self, *args, **kwargs):
        seen.update(kwargs)
        original(self, *args, **kwargs)

    monkeypatch.setattr(ColumnParallelLinear, "__init__", spy)
    layer = LayerNormColumnParallelLinear(
        16, 24, config=make_config(), init_method=torch.nn.init.zeros_, gather_output=False,
        bias=False, skip_bias_add=True, is_expert=False, tp_comm_buffer_name="fc1", tp_group=None,
        stride=2, name="decoder.layers.0.mlp.linear_fc1")
    assert layer.weight.partition_stride == 2
    assert seen["stride"] == 2
    takes_name = "name" in inspect.signature(original).parameters
    assert ("name" in seen) is takes_name, megatron.core.__version__
    if takes_name:
        assert seen["name"] == "decoder.layers.0.mlp.linear_fc1"
    with pytest.raises(ValueError, match="stride must be a positive int, got 0"):
        LayerNormColumnParallelLinear(16, 24, config=make_config(), init_method=torch.nn.init.zeros_,
                                      gather_output=False, bias=False, skip_bias_add=True, stride=0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_spec_builds_norm_linears_that_match_the_local_spec(case):
    fused, local = build(case, fused=True), perturb(build(case, fused=False), seed=5)
    for i in range(LAYERS):
        layer = fused.decoder.layers[i]
        assert type(layer.self_attention.linear_qkv) is LayerNormColumnParallelLinear
        assert type(layer.mlp.linear_fc1) is LayerNormColumnParallelLinear
        assert isinstance(layer.input_layernorm, IdentityOp)
        assert isinstance(layer.pre_mlp_layernorm, IdentityOp)
        # megatron's MLP asked for stride 2 with a gated unit; the fused fc1 kept it, as its own does
        assert (layer.mlp.linear_fc1.weight.partition_stride
                == local.decoder.layers[i].mlp.linear_fc1.weight.partition_stride)
    gated = CASES[case].get("gated_linear_unit", True)
    assert fused.decoder.layers[0].mlp.linear_fc1.weight.partition_stride == (2 if gated else 1)

    # the same parameters under the mapped names, nothing left over on either side
    local_state = {to_fused_key(k): v for k, v in local.state_dict().items()
                   if not k.endswith("_extra_state")}
    fused_keys = {k for k in fused.state_dict() if not k.endswith("_extra_state")}
    assert set(local_state) == fused_keys
    fused.load_state_dict(local_state, strict=False)  # strict=False: only _extra_state is left out

    loss_f, loss_l = loss_of(fused), loss_of(local)
    loss_f.backward()
    loss_l.backward()
    assert rel_err(loss_f, loss_l) < 1e-6
    grads_l = {to_fused_key(n): p.grad for n, p in local.named_parameters()}
    for n, p in fused.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
        assert rel_err(p.grad, grads_l[n]) < 1e-5, n


def test_checkpoint_of_the_local_spec_loads_into_the_fused_spec(tmp_path):
    """megatron dist_checkpointing: the local spec's checkpoint keys are the fused layer's."""
    from megatron.core import dist_checkpointing

    local = perturb(build("layernorm-gelu-bias", fused=False, seed=0, num_layers=1), seed=5)
    fused = build("layernorm-gelu-bias", fused=True, seed=1, num_layers=1)
    os.makedirs(tmp_path / "ckpt")
    dist_checkpointing.save(local.sharded_state_dict(), str(tmp_path / "ckpt"))
    fused.load_state_dict(dist_checkpointing.load(fused.sharded_state_dict(), str(tmp_path / "ckpt")))
    local_state = {to_fused_key(k): v for k, v in local.state_dict().items()}
    for k, v in fused.state_dict().items():
        if not k.endswith("_extra_state"):
            assert torch.equal(v, local_state[k]), k


def _wrapped_norm_linears(model) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules()
            if isinstance(m, LoRALinear) and isinstance(m.to_wrap, LayerNormColumnParallelLinear)}


def test_lora_trains_the_fused_spec_gpt_and_leaves_the_base_untouched():
    model = build("rmsnorm-swiglu", fused=True)
    # scale 1, lr 1e-2: as tests/test_gpt_model.py, settles into descent on this tiny model
    LoRA(dim=8, alpha=8, kernel_backend="eager")(model)
    norm_linears = _wrapped_norm_linears(model)
    assert set(norm_linears) == {f"decoder.layers.{i}.{name}" for i in range(LAYERS)
                                 for name in ("self_attention.linear_qkv", "mlp.linear_fc1")}
    wrapped = {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{m}.adapter.linear_{io}.weight" for m in wrapped for io in ("in", "out")}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = loss_of(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        final = loss_of(model).item()
    assert losses[0] > 4.0  # ~ln(128) for an untrained model: the drop below is meaningful
    assert final < losses[0] - 0.5, losses + [final]
    for name, p in model.named_parameters():
        if name in trainable:
            assert not torch.equal(p, before[name]), f"adapter parameter {name} did not move"
        else:
            assert torch.equal(p, before[name]), f"base parameter {name} changed"


@requires_kernel_device()
def test_fused_triton_path_in_the_spec_matches_eager(kernel_device):
    """One forward/backward of the fused-spec GPT with LoRA through the Triton norm-fused path
    (qkv returns (out, None), fc1 (out, bias): both of megatron's calls) equals the eager path."""
    results = {}
    for backend in ("eager", "triton"):
        model = build("layernorm-gelu-bias", fused=True).to(kernel_device)
        LoRA(dim=4, alpha=8, kernel_backend=backend, lora_B_init_method="normal")(model)
        loss = loss_of(model)
        loss.backward()
        results[backend] = (loss.detach(), {n: p.grad for n, p in model.named_parameters()
                                             if p.requires_grad})
    (loss_e, grads_e), (loss_t, grads_t) = results["eager"], results["triton"]
    assert rel_err(loss_t, loss_e) < 1e-5
    assert set(grads_t) == set(grads_e)
    for n, g in grads_t.items():
        assert rel_err(g, grads_e[n]) < 1e-4, n


def test_spec_refuses_what_it_cannot_fuse():
    with pytest.raises(ValueError, match=r"fc1=True needs megatron's dense MLP.*keep pre_mlp_layernorm"):
        get_gpt_layer_norm_linear_spec(num_experts=2)
    moe = get_gpt_layer_norm_linear_spec(num_experts=2, fc1=False)
    assert moe.submodules.self_attention.submodules.linear_qkv is LayerNormColumnParallelLinear
    assert moe.submodules.pre_mlp_layernorm is not IdentityOp
    with pytest.raises(ValueError, match="qkv=True needs an attention with a linear_qkv"):
        get_gpt_layer_norm_linear_spec(multi_latent_attention=True, fc1=False)
