"""SAM 3 as a concept teacher: one vision pass per image, one text pass per vocabulary, concept
prompts decoded in chunks against the cached features.

transformers ``Sam3Model`` runs its detector (DETR encoder + decoder, presence token, mask decoder)
once per (image, concept); its vision backbone and text encoder do not depend on each other. So
:class:`Sam3Teacher` splits the model where its own API does (``get_vision_features`` /
``get_text_features``, then ``forward(vision_embeds=..., text_embeds=...)``):

- :meth:`Sam3Teacher.encode_vocabulary` tokenises and encodes every prompt once; the result is
  cached per prompt tuple and reused for every image of a run;
- :meth:`Sam3Teacher.encode_image` runs the backbone and FPN once per image;
- :meth:`Sam3Teacher.decode` runs the detector for a chunk of prompts, the image's features
  broadcast over the chunk (``expand``, no copy), so memory grows with the chunk size, never with
  the vocabulary.

Frames: SAM 3 sees the image resized (bilinear, aspect ratio not kept) to ``image_size``²
(1008 for ``facebook/sam3``), normalised with mean = std = 0.5; its masks and semantic map come at
a quarter of that side (288²). Text: CLIP's byte-pair encoding, 32 tokens, zero-padded, attention
mask on the non-pad tokens (open_clip's ``SimpleTokenizer`` is the same BPE as SAM 3's
``CLIPTokenizer``; only the pad id differs, and padded tokens are masked out).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import Sam3Model
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

__all__ = [
    "SAM3_MEAN",
    "SAM3_STD",
    "SAM3_CONTEXT",
    "ConceptVocabulary",
    "ConceptOutputs",
    "Sam3Teacher",
]

SAM3_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
SAM3_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)
SAM3_CONTEXT = 32  # tokens per concept prompt (facebook/sam3's text max_position_embeddings)


class ConceptVocabulary(NamedTuple):
    """Encoded concept prompts. features: [K, L, D] float (the detector's prompt tokens); mask:
    [K, L] bool, True on real tokens; prompts: the K texts, in order."""

    prompts: tuple[str, ...]
    features: Tensor
    mask: Tensor


class ConceptOutputs(NamedTuple):
    """The detector's raw outputs for C prompts on one image (logits, before any sigmoid).

    presence: [C] image-level "is this concept here"; semantic: [C, h, w] per-pixel map;
    instance_logits: [C, Q] per query; instance_masks: [C, Q, h, w] per query. h = w = a quarter
    of the model's input side.
    """

    presence: Tensor
    semantic: Tensor
    instance_logits: Tensor
    instance_masks: Tensor


class Sam3Teacher:
    """A frozen ``Sam3Model`` with cached vocabulary features (see the module docstring).

    tokenizer: list[str] -> LongTensor [N, SAM3_CONTEXT], zero-padded.
    """

    def __init__(
        self,
        model: Sam3Model,
        tokenizer: Callable[[list[str]], Tensor],
        *,
        image_size: int,
        mean: Sequence[float] = SAM3_MEAN,
        std: Sequence[float] = SAM3_STD,
    ) -> None:
        if not isinstance(model, Sam3Model):
            raise TypeError(f"expected a transformers Sam3Model, got {type(model).__name__}")
        self.model = model
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.mean = tuple(mean)
        self.std = tuple(std)
        self._vocabularies: dict[tuple[str, ...], ConceptVocabulary] = {}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def encode_vocabulary(self, prompts: Sequence[str], batch: int = 64) -> ConceptVocabulary:
        """The prompts' detector tokens, computed once per prompt tuple (``batch`` prompts a pass)."""
        key = tuple(prompts)
        if not key:
            raise ValueError("a concept vocabulary needs at least one prompt")
        cached = self._vocabularies.get(key)
        if cached is not None:
            return cached
        features, masks = [], []
        for start in range(0, len(key), batch):
            ids = self.tokenizer(list(key[start : start + batch])).to(self.device)
            mask = ids != 0
            out = self.model.get_text_features(input_ids=ids, attention_mask=mask.long(), return_dict=True)
            features.append(out.pooler_output)
            masks.append(mask)
        vocabulary = ConceptVocabulary(key, torch.cat(features), torch.cat(masks))
        self._vocabularies[key] = vocabulary
        return vocabulary

    def preprocess(self, image: np.ndarray) -> Tensor:
        """[H, W, 3] uint8 RGB -> [1, 3, S, S] float: bilinear resize to the model's side, mean/std."""
        pixels = torch.as_tensor(np.ascontiguousarray(image))
        if pixels.dtype != torch.uint8 or pixels.ndim != 3 or pixels.shape[-1] != 3:
            raise ValueError(f"image must be [H, W, 3] uint8 RGB, got {tuple(pixels.shape)} {pixels.dtype}")
        x = pixels.to(self.device).permute(2, 0, 1)[None].float().div_(255.0)
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.inference_mode()
    def encode_image(self, image: np.ndarray) -> Sam3VisionEncoderOutput:
        """The backbone + FPN features of one image (batch 1), computed once and reused by every chunk."""
        return self.model.get_vision_features(pixel_values=self.preprocess(image))

    @torch.inference_mode()
    def decode(self, vision: Sam3VisionEncoderOutput, vocabulary: ConceptVocabulary, index: Tensor) -> ConceptOutputs:
        """The detector on prompts ``index`` ([C] long) of ``vocabulary`` against one image's features."""
        chunk = int(index.numel())
        if chunk == 0:
            raise ValueError("decode needs at least one prompt")
        index = index.to(vocabulary.features.device)
        broadcast = Sam3VisionEncoderOutput(
            fpn_hidden_states=tuple(t.expand(chunk, *t.shape[1:]) for t in vision.fpn_hidden_states),
            fpn_position_encoding=tuple(t.expand(chunk, *t.shape[1:]) for t in vision.fpn_position_encoding),
        )
        text = BaseModelOutputWithPooling(pooler_output=vocabulary.features[index])
        out = self.model(
            vision_embeds=broadcast, text_embeds=text, attention_mask=vocabulary.mask[index].long()
        )
        return ConceptOutputs(
            presence=out.presence_logits[:, 0].float(),
            semantic=out.semantic_seg[:, 0].float(),
            instance_logits=out.pred_logits.float(),
            instance_masks=out.pred_masks.float(),
        )

    def iter_chunks(
        self, vision: Sam3VisionEncoderOutput, vocabulary: ConceptVocabulary, prompts: Tensor, chunk_size: int
    ) -> Iterator[tuple[Tensor, ConceptOutputs]]:
        """(prompt indices [C], their outputs) for ``prompts`` ([P] long) in chunks of ``chunk_size``."""
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        for start in range(0, int(prompts.numel()), chunk_size):
            index = prompts[start : start + chunk_size]
            yield index, self.decode(vision, vocabulary, index)
