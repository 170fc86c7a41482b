"""VSE-infinity heads: GPO pooling and the hinge-triplet loss, checked against hand-worked values."""

import pytest
import torch

from mdpd_vl.heads.gpo import GPO, VSEHead, sine_positions
from mdpd_vl.heads.pooling import GAPLinear, masked_mean
from mdpd_vl.heads.vse_loss import info_nce, vse_loss


def test_gpo_ignores_padding_and_is_permutation_invariant():
    torch.manual_seed(0)
    gpo = GPO()
    x = torch.randn(3, 7, 16)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 4:] = False
    y = gpo(x, mask)
    x2 = x.clone()
    x2[1, 4:] = 1e3  # padded tokens never count
    assert torch.allclose(gpo(x2, mask), y)
    perm = torch.randperm(7)
    full = torch.ones(3, 7, dtype=torch.bool)
    assert torch.allclose(gpo(x[:, perm], full), gpo(x, full), atol=1e-6)


def test_gpo_weights_sum_to_one_over_valid_ranks():
    gpo = GPO()
    w = gpo.weights(torch.tensor([5, 2]), 5)
    assert torch.allclose(w.sum(1).squeeze(-1), torch.ones(2))
    assert torch.all(w[1, 2:] == 0)


def test_gpo_between_min_and_max():
    gpo = GPO()
    x = torch.randn(2, 6, 4)
    y = gpo(x)
    assert torch.all(y <= x.max(1)[0] + 1e-6) and torch.all(y >= x.min(1)[0] - 1e-6)


def test_sine_positions_rejects_odd_width():
    assert sine_positions(3, 4).shape == (3, 4)
    with pytest.raises(ValueError):
        sine_positions(3, 5)


def test_vse_loss_hand_worked():
    # two pairs; cosine scores [[1, 0.9], [0.5, 1]] built from unit vectors
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t1 = torch.tensor([1.0, 0.0])
    t2 = torch.tensor([0.9, (1 - 0.81) ** 0.5])
    txt = torch.stack([t1, t2])
    s = img @ txt.t()  # [[1, .9], [0, .43589]]
    m = 0.2
    # image queries: row0 neg (0,1): m + .9 - 1 = .1 ; row1 neg (1,0): m + 0 - .436 -> 0
    # caption queries: col0 neg (1,0): m + 0 - 1 -> 0 ; col1 neg (0,1): m + .9 - .436 = .664
    expected = 0.1 + (m + s[0, 1] - s[1, 1])
    assert torch.allclose(vse_loss(img, txt, m, True), expected, atol=1e-6)
    assert torch.allclose(vse_loss(img, txt, m, False), expected, atol=1e-6)  # one negative each


def test_vse_loss_masks_same_image_captions():
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    txt = torch.tensor([[1.0, 0.0], [0.99, 0.14]])
    ids = torch.tensor([7, 7])
    assert vse_loss(img, txt, image_ids=ids) == 0
    assert vse_loss(img, txt) > 0


def test_info_nce_prefers_matching_pairs():
    img = torch.eye(4)
    assert info_nce(img, img) < info_nce(img, img.flip(0))


def test_heads_shapes_and_masked_mean():
    x = torch.ones(2, 3, 5)
    x[0, 2] = 100
    mask = torch.tensor([[True, True, False], [True, True, True]])
    assert torch.allclose(masked_mean(x, mask), torch.ones(2, 5))
    assert GAPLinear(5, 4)(x, mask).shape == (2, 4)
    head = VSEHead(5, 8, mlp=True).train()
    assert head(x, mask).shape == (2, 8)
