"""The FedDIP protocol as its authors run it (docs/protocol.md), in NumPy alone: the schedules
(`schedules`: cubic sparsity ramp, incremental lambda) and the server side (`server`: round-0 ERK
masks, aggregation, nested global magnitude pruning). `feddip simulate` and the Flower strategy
both drive this one implementation; the kernels it runs on are the library's (pruning)."""

from .schedules import lambda_schedule, sparsity_schedule
from .server import FedDIPServer, Schedule, apply_mask, random_erk_masks, seed_for

__all__ = ["FedDIPServer", "Schedule", "apply_mask", "lambda_schedule", "random_erk_masks", "seed_for",
           "sparsity_schedule"]
