import copy

import pytest
import timm
import torch
from conftest import images, make_fmnist, tiny_vit
from safetensors.torch import save_file

from pomq_deploy.plan import BlockBits, Plan, uniform_plan
from pomq_deploy.quant.calibration import CACHE_ENV, calibrated_model
from pomq_deploy.quant.model import QuantModel
from pomq_deploy.quant.modules import PreciseGELU
from pomq_deploy.quant.quantizers import Log2Q, TwoScaleQ, UniformQ
from pomq_deploy.recipe import load_recipe


def cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


@pytest.fixture(scope="module")
def calibrated():
    fp = tiny_vit()
    qm = QuantModel(copy.deepcopy(fp), "fqvit")
    state = qm.calibrate(images())
    return fp, qm, state


def test_wraps_every_block_and_layer():
    qm = QuantModel(tiny_vit(), "fqvit")
    assert qm.num_blocks == 6
    roles = [aq.role for aq in qm.act_quants.values()]
    # per block: norm1, qkv in, qkv out, attention, proj in, norm2, fc1 in, fc2 in; outside: patch, final norm, head
    assert len(roles) == 6 * 8 + 3
    assert roles.count("attn") == 6 and roles.count("gelu") == 6 and roles.count("ln_in") == 6 * 2 + 1
    assert len(qm.weighted) == 6 * 4 + 2
    assert all(not m.fused_attn for m in qm.model.modules() if hasattr(m, "fused_attn"))


def test_gelu_is_computed_correctly_rounded_on_the_exact_path():
    qm = QuantModel(tiny_vit(), "fqvit")
    gelus = [m for m in qm.modules() if isinstance(m, PreciseGELU)]
    assert len(gelus) == 6 and not any(type(m) is torch.nn.GELU for m in qm.modules())
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(0)) * 3
    exact = torch.nn.functional.gelu(x.double())
    fast = gelus[0](x)
    assert torch.equal(fast, torch.nn.functional.gelu(x)) and not torch.equal(fast, exact.float())  # PyTorch's own
    with qm.exact_path():
        assert torch.equal(gelus[0](x), exact.float())  # float64, rounded once
        assert torch.equal(gelus[0](x.double()), exact)  # a float64 model (the FP64 floor) stays float64
    assert not gelus[0].exact  # the fast path again after the block
    # timm's own GELU classes (a model built with act_layer="gelu" / "gelu_tanh") are replaced too
    tanh = QuantModel(tiny_vit(act_layer="gelu_tanh"), "fqvit")
    kinds = {m.approximate for m in tanh.modules() if isinstance(m, PreciseGELU)}
    assert kinds == {"tanh"} and not any("GELU" in type(m).__name__ and not isinstance(m, PreciseGELU) for m in tanh.modules())


def test_passes_through_until_a_plan_is_applied(calibrated):
    fp, qm, _ = calibrated
    qm.apply(None)
    x = images(1, seed=7)[0]
    with torch.no_grad():
        assert torch.allclose(qm(x), fp(x), atol=1e-5)


def test_plans_switch_without_recalibration(calibrated):
    fp, qm, _ = calibrated
    x = images(1, seed=7)[0]
    with torch.no_grad():
        ref = fp(x)
        qm.apply(uniform_plan("8/8/8", 6, "t", "fqvit"))
        y8 = qm(x)
        qm.apply(uniform_plan("4/4/4", 6, "t", "fqvit"))
        y4 = qm(x)
        qm.apply(uniform_plan("8/8/8", 6, "t", "fqvit"))
        assert torch.equal(qm(x), y8)
    assert cos(y8, ref) > 0.95 and cos(y4, ref) < cos(y8, ref)  # random weights: small logits, loose bound


def test_plan_sets_each_blocks_widths(calibrated):
    _, qm, _ = calibrated
    blocks = (BlockBits(w=4, a=8, attn=4),) + (BlockBits(w=8, a=4, attn=8),) * 5
    qm.apply(Plan(recipe="t", scheme="fqvit", blocks=blocks))
    b0, b1 = qm.blocks[:2]
    assert b0.attn.qkv.weight_bits == 4 and b1.attn.qkv.weight_bits == 8 and b1.mlp.fc2.weight_bits == 8
    assert qm.model.head.weight_bits == 8 and qm.model.patch_embed.proj.weight_bits == 8  # outside blocks: 8-bit
    assert isinstance(b0.attn.attn_drop.active, Log2Q) and isinstance(b1.attn.attn_drop.active, UniformQ)  # LIS at 4 bits
    assert b0.attn.proj.in_quant.active.qmax == 255 and b1.attn.proj.in_quant.active.qmax == 15
    ptf = b1.norm1.quant.active
    assert ptf.shift is not None and ptf.qmax == 15 and set(ptf.shift.tolist()) <= {0, 1, 2, 3}


def test_symmetric_format_has_zero_points_of_zero(calibrated):
    _, qm, _ = calibrated
    qm.apply(uniform_plan("8/8/8", 6, "t", "fqvit"), fmt="sym")
    uniform = [aq.active for aq in qm.act_quants.values() if isinstance(aq.active, UniformQ)]
    assert uniform and all(q.zero_point == 0 and q.qmin == -128 for q in uniform)


def test_state_roundtrips_through_torch_save(calibrated, tmp_path):
    fp, qm, state = calibrated
    torch.save(state, tmp_path / "s.pt")
    other = QuantModel(copy.deepcopy(fp), "fqvit")
    other.load_state(torch.load(tmp_path / "s.pt", weights_only=True))
    plan = uniform_plan("8/4/4", 6, "t", "fqvit")
    qm.apply(plan)
    other.apply(plan)
    x = images(1, seed=9)[0]
    with torch.no_grad():
        assert torch.equal(qm(x), other(x))


def test_tsptq_uses_two_scales():
    qm = QuantModel(tiny_vit(), "tsptq")
    qm.calibrate(images())
    qm.apply(uniform_plan("8/8/8", 6, "t", "tsptq"))
    b = qm.blocks[2]
    assert isinstance(b.attn.attn_drop.active, TwoScaleQ) and isinstance(b.mlp.fc2.in_quant.active, TwoScaleQ)
    assert b.norm2.quant.active.shift is not None and set(b.norm2.quant.active.shift.unique().tolist()) <= {0, max(b.norm2.quant.active.shift.tolist())}


def test_swin_quantizes_end_to_end():
    torch.manual_seed(0)
    fp = timm.create_model("swin_tiny_patch4_window7_224", img_size=64, embed_dim=32, depths=(2, 2), num_heads=(2, 4),
                           window_size=4, num_classes=10).eval()
    qm = QuantModel(copy.deepcopy(fp), "fqvit")
    assert qm.num_blocks == 4
    qm.calibrate(images(2, 4, size=64))
    qm.apply(Plan(recipe="swin", scheme="fqvit", blocks=(BlockBits(w=4, a=8, attn=4),) + (BlockBits(w=8, a=8, attn=8),) * 3))
    x = images(1, 4, size=64, seed=5)[0]
    with torch.no_grad():
        y, ref = qm(x), fp(x)
    assert torch.isfinite(y).all() and cos(y, ref) > 0.9
    assert qm.blocks[0].attn.qkv.weight_bits == 4 and isinstance(qm.blocks[0].attn.attn_drop.active, Log2Q)


def test_calibration_is_cached_per_scheme_and_observer(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    torch.manual_seed(0)
    ckpt = tmp_path / "w.safetensors"
    save_file(timm.create_model("deit_fmnist").state_dict(), str(ckpt))
    data = make_fmnist(tmp_path / "fm", n_train=30, n_test=10)
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(f"name: r\nmodel: {{arch: deit_fmnist, checkpoint: {ckpt}}}\n"
                           f"data: {{kind: fashion_mnist, root: {data}, calib_images: 20, calib_batch: 10}}\n")
    recipe = load_recipe(str(recipe_path))
    first, info1 = calibrated_model(recipe, "fqvit")
    second, info2 = calibrated_model(recipe, "fqvit")
    assert not info1.cached and info2.cached and info1.path == info2.path
    _, info3 = calibrated_model(recipe, "fqvit", observer="omse")
    assert not info3.cached and info3.path != info1.path
    plan = uniform_plan("8/8/4", 12, "r", "fqvit")
    first.apply(plan)
    second.apply(plan)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(first(x), second(x))


@pytest.mark.parametrize("scheme", ["fqvit", "tsptq"])
def test_attention_matmuls_run_on_codes(scheme, monkeypatch):
    """Each block's q @ k^T and probs @ v (one grid, or V-2SF's two) are taken as integer GEMMs, and nothing else
    in the attention's forward (the qkv and proj Linears' own GEMMs) is: the logits stay those of the float
    MatMuls on the same quantized values up to summation order (here often to the bit: the quantizers after
    them absorb last-bit differences)."""
    from pomq_deploy.quant.attention import IntegerAttention

    qm = QuantModel(tiny_vit(), scheme)
    qm.calibrate(images())
    qm.apply(uniform_plan("8/8/8", 6, "t", scheme))
    x = images(1, seed=7)[0]
    taken = []
    originals = {name: getattr(IntegerAttention, name) for name in ("_qk", "_pv")}

    def counting(name):
        def take(self, a, b):
            y = originals[name](self, a, b)
            taken.append((name, tuple(a.shape), tuple(b.shape), y is not None))
            return y
        return take

    def patch(make):
        for name in originals:
            monkeypatch.setattr(IntegerAttention, name, make(name))

    with torch.no_grad():
        patch(counting)
        fast = qm(x)  # the fast path leaves both MatMuls to timm's float ones
        assert taken == []
        qm.set_exact(True)
        on_codes = qm(x)
        patch(lambda name: lambda self, a, b: None)
        in_float = qm(x)
    tokens, heads, dim = 17, 2, 32  # test_vit at 32 px, patch 8: 16 patches + cls; 64-d, 2 heads
    assert taken == [("_qk", (8, heads, tokens, dim), (8, heads, dim, tokens), True),
                     ("_pv", (8, heads, tokens, tokens), (8, heads, tokens, dim), True)] * 6
    assert cos(on_codes, in_float) > 0.9999 and cos(on_codes, fast) > 0.9999
    monkeypatch.undo()
    taken.clear()
    copied = copy.deepcopy(qm)  # its hooks take its own modules' codes, not the original's
    patch(counting)
    with torch.no_grad():
        assert torch.equal(copied(x), on_codes) and [t[3] for t in taken] == [True] * 12

