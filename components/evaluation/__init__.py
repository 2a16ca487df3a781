"""Evaluation math: inference over any encoder, SAM-mask refinement and label painting, mIoU.

Import from the modules (``components.evaluation.inference``, ``.metrics``, ``.refine``, ...): the
package re-exports nothing, so a light module of it imports without torch.
"""
