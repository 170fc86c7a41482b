"""Video-text retrieval metrics (CLIP4Clip protocol): MdR that ends in .5, multi-sentence V2T by
the best sentence per candidate video, ties, brute-force loops and property tests."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from mdpd_vl.errors import UserError
from mdpd_vl.eval.video_retrieval import VTR_KEYS, evaluate_vtr


def loop_rank(row: np.ndarray, target: int) -> int:
    """Position of `target` when candidates are sorted by score, ties broken against it."""
    others = [s for c, s in enumerate(row) if c != target]
    return sum(s >= row[target] for s in others)


def naive_vtr(sims: np.ndarray, owner: np.ndarray, multi: bool) -> dict[str, float]:
    n_video = sims.shape[1]
    t2v = np.array([loop_rank(sims[j], owner[j]) for j in range(len(owner))])
    group = np.array([[max(sims[j, v] for j in range(len(owner)) if owner[j] == g)
                       for g in range(n_video)] for v in range(n_video)])
    v2t = np.array([loop_rank(group[v], v) for v in range(n_video)])
    out = {}
    for name, ranks in (("t2v", t2v), ("v2t", v2t)):
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = 100.0 * np.mean(ranks < k)
        if name == "t2v" and multi:
            out[f"{name}_medr"] = float(sorted(ranks)[(len(ranks) - 1) // 2] + 1)
        else:
            out[f"{name}_medr"] = float(np.median(ranks) + 1)
        out[f"{name}_meanr"] = float(np.mean(ranks) + 1)
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("t2v", "v2t") for k in (1, 5, 10))
    return out


def test_single_sentence_hand_worked_and_half_median():
    sims = np.array([[0.9, 0.2],
                     [0.8, 0.3]])  # text 1 prefers video 0
    m = evaluate_vtr(sims)
    # t2v ranks (0, 1): MdR = median + 1 = 1.5, unlike VSE's floor.
    assert m["t2v_r1"] == 50.0 and m["t2v_medr"] == 1.5 and m["t2v_meanr"] == 1.5
    # v2t: video 0 -> text 0 (0.9 > 0.8) rank 0; video 1 -> text 1 (0.3 > 0.2) rank 0.
    assert m["v2t_r1"] == 100.0 and m["v2t_medr"] == 1.0
    assert m["rsum"] == 50 + 100 + 100 + 100 + 100 + 100
    assert set(m) == set(VTR_KEYS)


def test_exact_tie_does_not_inflate_recall():
    sims = np.array([[0.5, 0.5, 0.1],
                     [0.0, 0.9, 0.1],
                     [0.0, 0.1, 0.9]])
    m = evaluate_vtr(sims)
    # CLIP4Clip's np.where would emit two "hits" for row 0; we rank text 0 second.
    assert m["t2v_r1"] == pytest.approx(200 / 3)


def test_multi_sentence_v2t_uses_best_sentence_of_each_candidate():
    # Video 0 has sentences a, b; video 1 has sentence c.
    owner = np.array([0, 0, 1])
    sims = np.array([[0.2, 0.9],    # a
                     [0.3, 0.8],    # b
                     [0.1, 0.5]])   # c
    m = evaluate_vtr(sims, owner)
    # Query video 1: candidate group 0 scores max(0.9, 0.8) = 0.9 > 0.5 -> rank 1 (not 2, as ranking
    # the individual captions a, b, c would give).
    # Query video 0: group 0 = max(0.2, 0.3) = 0.3 > 0.1 -> rank 0.
    assert m["v2t_r1"] == 50.0 and m["v2t_meanr"] == 1.5
    # t2v: a -> video 0 (0.2 < 0.9) rank 1, b rank 1, c -> video 1 (0.5 > 0.1) rank 0.
    assert m["t2v_r1"] == pytest.approx(100 / 3)
    assert m == pytest.approx(naive_vtr(sims, owner, multi=True))


def test_multi_sentence_t2v_median_is_torch_lower_median():
    owner = np.array([0, 0, 1, 1])
    sims = np.array([[0.9, 0.1], [0.1, 0.9], [0.1, 0.9], [0.9, 0.1]])  # t2v ranks 0, 1, 0, 1
    assert evaluate_vtr(sims, owner)["t2v_medr"] == 1.0                        # torch.median
    assert evaluate_vtr(sims, owner, multi_sentence=False)["t2v_medr"] == 1.5  # np.median


@pytest.mark.parametrize("seed", range(6))
def test_matches_naive_loops(seed):
    rng = np.random.default_rng(seed)
    n_video = int(rng.integers(2, 12))
    counts = rng.integers(1, 5, n_video) if seed % 2 else np.ones(n_video, dtype=int)
    owner = rng.permutation(np.repeat(np.arange(n_video), counts))
    sims = np.round(rng.standard_normal((len(owner), n_video)), 1 + 4 * (seed % 3 == 0))
    multi = bool((counts > 1).any())
    assert evaluate_vtr(sims, owner) == pytest.approx(naive_vtr(sims, owner, multi))


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 8).flatmap(lambda n: arrays(np.int8, (n, n), elements=st.integers(-2, 2))),
       st.randoms(use_true_random=False))
def test_properties(sims, rnd):
    m = evaluate_vtr(sims)
    for d in ("t2v", "v2t"):
        assert 0 <= m[f"{d}_r1"] <= m[f"{d}_r5"] <= m[f"{d}_r10"] <= 100
    assert 0 <= m["rsum"] <= 600
    perm = list(range(len(sims)))
    rnd.shuffle(perm)
    # Shuffling the text rows, with the mapping telling where each row belongs, changes nothing.
    assert evaluate_vtr(sims[perm], np.array(perm)) == pytest.approx(m)


@pytest.mark.parametrize("args,match", [
    ((np.zeros((3, 2)),), "not square"),
    ((np.zeros((3, 2)), [0, 1]), "3 entries"),
    ((np.zeros((3, 2)), [0, 1, 2]), "outside"),
    ((np.zeros((3, 2)), [0, 0, 0]), "video 1 has no sentence"),
    ((np.zeros((2, 2, 2)),), "2-D"),
])
def test_bad_input(args, match):
    with pytest.raises(UserError, match=match):
        evaluate_vtr(*args)
