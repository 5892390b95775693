"""Checkpoint round trips of adapted GPT models (LoRA, canonical LoRA, DoRA): state_dict,
adapter-only (LoRA.adapter_key_filter), and megatron dist_checkpointing at TP=1 and TP=2."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core not installed")

from bridge.peft.adapter_io import (  # noqa: E402
    AdapterLoadError,
    adapter_state_dict,
    load_adapter_state_dict,
)
from bridge.peft.canonical_lora import CanonicalLoRA  # noqa: E402
from bridge.peft.dora import DoRA  # noqa: E402
from bridge.peft.lora import LoRA  # noqa: E402
from tests.megatron_utils import gpt_inputs, tiny_gpt_model  # noqa: E402

R, ALPHA = 4, 8

TRANSFORMS = {
    "lora": lambda: LoRA(dim=R, alpha=ALPHA, kernel_backend="eager"),
    "canonical": lambda: CanonicalLoRA(target_modules=["linear_q", "linear_v", "linear_fc1_up",
                                                       "linear_fc2"],
                                       dim=R, alpha=ALPHA, kernel_backend="eager"),
    "dora": lambda: DoRA(dim=R, alpha=ALPHA),
}


def randomise(model, seed):
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    g = torch.Generator().manual_seed(seed + 1000 * rank)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight_magnitude"):  # replicated for row-parallel bases
                p.mul_(1 + 0.2 * torch.sin(torch.arange(p.numel(), dtype=p.dtype) + seed))
            elif ".adapter." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _tensors(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items()
            if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}


def assert_same_state(got_model, want_model) -> None:
    got, want = _tensors(got_model), _tensors(want_model)
    assert sorted(got) == sorted(want)
    different = [k for k in want if not torch.equal(got[k], want[k])]
    assert not different, different


def _adapted(name, seed):
    model = TRANSFORMS[name]()(tiny_gpt_model(seed=seed, num_layers=1))
    randomise(model, seed)
    return model


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_state_dict_round_trip(megatron_tp1, name):
    model, fresh = _adapted(name, 0), _adapted(name, 1)
    assert any(not torch.equal(a, b) for a, b in zip(_tensors(model).values(),
                                                     _tensors(fresh).values(), strict=True))
    fresh.load_state_dict(model.state_dict())
    assert_same_state(fresh, model)


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_adapter_only_save_into_fresh_model(megatron_tp1, tmp_path, name):
    transform = TRANSFORMS[name]()
    model = transform(tiny_gpt_model(seed=0, num_layers=1))
    randomise(model, 3)
    transform.set_params_to_save(model)
    saved = {k: v for k, v in model.state_dict().items() if transform.adapter_key_filter(k)}
    assert saved and all(".adapter." in k for k in saved)
    assert {k for k in saved if not k.endswith("_extra_state")} == {
        k for k in adapter_state_dict(model) if not k.endswith("_extra_state")}
    torch.save(saved, tmp_path / "adapter.pt")

    fresh = TRANSFORMS[name]()(tiny_gpt_model(seed=0, num_layers=1))  # same base, fresh adapters
    ids, pos, mask = gpt_inputs()
    model.eval()  # no attention/hidden dropout
    fresh.eval()
    with torch.no_grad():
        want = model(ids, pos, attention_mask=mask)
        assert not torch.allclose(fresh(ids, pos, attention_mask=mask), want)
        load_adapter_state_dict(fresh, torch.load(tmp_path / "adapter.pt"))
        assert_same_state(fresh, model)
        torch.testing.assert_close(fresh(ids, pos, attention_mask=mask), want, rtol=0, atol=0)


def test_adapter_load_errors(megatron_tp1):
    model = LoRA(dim=R, alpha=ALPHA, kernel_backend="eager")(tiny_gpt_model(num_layers=1))
    saved = adapter_state_dict(model)
    key = "decoder.layers.0.mlp.linear_fc2.adapter.linear_in.weight"
    broken = {k: v for k, v in saved.items() if k != key}
    broken["decoder.layers.3.mlp.linear_fc2.adapter.linear_in.weight"] = saved[key]
    with pytest.raises(AdapterLoadError, match=rf"missing adapter keys: \['{key}'\].*"
                                               r"unexpected adapter keys: \['decoder\.layers\.3"):
        load_adapter_state_dict(model, broken)
    wrong_rank = adapter_state_dict(
        LoRA(dim=8, alpha=ALPHA, kernel_backend="eager")(tiny_gpt_model(num_layers=1)))
    with pytest.raises(AdapterLoadError, match=r"linear_proj\.adapter\.linear_in\.weight: model "
                                               r"\(4, 64\) vs checkpoint \(8, 64\)"):
        load_adapter_state_dict(model, wrong_rank)
    # nothing was copied by the failed loads
    assert all(torch.equal(v, saved[k]) for k, v in adapter_state_dict(model).items())


def _dist_round_trip(root: str) -> None:
    """dist_checkpointing.save of each adapted model's sharded_state_dict, load into a model with
    other values, bitwise equal afterwards (every rank checks its shards)."""
    from megatron.core import dist_checkpointing

    for name in sorted(TRANSFORMS):
        model, fresh = _adapted(name, 0), _adapted(name, 1)
        directory = os.path.join(root, name)
        if torch.distributed.get_rank() == 0:
            os.makedirs(directory)
        torch.distributed.barrier()
        dist_checkpointing.save(model.sharded_state_dict(), directory)
        torch.distributed.barrier()
        loaded = dist_checkpointing.load(fresh.sharded_state_dict(), directory)
        fresh.load_state_dict(loaded)
        assert_same_state(fresh, model)


def test_dist_checkpoint_tp1(megatron_tp1, tmp_path):
    _dist_round_trip(str(tmp_path))


def _logits(model) -> torch.Tensor:
    """The model's full-vocabulary logits on fixed inputs (gathered over TP), in eval mode."""
    from megatron.core import parallel_state

    model.eval()
    ids, pos, mask = gpt_inputs()
    with torch.no_grad():
        out = model(ids, pos, attention_mask=mask)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp > 1:
        parts = [torch.empty_like(out) for _ in range(tp)]
        torch.distributed.all_gather(parts, out.contiguous(),
                                     group=parallel_state.get_tensor_model_parallel_group())
        out = torch.cat(parts, dim=-1)
    return out


def _tp2_worker(rank: int, root: str) -> None:
    from bridge.peft import save_peft_adapter_checkpoint

    _dist_round_trip(root)
    for name in sorted(TRANSFORMS):  # reference outputs for the TP=2 -> TP=1 reload
        model = _adapted(name, 0)
        logits = _logits(model)
        if rank == 0:
            torch.save(logits, os.path.join(root, f"{name}_logits.pt"))
        # adapters alone, each rank writing its own shards
        save_peft_adapter_checkpoint(model, os.path.join(root, f"{name}_adapters"),
                                     TRANSFORMS[name]())


@pytest.mark.slow
def test_dist_checkpoint_tp2_and_reload_at_tp1(tmp_path):
    """Round trips at TP=2; then each TP=2 checkpoint loads into a TP=1 model that computes the
    same logits (catches adapter shards put back in the wrong rows, e.g. fc1's [gate; up])."""
    from megatron.core import dist_checkpointing

    from bridge.peft import load_peft_adapter_checkpoint
    from tests.megatron_utils import destroy_parallel, init_parallel, spawn_gloo

    root = tmp_path / "ckpt"
    root.mkdir()
    spawn_gloo(_tp2_worker, str(tmp_path), args=(str(root),))
    init_parallel(rank=0, world_size=1, tp=1, init_file=str(tmp_path / "dist_init_tp1"))
    try:
        for name in sorted(TRANSFORMS):
            model = _adapted(name, 1)
            model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(),
                                                          str(root / name)))
            want = torch.load(root / f"{name}_logits.pt")
            torch.testing.assert_close(_logits(model), want, rtol=1e-4, atol=1e-4, msg=name)
            # the adapter-only TP=2 checkpoint restores every adapter shard at TP=1 (upstream's
            # adapter-only saves lost TP shards): other adapters first, then the load
            randomise(model, 5)
            assert not torch.allclose(_logits(model), want, rtol=1e-4, atol=1e-4)
            load_peft_adapter_checkpoint(model, root / f"{name}_adapters", TRANSFORMS[name]())
            torch.testing.assert_close(_logits(model), want, rtol=1e-4, atol=1e-4, msg=name)
    finally:
        destroy_parallel()


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_adapter_only_dist_checkpoint_tp1(megatron_tp1, tmp_path, name):
    """save_peft_adapter_checkpoint writes only adapter tensors; load_peft_adapter_checkpoint puts
    them back into a model with other adapters and the same base."""
    from bridge.peft import load_peft_adapter_checkpoint, save_peft_adapter_checkpoint

    model, other = _adapted(name, 0), _adapted(name, 0)
    randomise(other, 9)
    peft = TRANSFORMS[name]()
    save_peft_adapter_checkpoint(model, tmp_path / "adapters", peft)
    keys = set(_adapter_keys(tmp_path / "adapters"))
    assert keys and all(".adapter." in k for k in keys)
    load_peft_adapter_checkpoint([other], tmp_path / "adapters", peft)
    assert_same_state(other, model)
    with pytest.raises(ValueError, match="torch_dist"):
        load_peft_adapter_checkpoint(other, tmp_path / "adapters", peft, ckpt_format="zarr")


def _adapter_keys(path) -> list[str]:
    from megatron.core.dist_checkpointing.serialization import load_tensors_metadata

    return list(load_tensors_metadata(str(path)))


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_every_adapter_kind_round_trips_over_plain_linears(name):
    """LinearAdapter layout (LoRA and canonical LoRA over nn.Linear) and DoRA's plain factors:
    adapter-only state dicts load into a fresh model, and merging keeps the outputs."""
    from bridge.peft import merge_and_unload

    def build(seed):
        torch.manual_seed(seed)
        model = torch.nn.Module()
        model.linear_proj, model.linear_fc2 = torch.nn.Linear(8, 6), torch.nn.Linear(6, 8)
        kw = dict(target_modules=["linear_proj", "linear_fc2"], dim=2, alpha=4)
        transform = {"lora": LoRA, "canonical": CanonicalLoRA, "dora": DoRA}[name](**kw)
        return transform(model)

    def run(model, x):
        return model.linear_fc2(torch.relu(model.linear_proj(x)))

    model, fresh = build(0), build(0)
    randomise(model, 4)
    x = torch.randn(5, 8)
    model.eval()
    fresh.eval()
    want = run(model, x)
    assert not torch.allclose(run(fresh, x), want)
    load_adapter_state_dict(fresh, adapter_state_dict(model))
    torch.testing.assert_close(run(fresh, x), want, rtol=0, atol=0)
    plain = merge_and_unload(fresh)
    assert type(plain.linear_proj) is torch.nn.Linear
    torch.testing.assert_close(run(plain, x), want, rtol=1e-5, atol=1e-6)
