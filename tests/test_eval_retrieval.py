"""Image-text retrieval metrics (VSE-infinity protocol): hand-worked cases, ties, COCO images with
six captions, 5-fold averaging, brute-force cross-checks and property tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from mdpd_vl.errors import UserError
from mdpd_vl.eval.retrieval import ITR_KEYS, evaluate_itr, recall_stats


def naive_ranks(sims: np.ndarray, cap2img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Loop reference: sort candidates by score, ties broken *against* the query (negatives first),
    and take the position of the first matching candidate."""
    n_img, n_cap = sims.shape
    i2t = []
    for i in range(n_img):
        is_pos = cap2img == i
        order = np.lexsort((is_pos, -sims[i]))  # primary: score desc; tie: negatives (False) first
        i2t.append(int(np.flatnonzero(is_pos[order])[0]))
    t2i = []
    for j in range(n_cap):
        is_pos = np.arange(n_img) == cap2img[j]
        order = np.lexsort((is_pos, -sims[:, j]))
        t2i.append(int(np.flatnonzero(is_pos[order])[0]))
    return np.array(i2t), np.array(t2i)


def naive_metrics(sims: np.ndarray, cap2img: np.ndarray) -> dict[str, float]:
    i2t, t2i = naive_ranks(sims, cap2img)
    out = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = 100.0 * sum(r < k for r in ranks) / len(ranks)
        out[f"{name}_medr"] = float(np.floor(np.median(ranks)) + 1)
        out[f"{name}_meanr"] = float(np.mean(ranks) + 1)
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    return out


def test_hand_worked_two_images():
    # 2 images x 2 captions each (captions_per_image=2): rows are images.
    sims = np.array([[0.9, 0.1, 0.8, 0.7],    # image 0: own captions 0,1 -> best at position 0
                     [0.95, 0.2, 0.3, 0.1]])  # image 1: own captions 2,3 -> caption 2 is 2nd (0.3)
    m = evaluate_itr(sims, captions_per_image=2)
    # i2t ranks: image 0 -> 0; image 1 -> sorted [0.95(c0), 0.3(c2), ...] -> 1.
    assert m["i2t_r1"] == 50.0 and m["i2t_r5"] == 100.0
    assert m["i2t_meanr"] == 1.5 and m["i2t_medr"] == 1.0  # floor(median(0, 1)) + 1 = floor(0.5) + 1
    # t2i ranks: c0 -> img0 (0.9 < 0.95) rank 1; c1 -> img0 0.1 < 0.2 rank 1; c2 -> img1 0.3 < 0.8 rank 1;
    # c3 -> img1 0.1 < 0.7 rank 1.
    assert m["t2i_r1"] == 0.0 and m["t2i_r5"] == 100.0 and m["t2i_medr"] == 2.0 and m["t2i_meanr"] == 2.0
    assert m["rsum"] == 50 + 100 + 100 + 0 + 100 + 100
    assert m["ar"] == pytest.approx(250 / 3) and m["ari"] == pytest.approx(200 / 3)
    assert set(m) == set(ITR_KEYS)


def test_tie_with_a_negative_counts_against_the_query():
    sims = np.array([[0.5, 0.5],   # image 0: its caption 0 ties with caption 1 of image 1
                     [0.1, 0.9]])
    m = evaluate_itr(sims, captions_per_image=1)
    # np.argsort could put caption 0 first and call it a hit; we do not.
    assert m["i2t_r1"] == 50.0
    # t2i column 0: image 0 scores 0.5 vs 0.1 -> rank 0; column 1: 0.9 vs 0.5 -> rank 0.
    assert m["t2i_r1"] == 100.0


def test_tie_between_two_own_captions_is_not_a_penalty():
    # Two identical own captions at the top: the best-ranked one is still first.
    sims = np.array([[0.7, 0.7, 0.1, 0.2],
                     [0.3, 0.3, 0.6, 0.5]])
    m = evaluate_itr(sims, captions_per_image=2)
    assert m["i2t_r1"] == 100.0


def test_coco_image_with_six_captions():
    # Image 0 has six captions, image 1 five: the default j // 5 mapping cannot express this.
    owner = np.array([0] * 6 + [1] * 5)
    sims = np.full((2, 11), 0.0)
    sims[0, 5] = 1.0    # the 6th caption of image 0 is its best match
    sims[1, 6:] = 0.5   # image 1 likes its own five
    sims[1, 0] = 0.9    # ... but caption 0 of image 0 even more
    m = evaluate_itr(sims, caption_to_image=owner)
    assert m["i2t_r1"] == 50.0       # image 0 hit via caption 5; image 1 misses (rank 1)
    assert m["i2t_meanr"] == 1.5
    assert m == naive_metrics(sims, owner) | {"ar": m["ar"], "ari": m["ari"]}
    with pytest.raises(UserError, match="11"):
        evaluate_itr(sims)  # 2 x 5 = 10 columns expected


def test_five_fold_averages_every_number():
    rng = np.random.default_rng(1)
    n = 4  # images per fold
    sims = rng.standard_normal((5 * n, 25 * n))
    sims[np.arange(5 * n), np.arange(5 * n) * 5] += np.linspace(0, 3, 5 * n)  # folds differ
    folds = [evaluate_itr(sims[f * n:(f + 1) * n, f * 5 * n:(f + 1) * 5 * n]) for f in range(5)]
    m = evaluate_itr(sims, folds=5)
    for k in ITR_KEYS:
        assert m[k] == pytest.approx(np.mean([f[k] for f in folds]))
    assert len({f["rsum"] for f in folds}) > 1
    # The same captions in a shuffled column order, described by caption_to_image, give the same.
    perm = rng.permutation(25 * n)
    owner = np.arange(25 * n) // 5
    m2 = evaluate_itr(sims[:, perm], caption_to_image=owner[perm], folds=5)
    assert m2 == pytest.approx(m)


def test_medr_floor_versus_clip4clip_median():
    ranks = np.array([0, 1, 3, 4])  # median 2.0
    assert recall_stats(ranks, "floor")["medr"] == 3.0
    ranks = np.array([0, 1])  # median 0.5
    assert recall_stats(ranks, "floor")["medr"] == 1.0     # VSE-infinity
    assert recall_stats(ranks, "mean")["medr"] == 1.5      # CLIP4Clip compute_metrics
    assert recall_stats(ranks, "lower")["medr"] == 1.0     # torch.median


@pytest.mark.parametrize("seed", range(6))
def test_matches_naive_loop_on_random_matrices(seed):
    rng = np.random.default_rng(seed)
    n_img = int(rng.integers(2, 15))
    counts = rng.integers(1, 8, n_img)
    owner = rng.permutation(np.repeat(np.arange(n_img), counts))
    # Rounded scores create many exact ties: the tie rule must agree with the naive loop too.
    sims = np.round(rng.standard_normal((n_img, len(owner))), 1 if seed % 2 else 6)
    m = evaluate_itr(sims, caption_to_image=owner)
    ref = naive_metrics(sims, owner)
    for k, v in ref.items():
        assert m[k] == pytest.approx(v), k


def test_accepts_torch_and_large_matrix_quickly():
    rng = np.random.default_rng(0)
    sims = rng.standard_normal((500, 2500)).astype(np.float32)
    m_np = evaluate_itr(sims)
    m_t = evaluate_itr(torch.from_numpy(sims))
    assert m_np == m_t


sims_strategy = st.integers(1, 6).flatmap(
    lambda n: st.tuples(st.just(n), arrays(np.int8, (n, 2 * n), elements=st.integers(-3, 3))))


@settings(max_examples=60, deadline=None)
@given(sims_strategy, st.randoms(use_true_random=False))
def test_properties(case, rnd):
    n, sims = case
    m = evaluate_itr(sims, captions_per_image=2)
    for d in ("i2t", "t2i"):
        assert 0 <= m[f"{d}_r1"] <= m[f"{d}_r5"] <= m[f"{d}_r10"] <= 100
        assert 1 <= m[f"{d}_medr"] and 1 <= m[f"{d}_meanr"]
    assert 0 <= m["rsum"] <= 600
    # Permuting images (rows) and captions (columns) consistently changes nothing.
    rows = list(range(n))
    cols = list(range(2 * n))
    rnd.shuffle(rows)
    rnd.shuffle(cols)
    new_id = np.argsort(rows)  # old image id -> new row
    owner = new_id[np.arange(2 * n) // 2][cols]
    assert evaluate_itr(sims[rows][:, cols], caption_to_image=owner) == pytest.approx(m)


@pytest.mark.parametrize("kwargs,match", [
    ({"sims": np.zeros(5)}, "2-D"),
    ({"sims": np.zeros((2, 10)), "caption_to_image": [0] * 9}, "10 entries"),
    ({"sims": np.zeros((2, 10)), "caption_to_image": [0] * 9 + [2]}, "outside"),
    ({"sims": np.zeros((2, 10)), "caption_to_image": [0] * 10}, "image 1 has no caption"),
    ({"sims": np.zeros((2, 10)), "caption_to_image": [-1] + [1] * 9}, "outside"),
    ({"sims": np.zeros((2, 9))}, "pass caption_to_image"),
    ({"sims": np.zeros((3, 15)), "folds": 2}, "folds"),
    ({"sims": np.full((2, 10), np.nan)}, "NaN"),
    ({"sims": np.array([["a"] * 10] * 2)}, "dtype"),
])
def test_bad_input(kwargs, match):
    with pytest.raises(UserError, match=match):
        evaluate_itr(**kwargs)
