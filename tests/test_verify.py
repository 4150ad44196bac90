"""The build's self-check against the PyTorch reference, and an artifact meeting a CPU of another kind."""

import io
import json
from contextlib import redirect_stdout

import numpy as np
import pytest
from cpu_kinds import KINDS

from pomq_deploy.backends.ort_cpu import OrtCpuBackend
from pomq_deploy.build import BuildOptions, build
from pomq_deploy.cli.main import main
from pomq_deploy.errors import VerifyError
from pomq_deploy.plan import uniform_plan
from pomq_deploy.recipe import load_recipe
from pomq_deploy.verify import agreement, noise_images

BUILD = ["--limit", "8", "--runs", "2", "--batch", "2"]


def test_agreement_by_hand():
    ref = np.array([[2.0, 0.0], [0.0, 1.0]])
    out = np.array([[1.0, 0.0], [1.0, 0.0]])
    a = agreement(ref, out)
    # top-1: 1 of 2; whole cosine: (2*1) / (sqrt(5) * sqrt(2)); per image: 1 and 0
    assert (a.images, a.top1, a.cosine_min) == (2, 0.5, 0.0) and a.cosine == pytest.approx(2 / np.sqrt(10))
    assert not a.ok() and agreement(ref, 3 * ref).ok()


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
