"""feddip-kernels: fast kernels and compact codecs for federated learning with extreme sparsity."""

from ._backend import available_backends, get_num_threads, set_num_threads
from .codecs import CodecError, Decoded, decode_model, decode_stream, encode_model, encode_stream
from .integrations.numcodecs import SparseCodec
from .protocol import lambda_schedule, sparsity_schedule
from .pruning import (
    erk_densities,
    global_magnitude_threshold,
    global_topk_masks,
    k_for_density,
    max_magnitude,
    pack_mask,
    unpack_mask,
)
from .storage import load, save
from .update import masked_ef_step, masked_ef_step_many, masked_norm

__version__ = "0.1.0"

__all__ = [
    "CodecError",
    "Decoded",
    "SparseCodec",
    "available_backends",
    "decode_model",
    "decode_stream",
    "encode_model",
    "encode_stream",
    "erk_densities",
    "get_num_threads",
    "global_magnitude_threshold",
    "global_topk_masks",
    "k_for_density",
    "lambda_schedule",
    "load",
    "masked_ef_step",
    "masked_ef_step_many",
    "masked_norm",
    "max_magnitude",
    "pack_mask",
    "save",
    "set_num_threads",
    "sparsity_schedule",
    "unpack_mask",
]
