"""Moved: feddip_kernels.integrations.numcodecs (beside the other frameworks' adapters). This name
still imports, with a DeprecationWarning, for a release."""

import warnings

from ..integrations.numcodecs import SparseCodec  # noqa: F401

warnings.warn("feddip_kernels.codecs.numcodecs_adapter moved to feddip_kernels.integrations.numcodecs",
              DeprecationWarning, stacklevel=2)
