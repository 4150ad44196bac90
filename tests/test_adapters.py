"""Block adapters: the families the quantizer handles, and one line for a family it does not."""

import onnx
import pytest
import timm
import torch
from conftest import images
from timm.layers import SwiGLU

from pomq_deploy.backends.ort_cpu import OrtCpuBackend
from pomq_deploy.export import export_quantized
from pomq_deploy.export.graph import matmuls_on_codes
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


EVA = {"embed_dim": 128, "mlp_ratio": 2.0}  # TensorRT's INT4 blocks of 64 fit every K (128, 256)
WIDTHS = {"eva02_tiny_patch14_224": EVA, "eva02_base_patch14_224": EVA}


@pytest.mark.parametrize("arch", ["vit_small_patch16_224", "deit3_small_patch16_224", "beit_base_patch16_224",
                                  "eva02_tiny_patch14_224", "eva02_base_patch14_224"])
def test_families_export_and_agree(arch, tmp_path):
    """ViT and DeiT-3 (LayerScale between the layers) share timm's Block; BEiT and EVA-02 call F.linear on their
    qkv weight with q/v biases of their own, routed to the wrapped layer; EVA-02's rotary embeddings sit between
    q/k and their MatMul, so q, k, v are quantized where they enter it; EVA-02 base has q/k/v projections and a
    SwiGLU MLP. Each, at 8/8/8 and 4/4/4: 2 blocks found, both targets export, every MatMul of the 8/8/8 export
    reads Q/DQ inputs, the TensorRT rules find no error, ONNX Runtime agrees with the fake-quant model."""
    qm = QuantModel(_small(arch, **WIDTHS.get(arch, {})), "fqvit")
    assert qm.num_blocks == 2
    qm.calibrate(images())
    x = torch.cat(images(2, seed=4))
    backend = OrtCpuBackend(threads=1)
    for text in ("8/8/8", "4/4/4"):
        plan = uniform_plan(text, 2, "t", "fqvit")
        trt = export_quantized(qm, plan, "tensorrt", tmp_path / "t.onnx").path
        assert [f for f in check_tensorrt(trt) if f.severity == "error"] == []
        on_codes, matmuls = matmuls_on_codes(onnx.load(trt))
        if text == "8/8/8":  # at 4/4/4, probs @ v reads LIS's log2 probabilities in float
            assert on_codes == matmuls == (18 if arch == "eva02_base_patch14_224" else 12)
        info = export_quantized(qm, plan, "ort", tmp_path / "o.onnx")
        with torch.no_grad():
            ref = qm(x)
        out = torch.from_numpy(backend.run(backend.build(info.path, tmp_path), x.numpy()))
        assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.99, text
        assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.999, text


def test_one_roles_linears_share_their_input_quantizer():
    """EVA-02 base: q/k/v projections and SwiGLU's fc1_g / fc1_x read one LayerNorm output, quantized once; the
    rotary attention quantizes q, k, v itself, so the projections have no output quantizer."""
    qm = QuantModel(_small("eva02_base_patch14_224", **WIDTHS["eva02_base_patch14_224"]), "fqvit")
    block = qm.blocks[0]
    assert qm.block_layers[0]["qkv"] == ("attn.q_proj", "attn.k_proj", "attn.v_proj")
    assert qm.block_layers[0]["fc1"] == ("mlp.fc1_g", "mlp.fc1_x")
    projections = [block.attn.q_proj, block.attn.k_proj, block.attn.v_proj]
    assert len({id(p.in_quant) for p in projections}) == 1 and all(p.out_quant is None for p in projections)
    assert block.mlp.fc1_g.in_quant is block.mlp.fc1_x.in_quant
    assert {"blocks.0.attn.q_in", "blocks.0.attn.k_in", "blocks.0.attn.v_in"} <= set(qm.act_quants)


def test_a_family_without_adapter_is_one_line():
    """CaiT's blocks (talking-heads attention) have no adapter."""
    with pytest.raises(ModelError) as e:
        QuantModel(_small("cait_xxs24_224"), "fqvit")
    msg = str(e.value)
    assert "\n" not in msg and "encoder block timm.models.cait.LayerScaleBlock has no adapter" in msg
    assert "vit (Block), swin (SwinTransformerBlock), beit (Block), eva (EvaBlock)" in msg and ".blocks.0:" in msg


def test_a_variant_the_adapter_does_not_cover_is_one_line():
    """A ViT built with a SwiGLU MLP (fc1_g / fc1_x): the vit adapter knows only mlp.fc1, and says so."""
    with pytest.raises(ModelError) as e:
        QuantModel(_small("vit_small_patch16_224", mlp_layer=SwiGLU), "fqvit")
    assert str(e.value) == ("VisionTransformer.blocks.0: timm.models.vision_transformer.Block (vit adapter): its fc1 must "
                            "be 'mlp.fc1' (Linear), but 'mlp.fc1' is missing; this variant of the family has no adapter yet")


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
