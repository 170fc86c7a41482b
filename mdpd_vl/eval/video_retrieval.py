"""Video-text retrieval with CLIP4Clip's conventions (ArrowLuo/CLIP4Clip metrics.py,
main_task_retrieval.py `eval_epoch`).

`sims` is texts x videos; text j describes video `text_to_video[j]`.
- t2v: every sentence is a query ranked against all videos.
- v2t: each query video ranks the *caption groups* of all videos, a group scored by its best
  sentence for that video (`tensor_video_to_text_sim`); with one sentence per video this is
  exactly `compute_metrics(sim.T)`.
- R@K in percent, MdR = median + 1 (`np.median`, may end in .5), MnR = mean + 1. In the
  multi-sentence setting CLIP4Clip's t2v MdR comes from `torch.median`, which returns the lower of
  the two middle values; we reproduce that (`recall_stats(..., "lower")`).
- Exact ties: `compute_metrics` emits one hit per tied column (`np.where(sorted == diag)`), which
  inflates recall; we count ties against the query (see `retrieval.pessimistic_ranks`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from mdpd_vl.errors import UserError
from mdpd_vl.eval.retrieval import (
    as_index_vector,
    as_score_matrix,
    pessimistic_ranks,
    recall_stats,
)

VTR_KEYS = ("t2v_r1", "t2v_r5", "t2v_r10", "t2v_medr", "t2v_meanr",
            "v2t_r1", "v2t_r5", "v2t_r10", "v2t_medr", "v2t_meanr", "rsum")


def group_max_sims(sims: np.ndarray, text_to_video: np.ndarray, n_videos: int) -> np.ndarray:
    """Video x video matrix: entry [v, g] = max over the sentences of video g of sim(sentence, v)."""
    order = np.argsort(text_to_video, kind="stable")
    counts = np.bincount(text_to_video, minlength=n_videos)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    per_group = np.maximum.reduceat(sims[order], starts, axis=0)  # [g, v]
    return per_group.T


def evaluate_vtr(sims: Any, text_to_video: Sequence[int] | np.ndarray | None = None,
                 multi_sentence: bool | None = None) -> dict[str, float]:
    """CLIP4Clip retrieval metrics of a texts x videos similarity matrix (numpy or torch).

    `text_to_video` defaults to the identity (square matrix, MSR-VTT 1k-A). `multi_sentence`
    (CLIP4Clip's MSVD mode, only changes the t2v median) defaults to "some video has > 1 sentence".
    """
    arr = as_score_matrix(sims)
    n_text, n_video = arr.shape
    if text_to_video is None:
        if n_text != n_video:
            raise UserError(f"{n_text} texts x {n_video} videos is not square; pass text_to_video "
                            "(the video of every text row)", where="sims")
        owner = np.arange(n_text, dtype=np.int64)
    else:
        owner = as_index_vector(text_to_video, n_text, n_video, "text_to_video", "text")
    counts = np.bincount(owner, minlength=n_video)
    if (counts == 0).any():
        missing = np.flatnonzero(counts == 0)
        raise UserError(f"video {missing[0]} has no sentence ({missing.size} videos without one)",
                        where="text_to_video")
    if multi_sentence is None:
        multi_sentence = bool((counts > 1).any())

    video_ids = np.arange(n_video)

    def t2v_pos(r0: int, r1: int) -> np.ndarray:
        return video_ids[None, :] == owner[r0:r1, None]

    def diagonal(r0: int, r1: int) -> np.ndarray:
        return video_ids[None, :] == video_ids[r0:r1, None]

    t2v = recall_stats(pessimistic_ranks(arr, t2v_pos), "lower" if multi_sentence else "mean")
    v2t = recall_stats(pessimistic_ranks(group_max_sims(arr, owner, n_video), diagonal), "mean")
    out = {f"t2v_{k}": v for k, v in t2v.items()} | {f"v2t_{k}": v for k, v in v2t.items()}
    out["rsum"] = t2v["r1"] + t2v["r5"] + t2v["r10"] + v2t["r1"] + v2t["r5"] + v2t["r10"]
    return {k: out[k] for k in VTR_KEYS}


def encode_and_evaluate(video_encoder: Any, text_encoder: Any, eval_set: Any, tokenize: Any, *,
                        batch_size: int = 16, num_workers: int = 0, device: Any = "cpu",
                        multi_sentence: bool | None = None) -> tuple[dict[str, float], Any]:
    """Encode every video and sentence of a `data.datasets.VideoTextEval` and score them.

    `video_encoder(video, frame_mask) -> B x E` and `text_encoder(tokens) -> B x E` (e.g. the pair
    `VideoTextRetrieval.deployed()` returns); `tokenize(list[str]) -> {input_ids, attention_mask}`.
    Each video is encoded once and each sentence once (CLIP4Clip's multi-sentence `eval_epoch`
    encodes a video only at its cut-off point, which is the same). Returns (metrics, the
    `texts x videos` cosine similarity matrix as a float numpy array)."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from mdpd_vl.data.collate import Collator

    modes = [m.training for m in (video_encoder, text_encoder)]
    video_encoder.eval()
    text_encoder.eval()
    videos, texts = [], []
    loader = DataLoader(eval_set.videos, batch_size=batch_size, num_workers=num_workers,
                        collate_fn=Collator(None, None))
    with torch.no_grad():
        for batch in loader:
            v = video_encoder(batch["video"].to(device), batch["frame_mask"].to(device))
            videos.append(F.normalize(v.float(), dim=-1).cpu())
        caps = eval_set.captions
        for i in range(0, len(caps), batch_size):
            tokens = {k: v.to(device) for k, v in tokenize(caps[i:i + batch_size]).items()}
            texts.append(F.normalize(text_encoder(tokens).float(), dim=-1).cpu())
    for module, mode in zip((video_encoder, text_encoder), modes, strict=True):
        module.train(mode)
    sims = (torch.cat(texts) @ torch.cat(videos).t()).numpy()
    return evaluate_vtr(sims, eval_set.caption_to_video, multi_sentence), sims
