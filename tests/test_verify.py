"""The build's self-check against the PyTorch reference, and an artifact meeting a CPU of another kind."""

import io
import json
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
from cpu_kinds import KINDS

from pomq_deploy.backends.ort_cpu import OrtCpuBackend
from pomq_deploy.build import BuildOptions, build
from pomq_deploy.cli.main import main
from pomq_deploy.errors import VerifyError
from pomq_deploy.plan import uniform_plan
from pomq_deploy.recipe import load_recipe
from pomq_deploy.verify import agreement, float_noise, noise_images, reference_pair, verify

BUILD = ["--limit", "8", "--runs", "2", "--batch", "2"]


def test_agreement_by_hand():
    ref = np.array([[2.0, 0.0], [0.0, 1.0]])
    out = np.array([[1.0, 0.0], [1.0, 0.0]])
    a = agreement(ref, out)
    # top-1: 1 of 2; whole cosine: (2*1) / (sqrt(5) * sqrt(2)); per image: 1 and 0
    assert (a.images, a.top1, a.cosine_min, a.judged) == (2, 0.5, 0.0, 2) and a.cosine == pytest.approx(2 / np.sqrt(10))
    assert not a.ok() and agreement(ref, 3 * ref).ok()


def test_top1_is_judged_where_the_margin_is_above_twice_the_float_noise():
    ref = np.array([[3.0, 0.0, 0.0], [1.0, 1.3, 0.0], [0.0, 0.5, 2.0], [0.2, 0.0, 0.1]])  # margins 3, 0.3, 1.5, 0.1
    out = np.array([[3.0, 0.1, 0.0], [1.3, 1.0, 0.0], [0.0, 2.1, 2.0], [0.0, 0.0, 0.3]])  # images 1, 2, 3 change class
    assert float_noise(ref, ref + [[0.0, 0.2, -0.1], [0.0] * 3, [0.0] * 3, [0.0] * 3]) == pytest.approx(0.2)
    assert agreement(ref, out).top1 == 0.25  # every image counted
    a = agreement(ref, out, noise=0.2)  # 2 x 0.2 = 0.4: images 0 and 2 judged, image 2 changed class
    assert (a.judged, a.top1, a.noise) == (2, 0.5, 0.2)
    assert agreement(ref, out, noise=0.8).judged == 1 and agreement(ref, out, noise=0.8).top1 == 1.0
    assert agreement(ref, out, noise=2.0).judged == 0 and agreement(ref, out, noise=2.0).top1 == 1.0  # cosine alone


def test_noise_images_cover_the_pixel_range_normalised():
    x = noise_images(4, (1, 28, 28), (0.5,), (0.25,), seed=3)
    assert x.shape == (4, 1, 28, 28) and x.min() >= -2.0 and x.max() <= 2.0 and x.min() < -1.99 and x.max() > 1.99
    assert np.array_equal(x.numpy(), noise_images(4, (1, 28, 28), (0.5,), (0.25,), seed=3).numpy())


class _Miscomputing(OrtCpuBackend):
    """ORT with a wrong result in the logits: what a broken kernel would give."""

    def run(self, artifact, images):
        out = super().run(artifact, images)
        return out + np.random.default_rng(0).standard_normal(out.shape).astype(np.float32) * 3 * out.std()


def test_build_fails_when_the_artifact_disagrees_and_writes_nothing(tiny_recipe, tmp_path):
    recipe = load_recipe(tiny_recipe)
    plan = uniform_plan("8/8/8", 12, recipe.name, "fqvit")
    with pytest.raises(VerifyError) as e:
        build(recipe, plan, BuildOptions(_Miscomputing(threads=1), "ort", tmp_path / "eng", batch=2, runs=2))
    msg = str(e.value)
    assert msg.startswith("self-check failed: ort-cpu vs the PyTorch reference on 20 calibration images top-1 agreement")
    assert "worst block " in msg and "/blocks/blocks." in msg and "\n" not in msg and e.value.exit_code == 1
    assert not [p for p in (tmp_path / "eng").rglob("*") if p.is_file()]


def _build_json(argv) -> dict:
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["build", *argv, "--json"]) == 0
    return json.loads(out.getvalue())


def test_build_records_the_check_or_that_it_was_skipped(tiny_recipe, tmp_path):
    m = _build_json(["--uniform", "8/8/8", "--recipe", str(tiny_recipe), "--out", str(tmp_path), *BUILD])
    check = m["verify"]
    assert check["passed"] and check["calibration"]["images"] == 20 and check["noise"]["images"] == 64
    assert check["noise"]["top1"] >= 0.95 and check["noise"]["cosine"] >= 0.995
    skipped = _build_json(["--uniform", "8/8/8", "--recipe", str(tiny_recipe), "--out", str(tmp_path), *BUILD, "--no-verify"])
    assert skipped["verify"] == {"skipped": "--no-verify"}


def test_artifact_from_a_vnni_cpu_is_refused_on_one_without(tiny_recipe, tmp_path, monkeypatch, capsys):
    """Built as on a Sapphire Rapids (u8 x s8 weights), then run on a Zen 3: eval, bench and profile refuse it
    in one line naming both CPUs; built as on the Zen 3 (u8 weights) it runs on either, with a note."""
    monkeypatch.setattr("pomq_deploy.backends.ort_cpu.detect", lambda: KINDS["sapphire_rapids"])
    m = _build_json(["--uniform", "8/8/8", "--recipe", str(tiny_recipe), "--out", str(tmp_path), *BUILD, "--no-verify"])
    assert m["backend"]["options"]["weight_format"] == "s8" and m["backend"]["options"]["cpu"]["exact_u8s8"]
    directory = tmp_path / "tiny" / m["plan_id"]
    capsys.readouterr()  # the build's progress lines
    monkeypatch.setattr("pomq_deploy.backends.ort_cpu.detect", lambda: KINDS["zen3"])
    for argv in (["eval", "--artifact", str(directory)], ["bench", "--artifact", str(directory)],
                 ["profile", "--artifact", str(directory), "--out", str(tmp_path / "prof")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Platinum 8480+" in err and "AMD EPYC 7763" in err and "saturate" in err, err
    # the other way round: u8 weights stay exact on a VNNI CPU; it runs, and says where it was built
    m = _build_json(["--uniform", "8/8/4", "--recipe", str(tiny_recipe), "--out", str(tmp_path), *BUILD, "--no-verify"])
    monkeypatch.setattr("pomq_deploy.backends.ort_cpu.detect", lambda: KINDS["sapphire_rapids"])
    assert main(["bench", "--artifact", str(tmp_path / "tiny" / m["plan_id"]), "--runs", "2", "--json"]) == 0
    assert "note:" in capsys.readouterr().err


def test_block_scopes_follow_the_exporters_node_names():
    """Swin restarts block numbers in each stage: a block is named by every numbered module above it."""
    from torch import nn

    from pomq_deploy.verify import _in_scope, block_scopes

    stage = lambda: nn.Module()  # noqa: E731
    model = nn.Module()
    model.layers = nn.ModuleList([stage(), stage()])
    for layer in model.layers:
        layer.blocks = nn.ModuleList([nn.Identity() for _ in range(11)])
    block = model.layers[1].blocks[1]
    assert block_scopes(model, [block]) == [("layers.1", "blocks.1")]
    assert _in_scope("/layers/layers.1/blocks/blocks.1/attn/MatMul", ("layers.1", "blocks.1"))
    assert not _in_scope("/layers/layers.0/blocks/blocks.1/attn/MatMul", ("layers.1", "blocks.1"))
    assert not _in_scope("/layers/layers.1/blocks/blocks.10/Add", ("layers.1", "blocks.1"))


def _near_tied_recipe(tmp_path) -> Path:
    """A random 1000-class model (as the ViT-B the issue met): its logits are near-tied on every image. Its blocks'
    weights are heavy-tailed (|w|^0.3, scaled back to timm's init size), so that many INT8 weight codes sit near
    the ends of their range, where a u8 x s8 pair saturates int16."""
    import timm
    import torch
    from conftest import tiny_recipe_file
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("deit_fmnist", num_classes=1000)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("blocks") and p.ndim == 2:
                p.copy_(p.sign() * p.abs() ** 0.3 * 0.02 ** 0.7)
    save_file(model.state_dict(), str(tmp_path / "tied.safetensors"))
    return tiny_recipe_file(tmp_path, tmp_path / "tied.safetensors", calib_images=64, num_classes=1000)


def test_near_tied_logits_pass_a_correct_artifact_and_fail_a_saturating_one(tmp_path):
    """On near-tied logits (most images' top-1 margin below twice the float noise) the self-check passes the
    ONNX Runtime artifact and the same graph run without ORT's integer rewrites (float GEMMs on dequantized
    values: another correct order of the sums), and still fails the artifact's arithmetic with saturating
    u8 x s8 pairs."""
    import onnxruntime as ort
    import torch

    from pomq_deploy.backends.saturation import saturating
    from pomq_deploy.data import calibration_batches
    from pomq_deploy.measure import measure
    from pomq_deploy.quant.calibration import calibrated_model
    from pomq_deploy.verify import margins

    recipe = load_recipe(str(_near_tied_recipe(tmp_path)))
    qm, _ = calibrated_model(recipe, "fqvit")
    plan = uniform_plan("8/8/8", 12, recipe.name, "fqvit")
    backend = OrtCpuBackend(threads=2)
    m = measure(backend, tmp_path / "built", model=qm, plan=plan, target="ort")
    calib = torch.cat(calibration_batches(recipe.data, qm))[:64]
    noise = noise_images(64, (1, 28, 28), (0.2860,), (0.3530,))
    reference, second = reference_pair(qm)
    with torch.inference_mode():
        ref = reference(calib).numpy()
        assert np.median(margins(ref)) < 2 * float_noise(ref, second(calib).numpy())  # near-tied
    correct = verify(lambda x: backend.run(m.artifact, x), reference, second, calib, noise)
    assert correct.passed, correct.failure()
    assert 0 < correct.calibration.judged < 32 and 0 < correct.noise.judged < 32
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    plain = ort.InferenceSession(str(m.onnx_path), options, providers=["CPUExecutionProvider"])
    floats = verify(lambda x: plain.run(None, {plain.get_inputs()[0].name: x})[0], reference, second, calib, noise)
    assert floats.passed, floats.failure()

    def saturating_artifact(x):
        with saturating(qm), torch.inference_mode():
            return qm(torch.from_numpy(x)).numpy()

    broken = verify(saturating_artifact, reference, second, calib, noise)
    assert not broken.passed and broken.noise.cosine < 0.99 and broken.calibration.cosine < 0.99, broken.failure()
