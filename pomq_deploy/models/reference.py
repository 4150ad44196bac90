"""The embedded reference model: DeiT-Tiny's encoder on 28x28 single-channel images.

Registered with timm so that ``timm.create_model("deit_fmnist")`` is the handle, like any timm model.
Why this size: on this 2-core AVX512-VNNI/AMX CPU, INT8 only beats FP32 from about 192-d widths up
(ONNX Runtime's own quantizer: 1.24x at batch 8 for 192-d/patch 4, 0.71-0.99x for a 96-d model), and the
bit-width search needs quantization to be able to pay off.
"""

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer

# Fashion-MNIST training-set statistics (of pixel values scaled to [0, 1]).
FMNIST_MEAN = (0.2860,)
FMNIST_STD = (0.3530,)

REFERENCE_CONFIG = dict(
    img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=192, depth=12, num_heads=3, mlp_ratio=4.0
)

# timm's register_model reads this module-level table for the model's data config (no hub weights).
default_cfgs = generate_default_cfgs({
    "deit_fmnist": dict(
        input_size=(1, 28, 28), mean=FMNIST_MEAN, std=FMNIST_STD, num_classes=10, crop_pct=1.0,
        interpolation="bilinear", first_conv="patch_embed.proj", classifier="head",
    ),
})


@register_model
def deit_fmnist(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """DeiT-Tiny blocks (12 x 192-d, 3 heads, MLP 768), patch 4 on 28x28x1: 49 patches + class token."""
    if pretrained:
        raise ValueError("deit_fmnist has no hub weights: load checkpoints/deit_fmnist.safetensors instead")
    return build_model_with_cfg(VisionTransformer, "deit_fmnist", pretrained=False, **{**REFERENCE_CONFIG, **kwargs})
