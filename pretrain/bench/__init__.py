"""``python -m pretrain.bench``: what saliency-guided masking costs on top of the encoder passes (issue 9).

Three measurements, one JSON file (see ``docs/performance.md``):

* :mod:`pretrain.bench.steps`: real training steps of the real engine (:class:`pretrain.engine.Trainer`
  and the MoCo v2 method) per variant, timed per phase (:mod:`pretrain.timing`), each variant in its own
  process so its peak memory is its own;
* :mod:`pretrain.bench.masking_speed`: batched masking (:mod:`pretrain.masking`) against the per-sample,
  per-cell loop reference (:mod:`pretrain.masking_reference`) on the same draws;
* :mod:`pretrain.bench.loader_speed`: images/s of the real loader (two-crop aug+ on real JPEGs).
"""
