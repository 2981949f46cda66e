"""Moved: feddip_kernels.protocol.server (the FedDIP protocol's package). This name still imports,
with a DeprecationWarning, for a release."""

import warnings

from .protocol.server import *  # noqa: F401,F403

warnings.warn("feddip_kernels.server moved to feddip_kernels.protocol.server (or feddip_kernels.protocol)",
              DeprecationWarning, stacklevel=2)
