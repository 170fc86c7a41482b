"""Video-text retrieval as deployed: a per-frame video encoder + similarity head, a text encoder, and
the preprocessing they were evaluated with.

`VideoTextRetriever` holds the video encoder (`heads.clip4clip.VideoEncoder`: a frame encoder =
backbone + CLIP projection head, for MDPD the faded one, run on every valid frame, then the
similarity head `meanP` / `seqTransf`) and the text encoder (backbone + projection head), with the
evaluation's preprocessing: the frame sampling (CLIP4Clip's frames per second, `linspace` slice,
`max_frames`, what happens to a short video), the per-frame image transform (side, mean, std),
the text backbone's tokenizer and maximum length, and the batch size. `encode_videos(list of video
files)` and `encode_texts(list of str)` return L2-normalised embeddings, so
`encode_texts(t) @ encode_videos(v).T` are the similarities the run's metrics were computed from.
The VTR recipe evaluates its deployed model through this very class and the export stores the same
settings, so a reloaded export reproduces the metrics.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mdpd_vl.deploy.retrieval import build_image_transform, encode_batches, image_preprocess

VideoLike = str | Path
SIM_WEIGHTS = "model.safetensors"
SIM_CONFIG = "config.json"
SIM_FORMAT = "mdpd_vl.head"


def video_preprocess(sampling: Any, image_size: int | None, image_backbone: Any, max_length: int,
                     batch_size: int, backend: str = "auto") -> dict[str, Any]:
    """The preprocessing record of an evaluation: frame sampling (a `data.video.FrameSampling`),
    decoder backend, per-frame image preprocessing at `image_size` (None: the backbone's own),
    tokenizer maximum length and batch size."""
    return {"frames": asdict(sampling), "backend": backend, "image": image_preprocess(image_size, image_backbone),
            "text": {"max_length": int(max_length)}, "batch_size": int(batch_size)}


class VideoTextRetriever(nn.Module):
    """A video encoder + a text encoder + preprocessing; `encode_videos`, `encode_texts`, `similarity`.

    `video` is a `VideoEncoder` (`video.frame_encoder` a backbone + head, `video.sim` the similarity
    head); `text` a backbone + head. The backbones (for the frame transform and the tokenizer)
    default to `video.frame_encoder.backbone` and `text.backbone`. `frame_cache` (an
    `data.cache.ArrayCache`, optional, never exported) keeps decoded frames between calls."""

    task = "vtr"

    def __init__(self, video: nn.Module, text: nn.Module, preprocess: dict[str, Any],
                 image_backbone: Any = None, text_backbone: Any = None, frame_cache: Any = None):
        super().__init__()
        self.video, self.text, self.preprocess = video, text, preprocess
        self._image_backbone = image_backbone if image_backbone is not None else video.frame_encoder.backbone
        self._text_backbone = text_backbone if text_backbone is not None else text.backbone
        self.frame_cache = frame_cache
        self._transform: Any = None

    @property
    def image_backbone(self) -> Any:
        return self._image_backbone

    @property
    def text_backbone(self) -> Any:
        return self._text_backbone

    @property
    def sampling(self) -> Any:
        """The evaluation's frame sampling (`data.video.FrameSampling`)."""
        from mdpd_vl.data.video import FrameSampling

        return FrameSampling(**self.preprocess["frames"])

    @property
    def frame_transform(self) -> Any:
        """The evaluation's PIL -> tensor transform, applied to every sampled frame."""
        if self._transform is None:
            self._transform = build_image_transform(self.preprocess["image"], self._image_backbone)
        return self._transform

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """Token ids + attention mask with the evaluation's tokenizer and maximum length."""
        return self._text_backbone.tokenize(list(texts), max_length=self.preprocess["text"]["max_length"])

    def _batch_size(self, given: int | None) -> int:
        return int(given or self.preprocess.get("batch_size") or 16)

    def frames(self, video: VideoLike) -> Tensor:
        """`T x 3 x H x W`: the sampled frames of one video file, decoded (decord, else PyAV) and
        transformed as the evaluation did; an unreadable file raises OSError."""
        from mdpd_vl.data.transforms import frames_to_tensor
        from mdpd_vl.data.video import read_clip

        clip = read_clip(video, self.sampling, backend=self.preprocess.get("backend", "auto"), cache=self.frame_cache)
        return frames_to_tensor(clip.frames, self.frame_transform)

    def video_inputs(self, videos: Sequence[VideoLike], batch_size: int | None = None) -> Iterator[dict[str, Tensor]]:
        """The video encoder's input batches in order, `{"video": B x T x 3 x H x W, "frame_mask": B x T}`
        (time padded with zeros, masked): what `encode_videos` runs."""
        from mdpd_vl.data.collate import pad_stack

        bs, items = self._batch_size(batch_size), list(videos)
        for i in range(0, len(items), bs):
            video, mask = pad_stack([self.frames(v) for v in items[i:i + bs]])
            yield {"video": video, "frame_mask": mask}

    def text_inputs(self, texts: Sequence[str], batch_size: int | None = None) -> Iterator[dict[str, Tensor]]:
        """The text encoder's input batches (token ids + mask), in order: what `encode_texts` runs."""
        bs, items = self._batch_size(batch_size), list(texts)
        return (self.tokenize(items[i:i + bs]) for i in range(0, len(items), bs))

    def encode_videos(self, videos: Sequence[VideoLike] | dict[str, Tensor], batch_size: int | None = None) -> Tensor:
        """L2-normalised video embeddings (`N x D`, float32, CPU) of video files, or of one ready batch
        `{"video", "frame_mask"}`."""
        if isinstance(videos, dict):
            return encode_batches(self.video, [videos])
        return encode_batches(self.video, self.video_inputs(videos, batch_size))

    def encode_texts(self, texts: Sequence[str], batch_size: int | None = None) -> Tensor:
        """L2-normalised sentence embeddings (`N x D`, float32, CPU)."""
        return encode_batches(self.text, self.text_inputs(texts, batch_size))

    def similarity(self, videos: Sequence[VideoLike], texts: Sequence[str]) -> Tensor:
        """Cosine similarities, videos x texts."""
        return self.encode_videos(videos) @ self.encode_texts(texts).t()

    # -- export ---------------------------------------------------------------------------------
    def exportable(self) -> bool:
        """The frame and text encoders are plain backbone + head (faded MDPD, merged LoRA, head-only
        methods) and the similarity head can be rebuilt from its spec."""
        from mdpd_vl.export import is_plain

        return is_plain(self.video.frame_encoder) and is_plain(self.text) and hasattr(self.video.sim, "spec")

    def export_parts(self, folder: Path) -> dict[str, Any]:
        """Write `video/` (frame encoder), `text/` (plain backbone + head each) and `sim/` (the similarity
        head's spec + weights); return what config.json records."""
        from safetensors.torch import save_model

        from mdpd_vl.atomic import tensor_bytes, write_text, write_with
        from mdpd_vl.export import export_faded, head_spec

        if not self.exportable():
            raise TypeError("only plain backbone + head encoders are exported (see exportable())")
        for name, module in (("video", self.video.frame_encoder), ("text", self.text)):
            export_faded(module, folder / name, extra_config={"task": self.task, "tower": name})
        sim = folder / "sim"
        sim.mkdir(parents=True, exist_ok=True)
        write_with(sim / SIM_WEIGHTS, lambda tmp: save_model(self.video.sim, tmp), tensor_bytes(self.video.sim))
        write_text(sim / SIM_CONFIG, json.dumps({"format": SIM_FORMAT, "head": head_spec(self.video.sim)}, indent=2))
        return {"parts": {"video": "video", "text": "text", "sim": "sim"}, "preprocess": self.preprocess}

    @classmethod
    def from_export(cls, folder: Path, config: dict[str, Any]) -> VideoTextRetriever:
        """Rebuild from an export folder (see `export_parts`)."""
        from safetensors.torch import load_model

        from mdpd_vl.errors import UserError
        from mdpd_vl.export import build_head, load_faded
        from mdpd_vl.heads.clip4clip import VideoEncoder

        parts = config["parts"]
        sim_dir = folder / parts["sim"]
        where = str(sim_dir / SIM_CONFIG)
        try:
            spec = json.loads((sim_dir / SIM_CONFIG).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise UserError(f"not a readable similarity-head config ({err})", where=where) from None
        if not isinstance(spec, dict) or spec.get("format") != SIM_FORMAT or not isinstance(spec.get("head"), dict):
            raise UserError(f"format is not {SIM_FORMAT!r}", where=where, field="format")
        sim = build_head(spec["head"], where)
        load_model(sim, str(sim_dir / SIM_WEIGHTS), strict=True)
        video = VideoEncoder(load_faded(folder / parts["video"]), sim)
        return cls(video, load_faded(folder / parts["text"]), config["preprocess"]).eval()


@torch.no_grad()
def frozen_video_inputs(backbone: Any, batches: Any) -> list[dict[str, Any]]:
    """Per-layer features of the valid frames of every video batch (`{"video", "frame_mask"}`), computed
    once by the frozen `backbone` in eval mode: batches that a `VideoEncoder` over that backbone reads
    as it reads the frames themselves (`heads.clip4clip.frames_of` passes features through)."""
    from mdpd_vl.backbones.base import Precomputed
    from mdpd_vl.heads.clip4clip import frames_of

    was = backbone.training
    backbone.eval()
    try:
        with_input = getattr(backbone, "input_spec", None) is not None  # side networks may read b_0
        out = []
        for batch in batches:
            frames = frames_of(batch["video"], batch["frame_mask"])
            out.append({"video": Precomputed(list(backbone.features(frames, with_input=with_input)), None),
                        "frame_mask": batch["frame_mask"]})
        return out
    finally:
        backbone.train(was)
