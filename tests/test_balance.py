"""Balanced qkv (scheme repq_smooth): q against k and v against proj, by hand, exact in float, and what it buys on
a twin with q/k and v outliers."""

import pytest
import torch
from conftest import images, run_ort, tiny_vit

from pomq_deploy.export import export_quantized
from pomq_deploy.models.twins import outlier_twin
from pomq_deploy.plan import uniform_plan
from pomq_deploy.quant.adapters import ModelError
from pomq_deploy.quant.balance import BalancedQ, ChannelRangeQ
from pomq_deploy.quant.model import QuantModel


def test_factors_by_hand():
    """q amax (4, 1), k (1, 4): t = sqrt(q / k) = (2, 1/2); v amax (9, 1), proj's columns (1, 4): u = sqrt(v) / sqrt(w)
    = (3, 1/2). Folded, q and k channels reach sqrt(q k) = 2 each, v channels sqrt(v w) = (3, 2): one range, -3..3."""
    lo = torch.tensor([-4.0, -1, -1, -4, -9, -1])
    q = BalancedQ(lo, -lo, 8, True)
    proj = torch.tensor([[1.0, -4.0], [0.5, 2.0]])
    assert torch.allclose(q.factors(proj), torch.tensor([2.0, 0.5, 0.5, 2.0, 3.0, 0.5]))
    weight, bias = torch.ones(6, 3), torch.arange(6.0)
    proj_in = ChannelRangeQ(torch.tensor([-6.0, -1]), torch.tensor([3.0, 1]), 8, True)  # attention output: v's channels
    qkv_q, proj_q = q.fold(weight, bias, proj, proj_in)
    assert torch.allclose(weight[:, 0], torch.tensor([0.5, 2, 2, 0.5, 1 / 3, 2]))
    assert torch.allclose(bias, torch.tensor([0.0, 2, 4, 1.5, 4 / 3, 10]))
    assert torch.allclose(proj, torch.tensor([[3.0, -2.0], [1.5, 1.0]]))
    assert qkv_q.zero_point == 0 and abs(qkv_q.scale - 3 / 127) < 1e-7
    assert abs(proj_q.scale - 2 / 127) < 1e-7  # -6 / 3 and 1 / 0.5: 2 either way
    with pytest.raises(RuntimeError, match="only folded"):
        q(torch.zeros(6))


def _twin(kinds=("qk", "v")):
    twin = tiny_vit()
    twin.load_state_dict(outlier_twin(tiny_vit().state_dict(), kinds, channels=4, factor=30.0, seed=0))
    return twin


def test_the_fold_is_exact_in_float_and_undone_by_another_plan():
    qm = QuantModel(_twin(), "repq_smooth")
    qm.calibrate(images(2))
    x = images(1, seed=4)[0]
    with torch.no_grad():
        ref = qm(x)
        originals = [p.clone() for p in qm.parameters()]
        qm.apply(uniform_plan("8/8/8", qm.num_blocks, "t", "repq_smooth"))
        for w in qm.weighted.values():  # float weights, float activations: only the folds act
            w.weight_bits = None
        for aq in qm.act_quants.values():
            aq.state = "fp"
        folded = qm(x)
        qm.apply(None)
    assert torch.allclose(folded, ref, rtol=1e-4, atol=1e-4)
    assert all(torch.equal(p, o) for p, o in zip(qm.parameters(), originals, strict=True))


def test_balancing_undoes_q_k_and_v_outliers_and_runs_in_onnx_runtime(tmp_path):
    """A twin moves q/k and v channels by 30x against each other (q by f, k by 1/f; v by f, proj's column by 1/f);
    the balancing factors move by exactly that (t and u by f), so the balanced twin is the balanced original:
    repq_smooth quantizes both the same at 8/8/8, while repq's one qkv grid spans the outliers (step 30x and
    more). ONNX Runtime runs the export as the reference does."""
    batches, x = images(4), torch.cat(images(2, seed=9))
    out, step = {}, {}
    for scheme in ("repq", "repq_smooth"):
        for name, model in (("original", tiny_vit()), ("twin", _twin())):
            qm = QuantModel(model, scheme)
            qm.calibrate(batches)
            qm.apply(uniform_plan("8/8/8", qm.num_blocks, "t", scheme))
            qm.set_exact(True)  # integer GEMMs: the two grids' codes agree, so do the outputs, past float summation order
            with torch.no_grad():
                out[scheme, name] = qm(x)
            step[scheme, name] = qm.blocks[2].attn.qkv.out_quant.active.scale
    assert abs(step["repq_smooth", "twin"] / step["repq_smooth", "original"] - 1) < 1e-4
    assert step["repq", "twin"] > 20 * step["repq", "original"]
    cos = {s: float(torch.nn.functional.cosine_similarity(out[s, "twin"].flatten(), out[s, "original"].flatten(), dim=0))
           for s in ("repq", "repq_smooth")}
    assert cos["repq_smooth"] > 0.9999 and cos["repq_smooth"] > cos["repq"], cos
    plan = uniform_plan("8/8/8", qm.num_blocks, "t", "repq_smooth")
    info = export_quantized(qm, plan, "ort", tmp_path / "m.onnx")
    qm.apply(plan)
    with torch.no_grad():
        ref = qm(x)
    got = torch.from_numpy(run_ort(tmp_path, info.path, x))
    assert torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0) > 0.999


def test_a_model_without_a_fused_qkv_bias_is_refused_in_one_line():
    model = tiny_vit(qkv_bias=False)
    qm = QuantModel(model, "repq_smooth")
    qm.calibrate(images(1))
    with pytest.raises(ModelError, match="without a bias"):  # one line, naming what the fold needs
        qm.apply(uniform_plan("8/8/8", qm.num_blocks, "t", "repq_smooth"))


def test_an_attention_it_cannot_fold_is_refused_in_one_line():
    """A block with no attention fold site (as an unfused or rotary attention has; on EVA-02 and BEiT the missing
    q/k biases are refused first) would leave the balanced quantizers unfolded: the plan is refused when applied."""
    qm = QuantModel(tiny_vit(), "repq_smooth")
    qm.calibrate(images(1))
    qm.block_folds[1].sites = [s for s in qm.block_folds[1].sites if s.quant.role != "qkv"]  # as a rotary block has
    with pytest.raises(ModelError, match="block 1's .* runs only folded"):
        qm.apply(uniform_plan("8/8/8", qm.num_blocks, "t", "repq_smooth"))


def test_the_tensorrt_export_passes_its_rules_with_the_attention_on_codes(tmp_path):
    """The balanced quantizers deploy per tensor, symmetric in the tensorrt format: the rule check is clean and both
    attention MatMuls and the four GEMMs of every block read codes, as under repq."""
    import onnx

    from pomq_deploy.export.graph import matmuls_on_codes
    from pomq_deploy.export.trt_rules import check_tensorrt

    qm = QuantModel(_twin(), "repq_smooth")
    qm.calibrate(images(2))
    trt = export_quantized(qm, uniform_plan("8/8/8", qm.num_blocks, "t", "repq_smooth"), "tensorrt", tmp_path / "t.onnx").path
    assert [f for f in check_tensorrt(trt) if f.severity == "error"] == []
    on_codes, matmuls = matmuls_on_codes(onnx.load(trt))
    assert on_codes == matmuls == 6 * qm.num_blocks  # qkv, proj, fc1, fc2 and the two attention MatMuls
