"""Transfer evaluation: checkpoint conversion, Detectron2 detection/segmentation, linear evaluation,
results records and the paper's tables. Builds on :mod:`pretrain`.

Importing this package is light (no detectron2); detectron2 is imported, through
:mod:`transfer.d2compat`, only by the modules that need it.
"""
