"""Evaluation: what calibrations and codecs cost in quality, size and speed, measured on a model.

:mod:`~kvtool.eval.harness` (perplexity and continuation quality), :mod:`~kvtool.eval.validation` (the held-out
check a calibration records), :mod:`~kvtool.eval.presets` (named baseline configurations), :mod:`~kvtool.eval.bench`
(the ``kvtool bench`` rows), :mod:`~kvtool.eval.codec_rows` (``.kvz`` and peer codecs as bench rows),
:mod:`~kvtool.eval.cachegen_peer` (LMCache's CacheGen) and :mod:`~kvtool.eval.rd_plot`. Dependencies point one way:
the CLI uses this wing; this wing uses the calibrators, the codecs and the methods, never the reverse.
"""
