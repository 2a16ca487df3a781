"""FMbSeg Stage 1: pseudo labels from CLIP + SAM (paper §3.2, appendix §1), the pipeline over a
shard of images, their sharded storage, resumable shard planning, and the Stage 1.1 / 1.2 balance
of the training index.

Import from the modules (``components.labelling.stage1``, ``.store``, ``.shard``, ...): the package
re-exports nothing, so its light modules (``settings``: plain values) import without torch.
"""
