import pytest
import timm
import torch
from safetensors.torch import save_file

from pomq_deploy.errors import CheckpointError
from pomq_deploy.models.loading import create_model, read_state_dict


@pytest.fixture(scope="module")
def weights():
    torch.manual_seed(0)
    return timm.create_model("test_vit").state_dict()


@pytest.mark.parametrize("kind", ["safetensors", "pth", "wrapped", "ddp"])
def test_loads_each_format(tmp_path, weights, kind):
    path = tmp_path / ("m.safetensors" if kind == "safetensors" else "m.pth")
    if kind == "safetensors":
        save_file(weights, str(path))
    elif kind == "pth":
        torch.save(weights, path)
    elif kind == "wrapped":  # DeiT / timm training checkpoints keep the weights under "model"
        torch.save({"model": weights, "epoch": 3}, path)
    else:
        torch.save({f"module.{k}": v for k, v in weights.items()}, path)
    model = create_model("test_vit", path)
    assert not model.training
    assert torch.equal(model.state_dict()["head.weight"], weights["head.weight"])


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "m.pth"
    torch.save({"model": torch.nn.Linear(2, 2)}, path)  # a module, not tensors: weights_only refuses it
    with pytest.raises(CheckpointError, match="refused: it holds Python objects besides tensors"):
        read_state_dict(path)


class _RunsCode:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_pickle_that_would_run_code_is_refused_without_torchs_advice_to_unpickle_it(tmp_path, capsys):
    """torch's message says rerunning with weights_only=False 'will likely succeed': never advice for a file of
    unknown origin. The one line names what the file would have called instead."""
    path = tmp_path / "evil.pth"
    torch.save({"w": _RunsCode()}, path)
    with pytest.raises(CheckpointError) as e:
        read_state_dict(path)
    msg = str(e.value)
    assert msg == f"{path}: refused: it holds Python objects besides tensors (print); a checkpoint is only " \
                  "read as tensors, never unpickled"
    assert "weights_only" not in msg and "this must never run" not in capsys.readouterr().out


def test_shape_mismatch_is_one_line(tmp_path, weights):
    path = tmp_path / "m.safetensors"
    save_file({**weights, "head.weight": torch.zeros(10, weights["head.weight"].shape[1])}, str(path))
    with pytest.raises(CheckpointError, match=r"tensors do not fit test_vit: 1 shape mismatch\(es\), e.g. head.weight \(10, 64\) vs model \(1000, 64\)"):
        create_model("test_vit", path)


def test_missing_and_unexpected_keys(tmp_path, weights):
    path = tmp_path / "m.safetensors"
    state = {k: v for k, v in weights.items() if k != "norm.bias"}
    save_file({**state, "extra.weight": torch.zeros(1)}, str(path))
    with pytest.raises(CheckpointError, match="1 missing, e.g. norm.bias; 1 unexpected, e.g. extra.weight"):
        create_model("test_vit", path)


def test_numbers_of_another_kind_or_not_finite_are_refused(tmp_path, weights):
    """An integer or complex tensor would be cast into a float weight, NaN would load: both refused, named."""
    path = tmp_path / "m.safetensors"
    save_file({**weights, "norm.weight": torch.ones(64, dtype=torch.int64), "head.bias": torch.full((1000,), float("nan"))},
              str(path))
    with pytest.raises(CheckpointError, match=r"1 of another kind of number, e.g. norm.weight torch.int64 vs model "
                                              r"torch.float32; 1 holding NaN or infinity, e.g. head.bias"):
        create_model("test_vit", path)


def test_a_half_precision_release_loads(tmp_path, weights):
    path = tmp_path / "m.safetensors"
    save_file({k: v.half() for k, v in weights.items()}, str(path))
    model = create_model("test_vit", path)
    assert torch.equal(model.state_dict()["head.weight"], weights["head.weight"].half().float())


def test_hints_read_only_tensors_of_the_expected_rank(tmp_path, weights):
    """A flattened patch embedding or position embedding is a mismatch, not a crash of the hint reader."""
    path = tmp_path / "m.safetensors"
    save_file({**weights, "patch_embed.proj.weight": weights["patch_embed.proj.weight"].flatten(),
               "pos_embed": weights["pos_embed"].flatten()}, str(path))
    with pytest.raises(CheckpointError, match=r"2 shape mismatch\(es\), e.g. pos_embed \(\d+,\) vs model"):
        create_model("test_vit", path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        create_model("test_vit", tmp_path / "nope.safetensors")


def test_no_checkpoint_given():
    with pytest.raises(CheckpointError, match="pass --checkpoint FILE"):
        create_model("test_vit", None)


def test_timm_converts_other_layouts(tmp_path, weights):
    """A layout timm's own converter knows (here the patch embedding stored as a Linear, as big_vision exports it)
    loads through the model's checkpoint_filter_fn, to the same tensors."""
    conv = weights["patch_embed.proj.weight"]
    linear = {**weights, "patch_embed.proj.weight": conv.reshape(conv.shape[0], -1)}
    path = tmp_path / "linear_patch.safetensors"
    save_file(linear, str(path))
    model = create_model("test_vit", path)
    assert torch.equal(model.state_dict()["patch_embed.proj.weight"], conv)
