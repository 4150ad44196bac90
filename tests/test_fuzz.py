"""Fuzzing what a user hands the tool: recipe and plan YAML, checkpoint files and their tensors, ONNX files for
``check`` and ``bench --onnx``, image files.

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
import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
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
RECIPE = {"name": "fuzz", "model": {"arch": "deit_fmnist"}, "data": {"kind": "fashion_mnist"}, "fit": {"iterations": 200, "drop": 0.5}}
PLAN = {"recipe": "deit_fmnist", "scheme": "fqvit", "rounding": "gptq", "blocks": [{"w": 8, "a": 8, "attn": 8}] * 12}


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
        event("accepted")
    except PomqError as e:
        assert "\n" not in str(e) and str(e).strip(), repr(str(e))
        assert e.exit_code in (1, 2)
        event(f"refused, exit {e.exit_code}")


@given(data=st.data())
def test_recipe_yaml(tmp_path_factory, data):
    from pomq_deploy.recipe import load_recipe

    folder = tmp_path_factory.mktemp("recipe")
    paths = [("name",), ("model",), ("model", "arch"), ("data",), ("data", "kind"), ("data", "root"), ("eval",),
             ("search",), ("fit",), ("fit", "iterations"), ("fit", "drop")]
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
    paths = [("recipe",), ("scheme",), ("rounding",), ("blocks",), ("blocks", 0), ("blocks", 3, "w"), ("blocks", 11, "attn")]
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


ONNX_TYPES = st.sampled_from(["FLOAT", "FLOAT16", "INT64", "INT8", "UINT8", "BOOL", "STRING", "DOUBLE"])
DIMS = st.one_of(st.integers(0, 6), st.sampled_from(["b", "n", "", None, 100_000]))
ONNX_OPS = {"Relu": 1, "Identity": 1, "Neg": 1, "Add": 2, "MatMul": 2, "Reshape": 2, "Cast": 1, "Softmax": 1,
            "Concat": 2, "QuantizeLinear": 2, "DequantizeLinear": 2}


@st.composite
def _small_onnx_models(draw) -> bytes:
    """A small graph: mostly a float input of shape (batch, fixed dims) through float ops, each part of which
    (an input's type, rank and dimensions: fixed, symbolic or unset; the ops and their wiring; the opset) is
    sometimes drawn at random instead, so that some graphs time, some fail to load and some fail to run."""
    from onnx import TensorProto
    from onnx import helper as h

    def maybe(strategy, usual):
        return draw(strategy) if draw(st.integers(0, 4)) == 0 else usual

    count = maybe(st.integers(0, 3), 1)
    inputs = [h.make_tensor_value_info(f"x{i}", getattr(TensorProto, maybe(ONNX_TYPES, "FLOAT")),
                                       maybe(st.one_of(st.none(), st.lists(DIMS, max_size=3)),
                                             ["b", *draw(st.lists(st.integers(1, 6), min_size=1, max_size=2))]))
              for i in range(count)]
    names, nodes = [i.name for i in inputs], []
    for k in range(draw(st.integers(1, 3))):
        op = maybe(st.sampled_from(sorted(ONNX_OPS)), draw(st.sampled_from(["Relu", "Neg", "Softmax", "Add", "MatMul"])))
        args = [maybe(st.sampled_from(names), names[-1]) if names else "" for _ in range(ONNX_OPS[op])]
        attrs = {"to": draw(st.integers(0, 17))} if op == "Cast" else {"axis": draw(st.integers(-3, 3))} if op == "Concat" else {}
        nodes.append(h.make_node(op, args, [f"y{k}"], **attrs))
        names.append(f"y{k}")
    graph = h.make_graph(nodes, "fuzz", inputs, [h.make_tensor_value_info(names[-1], TensorProto.FLOAT, None)])
    return h.make_model(graph, opset_imports=[h.make_opsetid("", maybe(st.sampled_from([1, 13, 99]), 17))]).SerializeToString()


@given(data=st.data())
def test_onnx_files_for_bench(tmp_path_factory, data, capsys):
    """``pomq-deploy bench --onnx`` on random small graphs and on a real model truncated or bit-flipped: a
    timing, or one line and 1 or 2; nothing written beside the file."""
    from pomq_deploy.cli.main import main

    folder = tmp_path_factory.mktemp("bench")
    if data.draw(st.booleans()):
        blob = data.draw(_small_onnx_models())
    else:
        blob = bytearray(_onnx_bytes())
        cut = data.draw(st.integers(1, len(blob)))
        blob = bytes(blob[:cut])
        if data.draw(st.booleans()) and blob:
            i = data.draw(st.integers(0, len(blob) - 1))
            blob = blob[:i] + bytes([blob[i] ^ 1 << data.draw(st.integers(0, 7))]) + blob[i + 1:]
    (folder / "m.onnx").write_bytes(blob)
    capsys.readouterr()
    rc = main(["bench", "--onnx", str(folder / "m.onnx"), "--runs", "1", "--batch", str(data.draw(st.integers(1, 4)))])
    err = capsys.readouterr().err
    event(f"exit {rc}: {err.split('m.onnx')[-1][:60] if rc else 'timed'}")
    assert rc in (0, 1, 2) and "Traceback" not in err, err
    if rc != 0:
        assert len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in folder.iterdir()) == ["m.onnx"]


TENSOR_CHANGES = st.sampled_from(["int64", "int8", "bool", "float16", "bfloat16", "float64", "complex64", "uint8",
                                  "drop_dim", "add_dim", "resize", "scalar", "empty", "nan", "inf", "huge", "remove",
                                  "extra"])


def _reshaped(t, change: str):
    import torch

    if change == "drop_dim":
        return t.flatten()[: t.shape[0]] if t.dim() > 1 else t.sum() if t.dim() else t
    return {"add_dim": t.unsqueeze(0), "resize": torch.zeros(t.numel() + 1), "scalar": torch.tensor(1.0),
            "empty": torch.zeros(0)}[change]


@pytest.mark.filterwarnings("ignore:Casting complex values to real")  # the test's own casts between changes
@given(data=st.data())
def test_checkpoint_tensors(tmp_path_factory, data):
    """A real checkpoint with tensors of the wrong dtype, shape or values, missing or extra, as .safetensors or
    .pth: the model loads (a lossless dtype) or one line says what does not fit."""
    import timm
    import torch
    from safetensors.torch import save_file

    from pomq_deploy.models.loading import create_model

    torch.manual_seed(0)
    state = {k: v.clone() for k, v in timm.create_model("test_vit").state_dict().items()}
    for _ in range(data.draw(st.integers(1, 3))):
        key, change = data.draw(st.sampled_from(sorted(state))), data.draw(TENSOR_CHANGES)
        t = state[key]
        if change in ("drop_dim", "add_dim", "resize", "scalar", "empty"):
            state[key] = _reshaped(t, change)
        elif change in ("nan", "inf", "huge"):
            state[key] = t.clone().float()
            if t.numel():
                state[key].view(-1)[0] = {"nan": float("nan"), "inf": float("-inf"), "huge": 3e38}[change]
        elif change == "remove":
            del state[key]
        elif change == "extra":
            state[f"{key}.extra"] = t.clone()
        else:
            state[key] = (t * 100).to(getattr(torch, change))
    folder = tmp_path_factory.mktemp("tensors")
    path = folder / data.draw(st.sampled_from(["m.safetensors", "m.pth"]))
    if path.suffix == ".pth":
        torch.save(state, path)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    _only_one_line_or_accepted(lambda: create_model("test_vit", path))
