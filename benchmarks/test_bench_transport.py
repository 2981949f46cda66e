"""One client's coding in one round of a FedDIP run at its target sparsity, LeNet-5 (MNIST), the
whole exchange: the server's message down, the client's decoding of it, the client's reply and the
server's decoding of that. The paper recipe's coding (the baseline: values fp16 under the shared
mask, `--preset paper --values feddip=fp16`) against the compact transport (protocol.transport,
`--preset compact`: int4-ans deltas from what the other end holds, the quantisation error fed back
on both ends).

The model: LeNet-5's 10 tensors (61,706 floats), weights He-initialised and pruned by global
magnitude to 5% (biases dense), as the server holds it; the global model moves by 1% of each kept
weight's size a round, and the client's trained model by as much again on every weight (error
feedback trains the dense weights; what falls outside the mask is not sent). Each timed call
starts from the same state (a client that holds last round's model and residual).

Rows: "recipe fp16" (the baseline) and "compact int4-ans"; extra `bytes_a_client` (message bytes
down + up). The interleaved row gives the compact coding's time over the recipe's as the median of
round-by-round ratios: the compact coding's cost to a round, which `feddip simulate` adds per
client (target: at most the recipe's, issue 27's wall time).
"""

from __future__ import annotations

import statistics

import numpy as np

import feddip_kernels as fk
from feddip_kernels.protocol import ClientEnd, ServerEnd
from feddip_kernels.protocol.server import apply_mask

from .conftest import alternating

# LeNet-5 for 1x28x28 inputs, as fl.models.LeNet5 names and shapes its tensors.
LENET5 = {
    "features.0.weight": (6, 1, 5, 5), "features.0.bias": (6,),
    "features.3.weight": (16, 6, 5, 5), "features.3.bias": (16,),
    "classifier.1.weight": (120, 400), "classifier.1.bias": (120,),
    "classifier.3.weight": (84, 120), "classifier.3.bias": (84,),
    "classifier.5.weight": (10, 84), "classifier.5.bias": (10,),
}
DENSITY = 0.05
GROUP = "one client's coding a round, LeNet-5 at 95% sparsity (down, decode, reply, decode)"


class Round:
    """A client's round of both codings from the same state; call recipe() or compact()."""

    def __init__(self, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        init = {k: (rng.standard_normal(s) * np.sqrt(2.0 / np.prod(s[1:] or (1,)))).astype(np.float32)
                for k, s in LENET5.items()}
        weights = [k for k, s in LENET5.items() if len(s) > 1]
        mags = np.concatenate([np.abs(init[k]).ravel() for k in weights])
        cut = np.sort(mags)[mags.size - int(DENSITY * mags.size)]
        self.masks = {k: np.abs(init[k]) >= cut for k in weights}
        held = {k: apply_mask(v, self.masks[k]) if k in self.masks else v for k, v in init.items()}

        def step(model: dict[str, np.ndarray], masked: bool) -> dict[str, np.ndarray]:
            out = {}
            for k, v in model.items():
                moved = v + (np.float32(0.01) * np.abs(v).mean() * rng.standard_normal(v.shape)).astype(np.float32)
                out[k] = apply_mask(moved, self.masks[k]) if masked and k in self.masks else moved
            return out

        # Last round: the server sent `held`, the client trained and replied (its residual set).
        self.server = ServerEnd(init, values="int4-ans")
        self.client = ClientEnd(0, values="int4-ans", build=lambda _: init)
        self.client.receive(self.server.downlink(0, held, self.masks, None, 0)[0], masked=list(self.masks))
        self.server.uplink(0, self.client.reply(step(self.client.held, False), 0), self.masks)
        self.state = (dict(self.server.held[0]), self.client.held, self.client.masks, self.client.residual)
        # This round: the global model moved; the client trains from what it receives.
        self.weights = step(self.server.held[0], True)
        self.local = step(self.weights, False)
        self.bytes = {"recipe": len(self.recipe()), "compact": len(self.compact())}

    def recipe(self) -> bytes:
        down = fk.encode_model(self.weights, masks=self.masks, reference=self.masks, values="fp16")
        fk.decode_model(down, reference=self.masks)
        up = fk.encode_model(self.local, masks=self.masks, reference=self.masks, values="fp16")
        fk.decode_model(up, reference=self.masks)
        return down + up

    def compact(self) -> bytes:
        self.server.held[0] = dict(self.state[0])
        self.client.held, self.client.masks, self.client.residual = self.state[1:]
        down = self.server.downlink(0, self.weights, self.masks, self.masks, 1)[0]
        self.client.receive(down, masked=list(self.masks))
        up = self.client.reply(self.local, 1)
        self.server.uplink(0, up, self.masks)
        return down + up


DENSE = 4 * sum(int(np.prod(s)) for s in LENET5.values())


def test_recipe_coding(record):
    r = Round()
    record(r.recipe, group=GROUP, name="recipe fp16 (paper preset)", dense_bytes=DENSE, baseline=True,
           bytes_a_client=r.bytes["recipe"])


def test_compact_coding(record):
    r = Round()
    record(r.compact, group=GROUP, name="compact int4-ans (compact preset)", dense_bytes=DENSE,
           bytes_a_client=r.bytes["compact"])


def test_compact_over_recipe_interleaved(record, benchmark):
    """The compact coding's time over the recipe's, round by round (one of each a round, in a
    random order)."""
    r = Round()
    round_, times = alternating({"recipe": r.recipe, "compact": r.compact}, seed=3)

    def ratios() -> dict[str, float]:
        pairs = [c / p for c, p in zip(times["compact"], times["recipe"])]
        return {"rounds": len(pairs), "compact_over_recipe": statistics.median(pairs),
                "ms_recipe": 1e3 * statistics.median(times["recipe"]),
                "ms_compact": 1e3 * statistics.median(times["compact"])}

    record(round_, group=GROUP, name="interleaved: both codings a round", dense_bytes=2 * DENSE, ratios_of=ratios,
           rounds=None if benchmark.disabled else 400)
    got = ratios()
    assert got["rounds"] >= 1 and got["ms_compact"] > 0
    # The compact coding sends a fraction of the recipe's bytes (the reason for its time).
    assert r.bytes["compact"] * 2 < r.bytes["recipe"]
