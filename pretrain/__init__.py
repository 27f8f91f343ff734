"""Pretraining: backbones, saliency, masking, SSL objectives, the training loop and the checkpoint format.

This is the lower layer of the suite; it never imports :mod:`transfer`.
"""

__version__ = "0.1.0"
