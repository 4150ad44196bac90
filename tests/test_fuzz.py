"""Fuzzing what a user hands the tool: recipe and plan YAML, checkpoint files, ONNX files for ``check``, image files.

The property, whatever the input: the tool either accepts it or answers with one line and exit code 1 or 2 (a
``PomqError`` in-process), never a traceback, and writes nothing outside the folder it was given. Hypothesis
generates the inputs, seeded (derandomized) and bounded (100 per property: about 15 s), so the suite stays well under
a minute; ``tools/fuzz.py`` runs the same properties with many more examples and random seeds
(``POMQ_FUZZ_PROFILE=long``).
"""

import functools
import io
import os
import string

import numpy as np
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pomq_deploy.errors import PomqError

settings.register_profile("ci", max_examples=100, derandomize=True, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("long", max_examples=int(os.environ.get("POMQ_FUZZ_EXAMPLES", "2000")), derandomize=False, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.load_profile(os.environ.get("POMQ_FUZZ_PROFILE", "ci"))

# scalars a YAML file can hold, with the awkward ones over-represented: path-like and unicode strings, huge and
# negative numbers, NaN and infinities, empty and null values
PATHLIKE = st.sampled_from(["../../etc/passwd", "/", "a/b", "..", ".", "~", "C:\\x", "\x00", "con", "name with space",
                            "ünïcødé", "🙂", "x" * 300, "", "recipes/deit_fmnist.yaml"])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20), PATHLIKE)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(string.ascii_lowercase + "_", max_size=10), inner, max_size=4)),
                      max_leaves=12)
RECIPE = {"name": "fuzz", "model": {"arch": "deit_fmnist"}, "data": {"kind": "fashion_mnist"}}
PLAN = {"recipe": "deit_fmnist", "scheme": "fqvit", "blocks": [{"w": 8, "a": 8, "attn": 8}] * 12}


def _mutated(base: dict, paths: list[tuple], data) -> dict:
    """``base`` with the value at one of ``paths`` (or a new top-level key) replaced by a generated one."""
    doc = yaml.safe_load(yaml.safe_dump(base))  # a deep copy
    where = data.draw(st.sampled_from([*paths, ("__new__",)]))
    value = data.draw(VALUES)
    node = doc
    for key in where[:-1]:
        node = node[key]
    node[data.draw(st.text(max_size=8)) if where[-1] == "__new__" else where[-1]] = value
    return doc


def _only_one_line_or_accepted(call) -> None:
    try:
        call()
    except PomqError as e:
        assert "\n" not in str(e) and str(e).strip(), repr(str(e))
        assert e.exit_code in (1, 2)


@given(data=st.data())
def test_recipe_yaml(tmp_path_factory, data):
    from pomq_deploy.recipe import load_recipe

    folder = tmp_path_factory.mktemp("recipe")
    paths = [("name",), ("model",), ("model", "arch"), ("data",), ("data", "kind"), ("data", "root"), ("eval",),
             ("search",)]
    (folder / "r.yaml").write_text(yaml.safe_dump(_mutated(RECIPE, paths, data), allow_unicode=True), encoding="utf-8")
    _only_one_line_or_accepted(lambda: load_recipe(str(folder / "r.yaml")))
    assert sorted(p.name for p in folder.iterdir()) == ["r.yaml"]


@given(text=st.text(max_size=200))
def test_any_text_as_a_recipe_or_a_plan(tmp_path_factory, text):
    from pomq_deploy.plan import load_plan
    from pomq_deploy.recipe import load_recipe

    folder = tmp_path_factory.mktemp("text")
    path = folder / "x.yaml"
    path.write_text(text, encoding="utf-8")
    _only_one_line_or_accepted(lambda: load_recipe(str(path)))
    _only_one_line_or_accepted(lambda: load_plan(path))


@given(data=st.data())
def test_plan_yaml(tmp_path_factory, data):
    from pomq_deploy.plan import load_plan

    folder = tmp_path_factory.mktemp("plan")
    paths = [("recipe",), ("scheme",), ("blocks",), ("blocks", 0), ("blocks", 3, "w"), ("blocks", 11, "attn")]
    (folder / "p.yaml").write_text(yaml.safe_dump(_mutated(PLAN, paths, data), allow_unicode=True), encoding="utf-8")
    _only_one_line_or_accepted(lambda: load_plan(folder / "p.yaml").check_blocks(12))


@functools.cache
def _checkpoint_bytes() -> bytes:
    """A real checkpoint's bytes (a module-level cache: hypothesis would print a fixture's 1.5 MB in a failure)."""
    import timm
    import torch
    from safetensors.torch import save

    torch.manual_seed(0)
    return save(timm.create_model("test_vit").state_dict())


@functools.cache
def _onnx_bytes() -> bytes:
    from cpu_kinds import extreme_gemm

    return extreme_gemm("tensorrt")[0].SerializeToString()


@given(data=st.data())
def test_checkpoint_files(tmp_path_factory, data):
    """Truncated, bit-flipped or foreign checkpoint files: read or refused in one line."""
    from pomq_deploy.models.loading import read_state_dict

    checkpoint_bytes = _checkpoint_bytes()
    folder = tmp_path_factory.mktemp("ckpt")
    kind = data.draw(st.sampled_from(["truncated", "flipped", "random", "pickle"]))
    if kind == "truncated":
        blob = checkpoint_bytes[: data.draw(st.integers(0, len(checkpoint_bytes) - 1))]
    elif kind == "flipped":
        blob = bytearray(checkpoint_bytes)
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, min(len(blob) - 1, 4096)))  # the header, where a flip changes meaning
            blob[i] ^= 1 << data.draw(st.integers(0, 7))
        blob = bytes(blob)
    else:
        blob = data.draw(st.binary(max_size=512))
    suffix = ".pth" if kind == "pickle" else data.draw(st.sampled_from([".safetensors", ".pth", ".bin"]))
    path = folder / f"m{suffix}"
    path.write_bytes(blob)
    _only_one_line_or_accepted(lambda: read_state_dict(path))


@given(data=st.data())
def test_onnx_files_for_check(tmp_path_factory, data, capsys):
    """``pomq-deploy check`` on truncated, bit-flipped or random ONNX files: a report, or one line and 1 or 2."""
    from pomq_deploy.cli.main import main

    onnx_bytes = _onnx_bytes()
    folder = tmp_path_factory.mktemp("onnx")
    kind = data.draw(st.sampled_from(["truncated", "flipped", "random"]))
    if kind == "truncated":
        blob = onnx_bytes[: data.draw(st.integers(0, len(onnx_bytes) - 1))]
    elif kind == "flipped":
        blob = bytearray(onnx_bytes)
        i = data.draw(st.integers(0, len(blob) - 1))
        blob[i] ^= 1 << data.draw(st.integers(0, 7))
        blob = bytes(blob)
    else:
        blob = data.draw(st.binary(max_size=256))
    (folder / "m.onnx").write_bytes(blob)
    capsys.readouterr()
    rc = main(["check", str(folder / "m.onnx"), "--target", "tensorrt"])
    err = capsys.readouterr().err
    assert rc in (0, 1, 2) and "Traceback" not in err
    if rc == 2:
        assert len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in folder.iterdir()) == ["m.onnx"]


@given(blob=st.one_of(st.binary(max_size=300), st.sampled_from(["png", "jpeg"])))
def test_image_files(tmp_path_factory, blob):
    """An image folder's files, valid, truncated or random: read, or refused in one line naming the file."""
    from PIL import Image

    from pomq_deploy.data.image_folder import StrictImageDataset

    folder = tmp_path_factory.mktemp("img")
    (folder / "a").mkdir()
    if isinstance(blob, str):  # a valid image, then truncated at a point the strategy does not control: the middle
        buf = io.BytesIO()
        Image.fromarray(np.arange(64 * 64 * 3, dtype=np.uint8).reshape(64, 64, 3)).save(buf, format=blob)
        data = buf.getvalue()
        blob = data[: len(data) // 2]
    (folder / "a" / "x.png").write_bytes(blob)
    ds = StrictImageDataset(str(folder), input_img_mode="RGB")
    _only_one_line_or_accepted(lambda: ds[0])
