"""holdall's quantization core: schemes, codebooks, packing, quantizers, packed tensors and layers.

Needs only torch. Everything above (algorithms, formats, evaluation) builds on these names.
"""

from .backends import available_backends, register_backend, select_backend, unregister_backend, use_backend
from .codebooks import dynamic_map, fp4_codebook, nf4_codebook
from .linear import QuantLinear
from .packing import pack, packed_size, unpack
from .qtensor import QuantizedTensor, tensor_specs
from .scheme import QuantScheme

__all__ = [
    "QuantLinear",
    "QuantScheme",
    "QuantizedTensor",
    "available_backends",
    "dynamic_map",
    "fp4_codebook",
    "nf4_codebook",
    "pack",
    "packed_size",
    "register_backend",
    "select_backend",
    "tensor_specs",
    "unpack",
    "unregister_backend",
    "use_backend",
]
