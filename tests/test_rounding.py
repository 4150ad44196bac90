"""Fitted roundings (GPTQ): fitted per (block, setting) on FP32 block inputs, assembled per plan, exported as
the same integer codes, cached beside the calibration, named in the plan's identity."""

import dataclasses

import onnx
import pytest
import torch
from conftest import images, run_ort, tiny_vit
from onnx import numpy_helper

from pomq_deploy.export import export_quantized
from pomq_deploy.plan import BlockBits, Plan, dump_plan, uniform_plan
from pomq_deploy.quant.adapters import ModelError
from pomq_deploy.quant.fitting import fit_gptq, setting_key
from pomq_deploy.quant.functional import weight_codes
from pomq_deploy.quant.model import QuantModel


@pytest.fixture(scope="module", params=["fqvit", "repq"])
def fitted(request):
    """A tiny ViT (6 blocks) calibrated and GPTQ-fitted in the ``ort`` format (repq: the folded weights)."""
    qm = QuantModel(tiny_vit(), request.param, rounding="gptq")
    batches = images(30)  # GPTQ's Hessians need many more tokens than a Linear has inputs (here 510 per 64)
    qm.calibrate(batches)
    qm.weight_fits["asym"] = fit_gptq(qm, batches, "asym")
    return qm


def _plan(qm, settings) -> Plan:
    return Plan(recipe="t", scheme=qm.scheme, rounding="gptq",
                blocks=tuple(BlockBits(w=w, a=a, attn=t) for w, a, t in settings))


def test_every_block_setting_is_fitted_on_the_grid_nearest_rounding_uses(fitted):
    fits = fitted.weight_fits["asym"]
    assert len(fits) == fitted.num_blocks * 8  # w, a, attn each 4 or 8
    assert all(f["acts"] == {} for f in fits.values())  # GPTQ learns no activation quantizer
    names = [n for n, w in fitted.weighted.items() if w.block == 2]
    fitted.apply(_plan(fitted, [(4, 8, 8)] * fitted.num_blocks))  # folds repq's factors as the fit did
    for name in names:
        fit = fits[setting_key(2, 4, 8, 8)]["weights"][name]
        codes, scale = weight_codes(fitted.weighted[name].layer.weight.detach(), 4)
        assert torch.equal(fit["scale"], scale.float())  # the grid is the nearest rounding's: only codes move
        assert fit["codes"].min() >= -8 and fit["codes"].max() <= 7
        moved = (fit["codes"].float() != codes).float().mean()
        assert 0.02 < moved < 0.6, float(moved)


def test_gptq_brings_the_model_closer_to_fp32_than_nearest(fitted):
    """4-bit weights with 8-bit activations, on images the fit has not seen: GPTQ's objective, each Linear's
    output error on its calibration inputs, is most of the model's error where activations add little."""
    x = torch.cat(images(2, seed=5))
    fitted.apply(None)
    with torch.no_grad():
        ref = fitted(x)
        errors = {}
        for rounding in ("nearest", "gptq"):
            plan = _plan(fitted, [(4, 8, 8)] * fitted.num_blocks)
            fitted.rounding = rounding
            fitted.apply(dataclasses.replace(plan, rounding=rounding))
            errors[rounding] = float(((fitted(x) - ref) ** 2).mean())
    fitted.rounding = "gptq"
    assert errors["gptq"] < 0.95 * errors["nearest"], errors  # measured 0.87 (fqvit), 0.76 (repq)


def test_a_blocks_codes_do_not_depend_on_the_other_blocks_settings(fitted):
    n = fitted.num_blocks
    name = next(n_ for n_, w in fitted.weighted.items() if w.block == 0)
    codes = []
    for rest in ((8, 8, 8), (4, 4, 4)):
        fitted.apply(_plan(fitted, [(4, 8, 4)] + [rest] * (n - 1)))
        codes.append(fitted.weighted[name].weight_codes(4)[0].clone())
    assert torch.equal(codes[0], codes[1])


def test_the_export_stores_the_fitted_codes_and_runs_as_the_reference(tmp_path, fitted):
    plan = _plan(fitted, [(4, 4, 4) if i in (0, 3) else (8, 8, 8) for i in range(fitted.num_blocks)])
    info = export_quantized(fitted, plan, "ort", tmp_path / "m.onnx")
    model = onnx.load(str(info.path))
    stored = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    name = next(n for n, w in fitted.weighted.items() if w.block == 0 and n.endswith("fc1"))
    fit = fitted.weight_fits["asym"][setting_key(0, 4, 4, 4)]["weights"][name]["codes"]
    codes = stored[f"model.{name}.layer.weight_int4_t"]  # (in, out) after the transpose fold
    assert (codes.astype("int8") == fit.numpy().T).all()
    fitted.apply(plan)
    x = torch.cat(images(2, seed=11))
    with torch.no_grad():
        ref = fitted(x)
    out = torch.from_numpy(run_ort(tmp_path, info.path, x))
    cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0)
    assert cos > 0.999 and (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.9


def test_the_rounding_is_part_of_the_plans_identity():
    nearest = uniform_plan("4/8/8", 12, "deit_fmnist", "repq")
    gptq = uniform_plan("4/8/8", 12, "deit_fmnist", "repq", "gptq")
    assert nearest.plan_id != gptq.plan_id
    assert nearest.plan_id == Plan(recipe="deit_fmnist", scheme="repq", blocks=nearest.blocks).plan_id
    assert "rounding: gptq\n" in dump_plan(gptq)


def test_fp8_and_float_blocks_take_no_fit_and_a_weight_only_one_is_refused(fitted):
    """A fitted rounding rounds integer weights onto their grids: an FP8 or float block has none (its weights are
    cast or kept), so it is the same as with nearest; an integer weight beside a float activation has no fit."""
    n = fitted.num_blocks
    plan = _plan(fitted, [(8, 8, 8)] * (n - 2) + [("fp8", "fp8", "fp8"), ("float", "float", "float")])
    h = torch.randn(2, 17, 64, generator=torch.Generator().manual_seed(0))  # tokens entering the last two blocks
    outs = {}
    for rounding in ("gptq", "nearest"):
        fitted.rounding = rounding
        fitted.apply(dataclasses.replace(plan, rounding=rounding))
        with torch.no_grad():
            outs[rounding] = fitted.model.blocks[n - 1](fitted.model.blocks[n - 2](h))
    fitted.rounding = "gptq"
    assert torch.equal(outs["gptq"], outs["nearest"])
    fp8, flt = fitted.weighted[f"blocks.{n - 2}.mlp.fc1"], fitted.weighted[f"blocks.{n - 1}.mlp.fc1"]
    assert (fp8.weight_bits, fp8.fitted, flt.weight_bits) == ("fp8", None, None)
    with pytest.raises(ModelError, match=r"block 0 \(4/float/float\): rounding gptq fits integer weights"):
        fitted.apply(_plan(fitted, [(4, "float", "float")] + [(8, 8, 8)] * (n - 1)))


def test_a_plan_for_another_rounding_is_refused(fitted):
    with pytest.raises(ValueError, match="a plan with rounding 'nearest' on a model prepared for 'gptq'"):
        fitted.apply(uniform_plan("8/8/8", fitted.num_blocks, "t", fitted.scheme))


def test_calibrate_fits_both_formats_once_and_eval_assembles_plans_from_the_cache(tiny_recipe, capsys, monkeypatch):
    import json

    from pomq_deploy.cli.main import main
    from pomq_deploy.quant import fitting

    argv = ["--recipe", str(tiny_recipe), "--scheme", "fqvit", "--rounding", "gptq", "--json"]
    assert main(["calibrate", *argv]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["rounding"] == "gptq" and first["fit_seconds"] > 0

    def refit(*_):
        raise AssertionError("fitted again instead of read from the cache")

    monkeypatch.setitem(fitting.FITTERS, "gptq", refit)
    for uniform in ("4/8/8", "4/4/4"):
        assert main(["eval", *argv, "--uniform", uniform, "--limit", "8"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["rounding"] == "gptq" and out["images"] == 8
