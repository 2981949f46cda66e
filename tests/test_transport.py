"""The compact transport (protocol.transport): both ends agree bit for bit on what each holds and
what each sent, however stale the client and however the masks shrink; the quantisation error is
carried, not lost; init frames; determinism."""

import numpy as np
import pytest

from feddip_kernels.codecs import CodecError
from feddip_kernels.protocol import ClientEnd, ServerEnd, apply_mask
from feddip_kernels.protocol.transport import INIT_FRAME_SIZE, _decode, init_frame, model_crc, read_init_frame

SHAPES = {"conv.weight": (6, 1, 5, 5), "conv.bias": (6,), "fc.weight": (20, 150), "fc.bias": (20,)}
PRUNABLE = ("conv.weight", "fc.weight")


def _model(rng, scale=0.1):
    return {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}


def _same(a, b):
    return a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)


def _ends(init, values="int8-ans", rounding="nearest", seed=0, **kw):
    server = ServerEnd(init, values=values, rounding=rounding, seed=seed, init_seed=1234)

    def build(s):
        assert s == 1234
        return {k: v.copy() for k, v in init.items()}

    def client(c):
        return ClientEnd(c, values=values, rounding=rounding, seed=seed, build=build, **kw)

    return server, client


def _shrink(rng, masks, density):
    """Nested masks: each keeps `density` of its tensor's positions, inside the previous ones."""
    out = {}
    for k in PRUNABLE:
        old = masks.get(k, np.ones(SHAPES[k], bool))
        score = np.where(old, rng.random(SHAPES[k]), -1.0)
        keep = int(round(density * score.size))
        flat = np.zeros(score.size, bool)
        flat[np.argsort(score, axis=None)[::-1][:keep]] = True
        out[k] = flat.reshape(SHAPES[k]) & old
    return out


def _masked(weights, masks):
    return {k: apply_mask(v, masks[k]) if k in masks else v for k, v in weights.items()}


def test_init_frame_round_trip_and_size():
    rng = np.random.default_rng(0)
    init = _model(rng)
    frame = init_frame(7, init)
    assert len(frame) == INIT_FRAME_SIZE == 21 and frame[:4] == b"FDKI"
    assert read_init_frame(frame) == (7, model_crc(init))
    for i in range(len(frame)):
        bad = bytearray(frame)
        bad[i] ^= 0x10
        with pytest.raises(CodecError):
            read_init_frame(bytes(bad))
    with pytest.raises(CodecError):
        read_init_frame(frame[:-1])
    # Round 0: the global model is the initial one and there is no mask: the frame alone.
    server, client = _ends(init)
    msg, held = server.downlink(3, init, None, None, 0)
    assert msg == server.frame and len(msg) == 21
    end = client(3)
    assert _same(end.receive(msg), held) and _same(held, init)
    # A client that builds another initial model refuses the frame; one with no frame refuses the message.
    other = ClientEnd(3, build=lambda s: _model(np.random.default_rng(1)))
    with pytest.raises(CodecError, match="CRC"):
        other.receive(msg)
    weights = _model(rng)
    msg, held = server.downlink(4, weights, None, None, 1)  # a later first contact: frame + delta
    assert msg[:21] == server.frame and len(msg) > 21
    with pytest.raises(CodecError, match="init frame"):
        ClientEnd(4).receive(msg[21:])
    assert _same(client(4).receive(msg), held)


def test_lossless_values_are_refused():
    init = _model(np.random.default_rng(0))
    for values in ("raw", "ans", "auto"):
        with pytest.raises(ValueError, match="lossy"):
            ServerEnd(init, values=values)
        with pytest.raises(ValueError, match="lossy"):
            ClientEnd(0, values=values)


def _step(values, rounding):
    """The largest error of a value, as a share of its tensor's largest |value|."""
    if values == "fp16-ans":
        return 2.0**-11
    top = 2 ** (int(values[3]) - 1) - 1
    return (1.0 if rounding == "stochastic" else 0.5) / top


@pytest.mark.parametrize("values,rounding", [("int8-ans", "nearest"), ("int4-ans", "stochastic"),
                                             ("int2-ans", "nearest"), ("fp16-ans", "nearest")])
def test_ends_stay_in_sync_with_stale_clients_and_shrinking_masks(values, rounding):
    # 8 clients, 3 a round over 40 rounds, a new nested mask every 5: clients skip rounds and miss
    # masks. Each end's copy of a client's model, and each upload as rebuilt, are the same bits;
    # what a client holds is the global model up to a step of the delta's quantisation, and what
    # it did not manage to send is its residual, exactly.
    rng = np.random.default_rng(1)
    init = _model(rng)
    server, make_client = _ends(init, values, rounding)
    step = _step(values, rounding) * 1.001
    clients = {}
    weights, masks, known = init, {}, {}
    density = 1.0
    for t in range(40):
        if t and t % 5 == 0:
            density *= 0.7
            masks = _shrink(rng, masks, density)
        if t:  # the aggregate moves
            weights = _masked({k: v + (0.02 * rng.standard_normal(v.shape)).astype(np.float32)
                               for k, v in weights.items()}, masks)
        for c in sorted(rng.choice(8, 3, replace=False).tolist()):
            before = _masked(server.held.get(c, init), masks)
            msg, held = server.downlink(c, weights, masks or None, known.get(c), t)
            end = clients.setdefault(c, make_client(c))
            assert _same(end.receive(msg, masked=list(masks)), held)
            assert _same(server.held[c], held)
            if masks:
                known[c] = masks
                assert all(not held[k][~m].any() for k, m in masks.items())
            for k, w in weights.items():
                delta = np.abs(w - before[k]).max()
                assert np.abs(held[k] - w).max() <= step * delta + 1e-6
            local = {k: v + (0.01 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in held.items()}
            carried = _masked(end.residual, masks)
            reply = end.reply(local, t)
            rebuilt = server.uplink(c, reply, masks or None)
            believed, _ = _decode(sorted(held), held, reply, masks or None)  # as the message's reader sees it
            assert _same(rebuilt, {k: held[k] + believed[k] for k in held})
            meant = _masked({k: local[k] - held[k] for k in held}, masks)
            for k in held:
                x = meant[k] + carried[k] if k in carried else meant[k]
                assert end.residual[k].tobytes() == (x - believed[k]).tobytes()
                assert np.abs(end.residual[k]).max() <= step * np.abs(x).max() + 1e-7


def test_downlink_residual_is_resent_at_the_next_contact():
    # However stale the client, the next message closes what the last one left open: with the
    # global model unchanged, a second contact leaves a far smaller error than the first.
    rng = np.random.default_rng(2)
    init = _model(rng)
    server, make_client = _ends(init, "int4-ans")
    weights = _model(rng)
    end = make_client(0)
    errors = []
    for t in range(4):
        msg, held = server.downlink(0, weights, None, None, t)
        assert _same(end.receive(msg), held)
        errors.append(max(float(np.abs(held[k] - weights[k]).max()) for k in weights))
    assert errors[1] < errors[0] / 4 and errors[2] < errors[1] / 4 and errors[3] <= errors[2]


@pytest.mark.parametrize("feedback", [True, False])
def test_residual_feedback_makes_the_long_run_error_small(feedback):
    # A client that keeps moving a few weights by less than half a quantisation step: without the
    # residual they never move at the server; with it the sum of what arrived tracks the sum of
    # what was meant within one step.
    rng = np.random.default_rng(3)
    init = _model(rng)
    server, make_client = _ends(init, "int4-ans", residual_feedback=feedback)
    msg, held = server.downlink(0, init, None, None, 0)
    end = make_client(0)
    end.receive(msg)
    meant = {k: np.zeros(v.shape, np.float64) for k, v in init.items()}
    arrived = {k: np.zeros(v.shape, np.float64) for k, v in init.items()}
    for t in range(1, 41):
        delta = {k: np.full(v.shape, 0.004, np.float32) for k, v in init.items()}
        for k in delta:
            delta[k].flat[0] = 0.2  # the scale: a step of 0.2 / 7 ~ 0.029, the rest below half of it
        local = {k: held[k] + delta[k] for k in held}
        rebuilt = server.uplink(0, end.reply(local, t), None)
        for k in held:
            meant[k] += local[k].astype(np.float64) - held[k]
            arrived[k] += rebuilt[k].astype(np.float64) - held[k]
    worst = max(float(np.abs(arrived[k] - meant[k]).max()) for k in held)
    step = 0.2 / 7
    if feedback:
        assert worst <= step
    else:
        assert worst > 40 * 0.004 * 0.9  # every small move lost


def test_uplink_of_another_model_is_refused():
    rng = np.random.default_rng(4)
    init = _model(rng)
    server, make_client = _ends(init)
    msg, _ = server.downlink(0, init, None, None, 0)
    end = make_client(0)
    end.receive(msg)
    end.held = {k: v for k, v in end.held.items() if k != "fc.bias"}
    with pytest.raises(CodecError, match="expected"):
        server.uplink(0, end.reply(dict(end.held), 1), None)
    with pytest.raises(ValueError, match="received no model"):
        server.uplink(5, b"", None)


def test_bytes_are_identical_for_a_fixed_seed():
    def run(seed):
        rng = np.random.default_rng(5)
        init = _model(rng)
        server, make_client = _ends(init, "int3-ans", "stochastic", seed=seed)
        end = make_client(1)
        out = []
        weights = init
        for t in range(4):
            weights = {k: v + (0.05 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in weights.items()}
            msg, held = server.downlink(1, weights, None, None, t)
            end.receive(msg)
            local = {k: v + (0.01 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in held.items()}
            out += [msg, end.reply(local, t)]
        return out

    assert run(0) == run(0)
    assert run(0) != run(1)


def test_messages_name_tensors_by_index_and_send_them_flat():
    # Both ends hold the model's layout: a message carries "0", "1", ... in name order, 1-D.
    from feddip_kernels.codecs import decode_model

    rng = np.random.default_rng(3)
    init = _model(rng)
    server, _ = _ends(init, "int8-ans", "nearest")
    weights = {k: v + np.float32(0.5) for k, v in init.items()}
    msg, _ = server.downlink(0, weights, None, None, 1)
    got = decode_model(msg[INIT_FRAME_SIZE:])
    assert list(got.tensors) == [str(i) for i in range(len(init))]
    assert all(got.tensors[str(i)].shape == (init[k].size,) for i, k in enumerate(sorted(init)))


def test_a_message_that_fails_leaves_the_client_as_it_was():
    rng = np.random.default_rng(5)
    init = _model(rng)
    server, make_client = _ends(init, "int8-ans", "nearest")
    end = make_client(0)
    msg, held = server.downlink(0, {k: v + np.float32(0.25) for k, v in init.items()}, None, None, 1)
    with pytest.raises(CodecError):
        end.receive(msg[:INIT_FRAME_SIZE] + b"junk")  # a valid frame, a corrupt tail
    assert end.held is None and end.masks == {} and end.residual == {}
    assert _same(end.receive(msg), held)
    with pytest.raises(CodecError, match="no tensors"):  # a mask list naming what the message lacks
        end.receive(server.downlink(0, held, None, None, 2)[0], masked=["nothing"])
    assert _same(end.held, held)
    with pytest.raises(ValueError, match="not shaped"):  # a trained model of another shape
        end.reply({k: v[:1] for k, v in held.items()}, 2)
