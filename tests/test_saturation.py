"""The emulation of an AVX2 CPU's u8 x s8 GEMM the self-check is tested against (pomq_deploy.backends.saturation)."""

import torch

from pomq_deploy.backends.saturation import vpmaddubsw_gemm


def test_pairs_saturate_int16_by_hand():
    raw = torch.tensor([[255.0, 255.0, 255.0, 255.0], [255.0, 0.0, 10.0, 20.0]])
    w = torch.tensor([[127.0, 127.0, 1.0, 2.0], [-128.0, -128.0, 127.0, 127.0]])
    # row 0: 255*127*2 = 64,770 -> 32,767, then 255*1 + 255*2 = 765; 255*(-128)*2 -> -32,768, then 64,770 -> 32,767
    # row 1: 255*127 = 32,385 (no saturation) + 10 + 40; -32,640 + 1,270 + 2,540
    assert vpmaddubsw_gemm(raw, w).tolist() == [[32767 + 765, -32768 + 32767], [32385 + 50, -32640 + 3810]]


def test_equals_every_pair_formed_and_clamped_with_an_odd_width():
    g = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (37, 51), generator=g).float()
    w = torch.randint(-128, 128, (29, 51), generator=g).float()
    pad = lambda t: torch.nn.functional.pad(t, (0, 1))  # noqa: E731
    pairs = torch.einsum("njk,ojk->njo", pad(raw).reshape(37, -1, 2), pad(w).reshape(29, -1, 2))
    brute = pairs.clamp(-32768, 32767).double().sum(1)
    assert (brute != raw.double() @ w.double().T).any()  # these codes do saturate
    assert torch.equal(vpmaddubsw_gemm(raw, w), brute)
