"""The FedDIP protocol as its authors run it (docs/protocol.md), in NumPy alone: the schedules
(`schedules`: cubic sparsity ramp, incremental lambda), the server side (`server`: round-0 ERK
masks, aggregation, nested global magnitude pruning) and the compact transport (`transport`:
quantised deltas against what each end holds, with error feedback). `feddip simulate` and the
Flower strategy both drive this one implementation; the kernels it runs on are the library's
(pruning)."""

from .schedules import lambda_schedule, sparsity_schedule
from .server import FedDIPServer, Schedule, apply_mask, random_erk_masks, seed_for
from .transport import ClientEnd, ServerEnd

__all__ = ["ClientEnd", "FedDIPServer", "Schedule", "ServerEnd", "apply_mask", "lambda_schedule",
           "random_erk_masks", "seed_for", "sparsity_schedule"]
