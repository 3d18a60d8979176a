import math

import pytest
import torch

from inrscrecon.field.encoding import EncodingConfig, PositionalEncoding, fourier_encode


@pytest.mark.parametrize("n_bands", [0, 1, 4, 10])
@pytest.mark.parametrize("include_input", [True, False])
def test_fourier_shape_and_formula(n_bands, include_input):
    x = torch.rand(17, 3, dtype=torch.float64) * 2 - 1
    enc = fourier_encode(x, n_bands, include_input)
    off = 3 if include_input else 0
    assert enc.shape == (17, off + 6 * n_bands)
    if include_input:
        torch.testing.assert_close(enc[:, :3], x)
    for j in range(3):
        for k in range(n_bands):
            expect_sin = torch.sin(2**k * math.pi * x[:, j])
            expect_cos = torch.cos(2**k * math.pi * x[:, j])
            torch.testing.assert_close(enc[:, off + j * n_bands + k], expect_sin)
            torch.testing.assert_close(enc[:, off + 3 * n_bands + j * n_bands + k], expect_cos)


def test_gaussian_features_seeded_and_scaled():
    a = PositionalEncoding(EncodingConfig(kind="gaussian", n_features=32, sigma=2.0, seed=1))
    b = PositionalEncoding(EncodingConfig(kind="gaussian", n_features=32, sigma=2.0, seed=1))
    x = torch.rand(5, 3)
    assert a.out_dim == 3 + 64 and a(x).shape == (5, 67)
    torch.testing.assert_close(a(x), b(x))
    angles = 2 * math.pi * x @ a.basis.T
    torch.testing.assert_close(a(x)[:, 3:35], torch.sin(angles))


def test_unknown_kind_rejected():
    with pytest.raises(ValueError, match="fourier"):
        PositionalEncoding(EncodingConfig(kind="hash"))
