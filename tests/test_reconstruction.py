"""Block reconstruction (AdaRound at block granularity): its pieces by hand, then fitted blocks on a tiny ViT."""

import math

import pytest
import torch
from conftest import images, tiny_vit

from pomq_deploy.plan import BlockBits, Plan
from pomq_deploy.quant.fitting import setting_key
from pomq_deploy.quant.functional import weight_codes
from pomq_deploy.quant.model import QuantModel
from pomq_deploy.quant.quantizers import UniformQ, from_state
from pomq_deploy.quant.reconstruction import Fp32Blocks, LearnedStep, SoftWeight, fit_adaround, initial_v, reconstruct_block, rectified_sigmoid, rounding_loss


def test_the_soft_weight_starts_at_the_float_weight():
    """h(V) = clamp(sigmoid(V) * 1.2 - 0.1, 0, 1) is inverted by initial_v on (0, 1): 0.25 -> sigmoid(V) = 0.2917."""
    rest = torch.tensor([0.25, 0.5, 0.9])
    v = initial_v(rest)
    assert math.isclose(torch.sigmoid(v[0]).item(), 0.35 / 1.2, rel_tol=1e-6)
    assert torch.allclose(rectified_sigmoid(v), rest)
    w = torch.tensor([[0.30, -0.71, 0.05], [1.0, 0.2, -0.4]])
    soft = SoftWeight(w, 4)  # scales 0.71/7 and 1.0/7
    assert torch.allclose(soft(), w, atol=1e-6)
    assert soft.codes().tolist() == [[3.0, -7.0, 0.0], [7.0, 1.0, -3.0]]  # h >= 0.5 rounds up: nearest at the start


def test_the_learned_step_size_by_hand():
    """LSQ's gradient: d y / d s = round(x/s) - x/s inside the range (x 0.26, s 0.1: 3 - 2.6 = 0.4) and the clipped
    code outside it (x 2.0: 15); learned on log s, so times s: 0.04 and 1.5."""
    step = LearnedStep(UniformQ(0.1, 0, 0, 15))
    y = step(torch.tensor([0.26, 2.0]))
    assert torch.allclose(y, torch.tensor([0.3, 1.5]))
    y[0].backward()
    assert math.isclose(step.log_scale.grad.item(), 0.04, rel_tol=1e-5)
    step.log_scale.grad = None
    step(torch.tensor([2.0]))[0].backward()
    assert math.isclose(step.log_scale.grad.item(), 1.5, rel_tol=1e-5)
    with torch.no_grad():
        step.log_scale.fill_(math.log(0.2))
    frozen = step.frozen()
    assert type(frozen) is UniformQ and math.isclose(frozen.scale, 0.2, rel_tol=1e-6) and (frozen.zero_point, frozen.qmax) == (0, 15)
    shifted = LearnedStep(UniformQ(0.1, 0, 0, 15, shift=torch.tensor([0, 2], dtype=torch.int8)))  # PTF: channel 1 at 4 s
    assert torch.allclose(shifted(torch.tensor([[0.26, 0.26]])), torch.tensor([[0.3, 0.4]]))


def test_the_rounding_regulariser_by_hand():
    """1 - |2h - 1|^beta: 0 at h in {0, 1}; at h = 0.5, 1; at h = 0.75 with beta 2, 1 - 0.25."""
    h = torch.tensor([0.0, 1.0, 0.5, 0.75])
    assert rounding_loss(h, 2.0).item() == 0 + 0 + 1 + 0.75
    # its gradient -2 beta |2h - 1|^(beta - 1) sign(2h - 1): at h = 0.75, beta 2: -2; at 0.5: 0; beta 3 at 0.25: +1.5
    h = torch.tensor([0.75, 0.5, 0.25], requires_grad=True)
    rounding_loss(h[:2], 2.0).backward()
    assert h.grad.tolist() == [-2.0, 0.0, 0.0]
    h.grad = None
    rounding_loss(h[2:], 3.0).backward()
    assert h.grad.tolist() == [0.0, 0.0, 1.5]


def test_every_block_setting_is_fitted():
    qm = QuantModel(tiny_vit(), "repq", rounding="adaround")
    batches = images(2)
    qm.calibrate(batches)
    fits = fit_adaround(qm, batches, "asym", iterations=2, batch=4)
    assert sorted(fits) == sorted(setting_key(b, w, a, t) for b in range(qm.num_blocks) for w in (4, 8) for a in (4, 8) for t in (4, 8))
    assert all(f["codes"].dtype == torch.int8 for fit in fits.values() for f in fit["weights"].values())
    assert all(fit["acts"] == {} for fit in fits.values())  # act_lr 0: the calibrated activation quantizers kept


def test_only_4_bit_weights_and_steps_are_learned():
    """8-bit weights keep their nearest codes; 8/4/4 learns only its 4-bit activation steps, in a quarter of the
    iterations (2 minibatches of 8), and 8/8/8, with nothing at 4 bits, is not fitted at all (no minibatch drawn)."""
    qm = QuantModel(tiny_vit(), "fqvit", rounding="adaround")
    batches = images(2)
    qm.calibrate(batches)
    io = Fp32Blocks(qm, batches)
    inputs, outputs = map(list, zip(*[(io.inputs(i), io.outputs(i)) for i in range(qm.num_blocks)], strict=True))
    nearest = {n: weight_codes(m.layer.weight.detach(), 8)[0] for n, m in qm.weighted.items() if m.block == 0}
    g = torch.Generator().manual_seed(0)
    for a, learned in ((8, False), (4, True)):
        before = g.get_state()
        fit = reconstruct_block(qm, 0, "asym", a, a, 8, inputs[0], outputs[0], 8, 4, 1e-2, 1e-2, 0.01, 0.0, g)
        assert fit["weights"].keys() == nearest.keys()
        assert all(torch.equal(fit["weights"][n]["codes"].float(), c) for n, c in nearest.items())
        drawn = torch.Generator().set_state(before)
        for _ in range(2 if learned else 0):
            torch.randint(0, len(inputs[0][0]), (4,), generator=drawn)
        assert bool(fit["acts"]) == learned and torch.equal(g.get_state(), drawn.get_state())


def test_fitted_blocks_stay_on_the_grid_and_follow_their_fp32_outputs_closer_than_nearest():
    """4-bit weights, 8-bit activations, each block fitted (150 iterations): the blocks' summed output error against
    FP32 on the fitting images drops (measured to 0.58 of nearest's)."""
    qm = QuantModel(tiny_vit(), "fqvit", rounding="adaround")
    batches = images(8)
    qm.calibrate(batches)
    io = Fp32Blocks(qm, batches)
    inputs, outputs = map(list, zip(*[(io.inputs(i), io.outputs(i)) for i in range(qm.num_blocks)], strict=True))
    g = torch.Generator().manual_seed(0)
    fits = {setting_key(i, 4, 8, 8): reconstruct_block(qm, i, "asym", 8, 8, 4, inputs[i], outputs[i], 150, 16, 1e-2, 0.0, 0.01, 0.0, g)
            for i in range(qm.num_blocks)}
    errors = {}
    for rounding in ("nearest", "adaround"):
        qm.rounding = rounding
        qm.weight_fits = {"asym": fits}
        plan = Plan(recipe="t", scheme="fqvit", rounding=rounding, blocks=(BlockBits(w=4, a=8, attn=8),) * qm.num_blocks)
        qm.apply(plan)
        with torch.no_grad():
            errors[rounding] = [float(((b(inputs[i][0]) - outputs[i]) ** 2).mean()) for i, b in enumerate(qm.blocks)]
    assert sum(errors["adaround"]) < 0.8 * sum(errors["nearest"]), errors
    name = next(n for n, w in qm.weighted.items() if w.block == 1)
    weight = qm.weighted[name].layer.weight.detach()
    fit = fits[setting_key(1, 4, 8, 8)]["weights"][name]
    # floor or ceil of w / s, nothing else (clamped to the 4-bit range where the grid clips the row's largest weights)
    assert (fit["codes"].float() - (weight / fit["scale"][:, None]).clamp(-8, 7)).abs().max() < 1


def test_learned_activation_steps_are_applied_with_the_fitted_block_and_exported(tmp_path):
    """act_lr > 0: each uniform activation quantizer of a fitted block gets its learned step (zero point and range
    as calibrated); a plan applies them, and ONNX Runtime runs the export as the reference does."""
    from conftest import run_ort

    from pomq_deploy.export import export_quantized

    qm = QuantModel(tiny_vit(), "repq", rounding="adaround")
    batches = images(4)
    qm.calibrate(batches)
    io = Fp32Blocks(qm, batches)
    inputs, outputs = map(list, zip(*[(io.inputs(i), io.outputs(i)) for i in range(qm.num_blocks)], strict=True))
    g = torch.Generator().manual_seed(0)
    fits = {setting_key(i, 4, 4, 4): reconstruct_block(qm, i, "asym", 4, 4, 4, inputs[i], outputs[i], 30, 16, 1e-2, 1e-2,
                                                       0.01, 0.0, g) for i in range(qm.num_blocks)}
    learned = fits[setting_key(0, 4, 4, 4)]["acts"]
    roles = {qm.act_quants[n].role for n in learned}
    assert roles == {"qkv", "attn_out", "gelu", "ln_in", "ln_out"}  # every uniform one; log-sqrt(2) attention is not uniform
    qm.weight_fits = {"asym": fits}
    plan = Plan(recipe="t", scheme="repq", rounding="adaround", blocks=(BlockBits(w=4, a=4, attn=4),) * qm.num_blocks)
    qm.apply(plan)
    moved = 0
    for name, state in learned.items():
        calibrated = qm.act_quants[name].fitted["asym4"]
        active = qm.act_quants[name].active
        assert active.scale == from_state(state).scale and active.zero_point == state["zero_point"]
        moved += not math.isclose(active.scale, getattr(calibrated, "deployed", calibrated).scale, rel_tol=1e-4)
    assert moved >= len(learned) // 2, moved
    info = export_quantized(qm, plan, "ort", tmp_path / "m.onnx")
    x = torch.cat(images(2, seed=11))
    with torch.no_grad():
        ref = qm(x)
    out = torch.from_numpy(run_ort(tmp_path, info.path, x))
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.999


def _tiny_swin():
    import timm

    torch.manual_seed(0)
    return timm.create_model("swin_tiny_patch4_window7_224", img_size=64, window_size=4, embed_dim=32, depths=(2, 2),
                             num_heads=(2, 4), num_classes=10).eval()


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_each_block_is_fitted_on_its_inputs_under_its_own_uniform_setting(family):
    """A block setting's fitting inputs are the block's inputs in the model a uniform plan at that setting quantizes
    with the fits so far (the layers outside the blocks at 8 bits): carried from the block before it where its input
    is that block's output (ViT), replayed through the model where it is not (Swin's second stage, after its patch
    merging); and fitting leaves the model's own parameters as they were."""
    from pomq_deploy.quant.reconstruction import _inputs_in_context, _run_block

    model, batches = (tiny_vit(), images(2)) if family == "vit" else \
        (_tiny_swin(), [torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(2)])
    qm = QuantModel(model, "repq", rounding="adaround")
    qm.calibrate(batches)
    before = {k: v.clone() for k, v in qm.state_dict().items()}
    setting = (4, 4, 8)
    fits = fit_adaround(qm, batches, "asym", iterations=3, batch=4, act_lr=1e-2,
                        pairs=[(i, setting) for i in range(qm.num_blocks)])
    assert sorted(fits) == [setting_key(i, *setting) for i in range(qm.num_blocks)]
    assert all(torch.equal(v, before[k]) for k, v in qm.state_dict().items())
    qm.weight_fits = {"asym": fits}
    qm.apply(Plan(recipe="t", scheme="repq", rounding="adaround", blocks=(BlockBits(w=4, a=4, attn=8),) * qm.num_blocks))
    seen = {i: [] for i in range(qm.num_blocks)}
    handles = [b.register_forward_pre_hook(lambda m, args, i=i: seen[i].append(args[0])) for i, b in enumerate(qm.blocks)]
    with torch.no_grad():
        for b in batches:
            qm.model(b)
    for h in handles:
        h.remove()
    io = Fp32Blocks(qm, batches)
    fp32_inputs = [io.inputs(i) for i in range(qm.num_blocks)]
    for i in range(1, qm.num_blocks):
        planned = torch.cat(seen[i])
        replayed, _ = _inputs_in_context(qm, i, "asym", [setting] * i, fits, batches)
        assert torch.allclose(replayed, planned, atol=1e-5)
        assert (planned - fp32_inputs[i][0]).abs().max() > 1e-2  # the context is not the FP32 model's
        if io.chained[i]:
            carried = _run_block(qm, i - 1, "asym", setting, fits[setting_key(i - 1, *setting)],
                                 *_inputs_in_context(qm, i - 1, "asym", [setting] * (i - 1), fits, batches))
            assert torch.allclose(carried, planned, atol=1e-5)
        else:
            assert family == "swin" and i == 2  # the stage boundary
    assert family == "vit" or not io.chained[2]


def test_each_context_fits_a_block_on_the_inputs_it_names():
    qm = QuantModel(tiny_vit(), "repq", rounding="adaround")
    batches = images(2)
    qm.calibrate(batches)
    fits = fit_adaround(qm, batches, "asym", iterations=3, batch=4, lr=1e-2, seed=5, context="fp32",
                        pairs=[(1, (4, 8, 4))])
    io = Fp32Blocks(qm, batches)
    inputs, outputs = map(list, zip(*[(io.inputs(i), io.outputs(i)) for i in range(qm.num_blocks)], strict=True))
    for p in qm.parameters():
        p.requires_grad_(False)
    direct = reconstruct_block(qm, 1, "asym", 8, 4, 4, inputs[1], outputs[1], 3, 4, 1e-2, 0.0, 0.01, 0.0,
                               torch.Generator().manual_seed(5))
    fitted = fits[setting_key(1, 4, 8, 4)]["weights"]
    assert all(torch.equal(fitted[n]["codes"], d["codes"]) for n, d in direct["weights"].items())
    # the uniform context: block 1 is fitted on its inputs behind block 0's fit at the same setting
    from pomq_deploy.quant.reconstruction import _inputs_in_context

    setting = (4, 8, 4)
    fits = fit_adaround(qm, batches, "asym", iterations=3, batch=4, lr=1e-2, seed=5, pairs=[(0, setting), (1, setting)])
    g = torch.Generator().manual_seed(5)
    by_hand = {setting_key(0, *setting): reconstruct_block(qm, 0, "asym", 8, 4, 4, _inputs_in_context(qm, 0, "asym", [], {}, batches),
                                                           outputs[0], 3, 4, 1e-2, 0.0, 0.01, 0.0, g)}
    block1 = reconstruct_block(qm, 1, "asym", 8, 4, 4, _inputs_in_context(qm, 1, "asym", [setting], by_hand, batches), outputs[1],
                               3, 4, 1e-2, 0.0, 0.01, 0.0, g)
    fitted = fits[setting_key(1, *setting)]["weights"]
    assert all(torch.equal(fitted[n]["codes"], d["codes"]) for n, d in block1["weights"].items())
    assert not all(torch.equal(fitted[n]["codes"], d["codes"]) for n, d in direct["weights"].items())
    with pytest.raises(ValueError, match="fit context 'previous'; allowed: uniform, fp32"):
        fit_adaround(qm, batches, "asym", iterations=1, context="previous")


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_fp32_blocks_are_the_full_forwards_inputs_and_outputs_one_block_at_a_time(family):
    """Bit for bit what hooks on the FP32 model's forward collect, in any order of blocks asked for (Swin: not
    chained across its stage boundary), holding one block's tensors at a time."""
    model, batches = (tiny_vit(), images(3)) if family == "vit" else \
        (_tiny_swin(), [torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(2)])
    qm = QuantModel(model, "fqvit")
    qm.calibrate(batches)
    qm.apply(Plan(recipe="t", scheme="fqvit", rounding="nearest", blocks=(BlockBits(w=4, a=4, attn=4),) * qm.num_blocks))
    io = Fp32Blocks(qm, batches)  # back to FP32 itself
    ins = {i: [] for i in range(qm.num_blocks)}
    outs = {i: [] for i in range(qm.num_blocks)}
    handles = [h for i, b in enumerate(qm.blocks) for h in (b.register_forward_pre_hook(lambda m, args, i=i: ins[i].append(args[0])),
                                                             b.register_forward_hook(lambda m, args, out, i=i: outs[i].append(out)))]
    with torch.no_grad():
        for b in batches:
            qm.model(b)
    for h in handles:
        h.remove()
    n = qm.num_blocks
    assert io.chained == [False] + [True] * (n - 1) if family == "vit" else io.chained == [False, True, False, True]
    for i in [*range(n), 1, 0, n - 1]:
        x, kwargs = io.inputs(i)
        assert torch.equal(x, torch.cat(ins[i])) and torch.equal(io.outputs(i), torch.cat(outs[i])), i
        assert io.block == i and not any(torch.is_tensor(v) for v in kwargs.values())
