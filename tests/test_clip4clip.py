"""CLIP4Clip heads (heads/clip4clip.py): meanP / seqTransf shapes and masks, seqTransf's init from a
text tower, CLIP's projection head, the symmetric loss on a hand-worked case, the logit scale."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny_bert

from mdpd_vl.errors import UserError
from mdpd_vl.heads import clip4clip as C

TINY_CLIP = dict(embed_dim=16, vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=2, head_width=16),
                 text_cfg=dict(context_length=8, vocab_size=64, width=16, heads=2, layers=2))


def tiny_clip_text():
    from mdpd_vl.backbones.open_clip import OpenClipText

    torch.manual_seed(0)
    return OpenClipText("ViT-B-32", **TINY_CLIP)


def frames_and_mask(b: int = 3, t: int = 5, d: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[0, 3:] = False
    mask[2, 1:] = False  # a one-frame video
    return torch.randn(b, t, d), mask


def test_meanp_is_the_masked_mean_of_normalised_frames_and_ignores_padding():
    x, mask = frames_and_mask()
    out = C.MeanP()(x, mask)
    assert out.shape == (3, 16) and torch.allclose(out.norm(dim=-1), torch.ones(3))
    by_hand = F.normalize(F.normalize(x[0, :3], dim=-1).mean(0), dim=0)
    assert torch.allclose(out[0], by_hand, atol=1e-6)
    assert torch.allclose(out[2], F.normalize(x[2, 0], dim=0), atol=1e-6)
    garbage = x.clone()
    garbage[~mask] = torch.randn(int((~mask).sum()), 16) * 100
    assert torch.equal(C.MeanP()(garbage, mask), out)
    assert torch.allclose(C.MeanP()(x, None), C.MeanP()(x, torch.ones(3, 5, dtype=torch.bool)))
    assert torch.allclose(C.MeanP()(x.flip(1), mask.flip(1)), out, atol=1e-6)  # order-free


def test_seq_transf_shapes_masks_and_order():
    torch.manual_seed(1)
    head = C.SeqTransf(16, layers=2, heads=2, max_positions=8).eval()
    x, mask = frames_and_mask()
    out = head(x, mask)
    assert out.shape == (3, 16) and torch.allclose(out.norm(dim=-1), torch.ones(3))
    garbage = x.clone()
    garbage[~mask] = torch.randn(int((~mask).sum()), 16) * 100
    assert torch.allclose(head(garbage, mask), out, atol=1e-5)  # a padded frame changes nothing
    # a video padded by one more frame gives the same embedding
    longer = torch.cat([x, torch.randn(3, 1, 16)], dim=1)
    assert torch.allclose(head(longer, torch.cat([mask, torch.zeros(3, 1, dtype=torch.bool)], 1)), out, atol=1e-5)
    # unlike meanP, frame order matters (position embeddings)
    assert not torch.allclose(head(x[1:2].flip(1), None), head(x[1:2], None), atol=1e-4)
    with pytest.raises(ValueError, match="frame positions"):
        head(torch.randn(1, 9, 16))
    assert head.spec() == {"target": "mdpd_vl.heads.clip4clip:SeqTransf",
                           "kwargs": {"width": 16, "layers": 2, "heads": 2, "max_positions": 8, "act": "quick_gelu"}}


def test_seq_transf_adds_positions_and_the_residual():
    head = C.SeqTransf(16, layers=3, heads=4, max_positions=8)
    for block in head.blocks:  # blocks that add nothing: temporal(x) = (x + pos) + x
        for lin in (block.attn.out_proj, block.mlp.c_proj):
            torch.nn.init.zeros_(lin.weight)
            torch.nn.init.zeros_(lin.bias)
    x = torch.randn(2, 5, 16)
    pos = head.frame_position_embeddings.weight[:5]
    assert torch.allclose(head.temporal(x), 2 * x + pos, atol=1e-6)


def test_seq_transf_init_follows_clip4clip():
    head = C.SeqTransf(16, layers=4, heads=2)
    assert torch.all(head.blocks[0].ln_1.weight == 1) and torch.all(head.blocks[0].mlp.c_fc.bias == 0)
    std = head.blocks[0].mlp.c_fc.weight.std().item()
    assert 0.015 < std < 0.025  # N(0, 0.02)
    assert C.SeqTransf(128).spec()["kwargs"]["heads"] == 2  # width // 64


def test_seq_transf_copies_the_text_layers_where_shapes_match():
    text = tiny_clip_text()  # width 16, 2 heads, 2 blocks, context 8, nn.GELU
    head = C.SeqTransf(16, layers=4, heads=2, max_positions=77)
    untouched = {k: v.clone() for k, v in head.blocks[3].state_dict().items()}
    report = C.init_seq_transf_from_text(head, text.blocks, text.model.positional_embedding)
    assert report == {"layers": 2, "positions": 8}
    for i in range(2):
        src = text.blocks[i].state_dict()
        for k, v in head.blocks[i].state_dict().items():
            assert torch.equal(v, src[k]), (i, k)
    assert all(torch.equal(v, untouched[k]) for k, v in head.blocks[3].state_dict().items())
    assert torch.equal(head.frame_position_embeddings.weight[:8], text.model.positional_embedding.detach())
    assert head.spec()["kwargs"]["act"] == "gelu" and isinstance(head.blocks[3].mlp.gelu, torch.nn.GELU)
    # the copied block computes what the text block computes (same activation, same attention)
    x = torch.randn(2, 5, 16)
    assert torch.allclose(head.blocks[1](x), text.blocks[1](x), atol=1e-5)

    assert C.init_seq_transf_from_text(C.SeqTransf(32, heads=2), text.blocks, text.model.positional_embedding) \
        == {"layers": 0, "positions": 0}  # other width
    assert C.init_seq_transf_from_text(C.SeqTransf(16, heads=4), text.blocks)["layers"] == 0  # other heads
    bert = build_tiny_bert()  # BERT layers: other names, nothing to copy
    assert C.init_seq_transf_from_text(C.SeqTransf(32, heads=2), bert.blocks)["layers"] == 0


def test_sim_head_registry_names_the_valid_heads():
    assert isinstance(C.build_sim_head("meanP", 8), C.MeanP)
    assert isinstance(C.build_sim_head("seqTransf", 8, layers=1, heads=2), C.SeqTransf)
    with pytest.raises(UserError, match="sim: unknown similarity head 'tightTransf'; valid: meanP, seqTransf"):
        C.build_sim_head("tightTransf", 8)


def test_projection_head_reproduces_clip_towers_after_init():
    from mdpd_vl.backbones.open_clip import OpenClipImage

    torch.manual_seed(0)
    image = OpenClipImage("ViT-B-32", **TINY_CLIP).eval()
    head = C.ProjectionHead(32, 16, "cls")
    assert C.init_projection_from(head, image.model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(head(image.features(x)[-1]), image.output(x), atol=1e-5)

    text = tiny_clip_text().eval()
    ids = torch.tensor([[5, 9, 63, 0, 0, 0, 0, 0], [7, 3, 4, 8, 63, 0, 0, 0]])  # EOT (max id) last, then pads
    tokens = {"input_ids": ids, "attention_mask": (ids != 0).long()}
    thead = C.ProjectionHead(16, 16, "last")
    assert C.init_projection_from(thead, text.model)
    with torch.no_grad():
        assert torch.allclose(thead(text.features(tokens)[-1], text.padding_mask(tokens)), text.output(tokens), atol=1e-5)
    assert not C.init_projection_from(C.ProjectionHead(32, 8), image.model)  # other shape: left alone
    assert not C.init_projection_from(C.ProjectionHead(32, 16), torch.nn.Linear(2, 2))


def test_projection_head_pools():
    tokens = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert C.ProjectionHead(1, 1, "cls").pooled(tokens, mask).tolist() == [[0.0], [4.0]]
    assert C.ProjectionHead(1, 1, "last").pooled(tokens, mask).tolist() == [[1.0], [7.0]]
    assert C.ProjectionHead(1, 1, "mean").pooled(tokens, mask).tolist() == [[0.5], [5.5]]
    with pytest.raises(ValueError, match="pool"):
        C.ProjectionHead(1, 1, "max")


def test_symmetric_cross_entropy_hand_worked():
    logits = torch.tensor([[2.0, 0.0],
                           [1.0, 3.0]])  # rows: texts, columns: videos
    # text rows: -log(e^2 / (e^2 + 1)) = log(1 + e^-2); -log(e^3 / (e + e^3)) = log(1 + e^-2)
    # video columns: [2, 1] -> log(1 + e^-1); [0, 3] -> log(1 + e^-3)
    t2v = math.log(1 + math.exp(-2))
    v2t = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(-3))) / 2
    assert C.symmetric_cross_entropy(logits).item() == pytest.approx((t2v + v2t) / 2, abs=1e-6)
    # = CLIP4Clip's CrossEn: mean of -diag(log_softmax(S)), for S and S^T
    target = torch.arange(2)
    ref = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
    assert torch.allclose(C.symmetric_cross_entropy(logits), ref)
    # ignoring an entry removes it from both softmaxes
    ignore = torch.tensor([[False, False], [True, False]])
    expect = (math.log(1 + math.exp(-2)) + 0.0) / 2 / 2 + (0.0 + math.log(1 + math.exp(-3))) / 2 / 2
    assert C.symmetric_cross_entropy(logits, ignore).item() == pytest.approx(expect, abs=1e-6)
    with pytest.raises(ValueError, match="square"):
        C.symmetric_cross_entropy(torch.zeros(2, 3))


def test_logit_scale_clip_init_and_clamp():
    scale = C.LogitScale()
    assert scale.value.item() == pytest.approx(math.log(1 / 0.07)) and scale().item() == pytest.approx(1 / 0.07)
    with torch.no_grad():
        scale.value.fill_(6.0)
    scale.clamp_()
    assert scale.value.item() == pytest.approx(math.log(100)) and scale().item() == pytest.approx(100.0)
    text, video = torch.randn(3, 8), torch.randn(3, 8)
    loss = C.symmetric_cross_entropy(C.similarity_logits(text, video, scale()))
    loss.backward()
    assert scale.value.grad is not None and scale.value.grad.abs() > 0
    with pytest.raises(ValueError, match="exceeds"):
        C.LogitScale(5.0, 4.0)


def test_frames_round_trip_and_video_encoder_skips_padding():
    video = torch.randn(2, 3, 4)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    flat = C.frames_of(video, mask)
    assert flat.shape == (3, 4) and torch.equal(flat[2], video[1, 0])
    back = C.scatter_frames(flat, mask, (2, 3))
    assert torch.equal(back[mask], video[mask]) and torch.all(back[~mask] == 0)

    calls = []

    class Recorder(torch.nn.Module):
        def forward(self, x):
            calls.append(len(x))
            return x * 2

    enc = C.VideoEncoder(Recorder(), C.MeanP())
    out = enc({"video": video, "frame_mask": mask})
    assert calls == [3]  # only the 3 valid frames are encoded
    assert torch.allclose(out, C.MeanP()(video * 2, mask))
