"""Quantizers: one method per file, each a :class:`kvtool.transforms.TensorTransform`."""

from kvtool.quantizers.float_cast import FloatCast
from kvtool.quantizers.fp8 import Fp8Quantizer
from kvtool.quantizers.nonuniform import NonUniformQuantizer
from kvtool.quantizers.nvfp4 import Nvfp4Quantizer
from kvtool.quantizers.projection import ProjectionQuantizer
from kvtool.quantizers.uniform import UniformQuantizer

__all__ = [
    "FloatCast",
    "Fp8Quantizer",
    "NonUniformQuantizer",
    "Nvfp4Quantizer",
    "ProjectionQuantizer",
    "UniformQuantizer",
]
