"""Moved: feddip_kernels.protocol.schedules (the FedDIP protocol's package). This name still imports,
with a DeprecationWarning, for a release."""

import warnings

from .protocol.schedules import *  # noqa: F401,F403

warnings.warn("feddip_kernels.schedules moved to feddip_kernels.protocol.schedules (or feddip_kernels.protocol)",
              DeprecationWarning, stacklevel=2)
