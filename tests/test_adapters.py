"""Block adapters: the families the quantizer handles, and one line for a family it does not."""

import pytest
import timm
import torch
from conftest import images

from pomq_deploy.backends.ort_cpu import OrtCpuBackend
from pomq_deploy.export import export_quantized
from pomq_deploy.export.trt_rules import check_tensorrt
from pomq_deploy.plan import uniform_plan
from pomq_deploy.quant.adapters import ModelError
from pomq_deploy.quant.model import QuantModel

SMALL = dict(img_size=32, patch_size=8, num_classes=10, embed_dim=64, depth=2, num_heads=2)


def _small(arch: str, **extra):
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, **{**SMALL, **extra}).eval()
    # as if trained: some families initialise the head to zero, DeiT-3 its LayerScale to 1e-6 and its class token to ~0
    for name, p in model.named_parameters():
        if name == "head.weight" or name.endswith(".gamma") or name in ("cls_token", "pos_embed"):
            torch.nn.init.normal_(p, mean=0.5 if name.endswith(".gamma") else 0.0, std=0.1)
    return model


@pytest.mark.parametrize("arch", ["vit_small_patch16_224", "deit3_small_patch16_224", "beit_base_patch16_224",
                                  "eva02_tiny_patch14_224"])
def test_families_export_and_agree(arch, tmp_path):
    """ViT and DeiT-3 (LayerScale between the layers) share timm's Block; BEiT and EVA-02 call F.linear on their
    qkv weight with q/v biases of their own, routed to the wrapped layer; EVA-02's rotary embeddings keep q @ k^T
    in float. Each: 2 blocks found, both targets export, the TensorRT rules find no error, ONNX Runtime agrees
    with the fake-quant model."""
    qm = QuantModel(_small(arch, **({"embed_dim": 96} if arch.startswith("eva") else {})), "fqvit")
    assert qm.num_blocks == 2
    qm.calibrate(images())
    plan = uniform_plan("8/8/8", 2, "t", "fqvit")
    assert [f for f in check_tensorrt(export_quantized(qm, plan, "tensorrt", tmp_path / "t.onnx").path) if f.severity == "error"] == []
    info = export_quantized(qm, plan, "ort", tmp_path / "o.onnx")
    x = torch.cat(images(2, seed=4))
    with torch.no_grad():
        ref = qm(x)
    backend = OrtCpuBackend(threads=1)
    out = torch.from_numpy(backend.run(backend.build(info.path, tmp_path), x.numpy()))
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.99
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.999


def test_a_family_without_adapter_is_one_line():
    """CaiT's blocks (talking-heads attention) have no adapter."""
    with pytest.raises(ModelError) as e:
        QuantModel(_small("cait_xxs24_224"), "fqvit")
    msg = str(e.value)
    assert "\n" not in msg and "encoder block timm.models.cait.LayerScaleBlock has no adapter" in msg
    assert "vit (Block), swin (SwinTransformerBlock), beit (Block), eva (EvaBlock)" in msg and ".blocks.0:" in msg


def test_a_variant_the_adapter_does_not_cover_is_one_line():
    """EVA-02 base's SwiGLU MLP (fc1_g / fc1_x) and separate q/k/v projections: the eva adapter names what differs."""
    with pytest.raises(ModelError, match=r"Eva.blocks.0: timm.models.eva.EvaBlock \(eva adapter\): its qkv 'attn.qkv' is "
                                         r"missing, not a Linear; this variant of the family has no adapter yet"):
        QuantModel(_small("eva02_base_patch14_224", embed_dim=96), "fqvit")


def test_beit_qkv_runs_through_the_wrapper():
    """BEiT's attention reads qkv.weight itself: the wrapper shows the layer's weight, and at 4-bit weights the
    block's output moves with the quantized weight (the call reached the wrapper, not the float layer)."""
    qm = QuantModel(_small("beit_base_patch16_224"), "minmax")
    qkv = qm.blocks[0].attn.qkv
    assert qkv.weight is qkv.layer.weight and qkv.bias is None  # BEiT's q/v biases live in the attention
    qm.calibrate(images())
    x = images(1, seed=9)[0]
    with torch.no_grad():
        qm.apply(uniform_plan("8/8/8", 2, "t", "minmax"))
        eight = qm(x)
        qm.apply(uniform_plan("4/8/8", 2, "t", "minmax"))
        four = qm(x)
    assert not torch.equal(eight, four)
