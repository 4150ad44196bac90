"""Outlier twins: the FP32 function unchanged, the outliers where each kind puts them."""

import pytest
import torch
from conftest import tiny_vit

from pomq_deploy.models.twins import outlier_twin


def _twin(kinds, factor=30.0):
    original = tiny_vit()
    twin = tiny_vit()
    twin.load_state_dict(outlier_twin(original.state_dict(), kinds, channels=4, factor=factor, seed=0))
    return original, twin


def _inputs(model, block, where):
    seen = {}
    module = {"ln_out": model.blocks[block].attn.qkv, "proj_in": model.blocks[block].attn.proj}[where]
    handle = module.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    with torch.no_grad():
        out = model(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    handle.remove()
    return out, seen["x"].abs().amax(dim=(0, 1))


@pytest.mark.parametrize("kinds, where", [(("ln",), "ln_out"), (("v",), "proj_in"), (("ln", "qk", "v"), "ln_out")])
def test_the_function_is_unchanged_and_the_outliers_are_where_the_kind_puts_them(kinds, where):
    original, twin = _twin(kinds)
    ref, ref_range = _inputs(original, 2, where)
    out, twin_range = _inputs(twin, 2, where)
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4)
    ratio = twin_range / ref_range
    assert int((ratio > 29).sum()) == 4 and int((ratio < 1.001).sum()) == len(ratio) - 4  # 4 channels at 30x, the rest as they were


def test_q_and_k_are_scaled_against_each_other():
    original, twin = _twin(("qk",), factor=10.0)
    q_rows = twin.state_dict()["blocks.0.attn.qkv.weight"][:64].norm(dim=1) / original.state_dict()["blocks.0.attn.qkv.weight"][:64].norm(dim=1)
    k_rows = twin.state_dict()["blocks.0.attn.qkv.weight"][64:128].norm(dim=1) / original.state_dict()["blocks.0.attn.qkv.weight"][64:128].norm(dim=1)
    assert torch.allclose(q_rows[q_rows > 1.5], torch.full((4,), 10.0)) and torch.allclose(k_rows[k_rows < 0.5], torch.full((4,), 0.1))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(twin(x), original(x), rtol=1e-4, atol=1e-4)


def test_unknown_kinds_and_other_layouts_are_refused():
    with pytest.raises(ValueError, match="unknown twin kinds \\['kv'\\]"):
        outlier_twin(tiny_vit().state_dict(), ("kv",))
    with pytest.raises(ValueError, match="blocks.0.attn.qkv.weight: not in the checkpoint"):
        outlier_twin({"blocks.0.norm1.weight": torch.ones(8), "blocks.0.norm1.bias": torch.zeros(8)}, ("ln",))
