"""The kernel contract: every kernel with its exact signature and return type, met by each backend
module alike (native `_core`, `_numba_kernels`, `reference`), so that `_backend.kernels(name)`
can hand out any of them and the public functions call through it without asking which; and its
device part (DeviceKernels), met by the kernels for torch tensors on a device (`_torch_kernels`),
which `_backend.kernels_for` hands out for such tensors.

Arguments are already validated by the public layer (pruning, update, codecs), one validator per
kernel for host and device alike: arrays are C-contiguous NumPy arrays of the right dtype and size
(device tensors: torch tensors on one device, checked the same way). Keyword-only where a call
takes several numbers, so two of them cannot be swapped unnoticed. Errors on bad data (a corrupt
Golomb stream, NaN in a top-k input) are ValueError with the same message in every backend.
tests/test_contract.py checks each backend against these classes, and that the device kernels
accept and refuse what the host kernels do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple, Optional, Protocol, Sequence, Union

import numpy as np

if TYPE_CHECKING:
    import torch
    from typing_extensions import Buffer  # bytes, bytearray, memoryview, C-contiguous NumPy arrays


class AnsModel(NamedTuple):
    """How a tensor's words are entropy-coded (docs/wire-format.md, "Entropy-coded values"): the
    symbol of a word w is (|w| >> shift) - base, |w| its low word_bits - 1 bits; freqs[j] is symbol
    j's share of 2^prob_bits (they add up to it); `lanes` states take the words in turn."""

    word_bits: int
    shift: int
    base: int
    freqs: np.ndarray  # uint32
    prob_bits: int
    lanes: int


class Kernels(Protocol):
    # Global magnitude top-k (ties in list order, then flat index; NaN raises ValueError).
    def magnitude_threshold(self, tensors: Sequence[np.ndarray], k: int) -> float:
        """The k-th largest |x| over the tensors, +inf for k = 0."""

    def topk_masks(self, tensors: Sequence[np.ndarray], masks: Sequence[np.ndarray], k: int) -> None:
        """Fill `masks` (bool, one per tensor, same sizes) with the k largest |x|."""

    def max_magnitude(self, tensors: Sequence[np.ndarray]) -> float:
        """The largest |x| over the tensors, 0.0 for no elements: one streaming read."""

    # The local step.
    def masked_norm(self, w: np.ndarray, mask: Optional[np.ndarray], *, p: int, mask_packed: bool = False) -> float:
        """||w * m||_p accumulated in double; `mask` bool, or packed bits when mask_packed."""

    def masked_ef_step(
        self,
        w: np.ndarray,
        g: np.ndarray,
        mask: Optional[np.ndarray],
        *,
        momentum_buffer: Optional[np.ndarray],
        pruned_out: Optional[np.ndarray],
        lr: float,
        weight_decay: float,
        lam: float,
        momentum: float,
        p: int,
        norm: Optional[float],
        mask_packed: bool = False,
    ) -> float:
        """One FedDIP step in place (update.masked_ef_step); returns ||w * m||_p after it."""

    def masked_ef_step_many(
        self,
        ws: Sequence[np.ndarray],
        gs: Sequence[np.ndarray],
        masks: Sequence[Optional[np.ndarray]],
        *,
        momentum_buffers: Sequence[Optional[np.ndarray]],
        pruned_outs: Sequence[Optional[np.ndarray]],
        lr: float,
        weight_decay: float,
        lam: float,
        momentum: float,
        p: int,
        norms: Sequence[Optional[float]],
        mask_packed: bool = False,
    ) -> list[float]:
        """masked_ef_step on every layer (lists of one entry per layer); each layer's norm after it.
        Layers may differ in dtype (each layer's arrays of one). No two arrays of any layers share
        memory: the native core refuses them itself (_backend.checks_overlaps), for the other
        backends the public layer checks."""

    # Bit-level codec primitives (little-endian packed bits: element i is bit i % 8 of byte i // 8).
    def pack_bits(self, mask: np.ndarray) -> np.ndarray:
        """A bool array's elements as (n + 7) // 8 bytes."""

    def unpack_bits(self, bits: np.ndarray, n: int) -> np.ndarray:
        """The first n packed bits as a bool array."""

    def count_bits(self, bits: np.ndarray, n: int) -> int:
        """How many of the first n packed bits are set."""

    def select_bits(self, bits: np.ndarray, ref: np.ndarray, n: int) -> np.ndarray:
        """The bits of `bits` at the set positions of `ref` (both packed, n elements), packed in
        order: the positions of a mask delta, relative to the reference mask it lies in."""

    def deposit_bits(self, sub: np.ndarray, ref: np.ndarray, n: int) -> np.ndarray:
        """Inverse of select_bits: n packed bits, sub's bits placed at ref's set positions."""

    def sparsify(
        self, x: np.ndarray, mask: Optional[np.ndarray], *, negative_zeros: bool = False
    ) -> Union[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]]:
        """(packed positions, values at them): the mask's positions, or x's non-zeros (+0.0 and -0.0
        are zeros, NaN is not). With negative_zeros a third item: the packed positions of x's -0.0
        elements (bits the sign bit alone: a NaN or subnormal with the sign set is not one), or
        None when it has none, found without a mask in the pass that finds the non-zeros, so that
        an array without -0.0 costs nothing more (with a mask, a pass of its own)."""

    def densify(self, bits: np.ndarray, n: int, values: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
        """n elements: the values at the positions, zero elsewhere; written into `out` when given."""

    def golomb_parameter(self, nnz: int, n: int) -> int:
        """The Golomb parameter encoders use for nnz positions among n (docs/wire-format.md)."""

    def golomb_encode(self, bits: np.ndarray, n: int, m: int) -> bytes:
        """The positions' gaps, Golomb-coded with parameter m."""

    def golomb_decode(self, data: Buffer, n: int, nnz: int, m: int) -> np.ndarray:
        """Packed positions from a Golomb stream of exactly nnz codes (ValueError otherwise)."""

    def golomb_encode_many(self, items: Sequence[tuple[np.ndarray, int, int]]) -> list[bytes]:
        """golomb_encode over (bits, n, m) items (in parallel where the backend can)."""

    def golomb_decode_many(
        self, items: Sequence[tuple[Buffer, int, int, int]]
    ) -> tuple[list[np.ndarray], int, str]:
        """golomb_decode over (data, n, nnz, m) items: (bits list, index of the first failed item
        or -1, its message)."""

    # Entropy-coded values: words (the narrowest unsigned dtype of word_bits, _formulas.word_dtype).
    def ans_histogram(self, words: np.ndarray, *, word_bits: int, max_symbols: int) -> tuple[int, int, np.ndarray]:
        """(shift, base, counts) of the words' magnitudes: the smallest shift at which the symbols
        |w| >> shift span at most max_symbols values, the smallest of them, and each one's count
        (uint64: counts[j] of symbol base + j). (0, 0, no counts) for no words."""

    def ans_encode(self, words: np.ndarray, *, word_bits: int, shift: int, base: int, freqs: np.ndarray,
                   prob_bits: int, lanes: int) -> tuple[bytes, bytes]:
        """(the rANS stream: the lanes' final states then the 16-bit words; the raw bits: each
        word's sign and low `shift` magnitude bits) of words whose symbols the freqs cover."""

    def ans_decode(self, stream: Buffer, raw: Buffer, n: int, *, word_bits: int, shift: int, base: int,
                   freqs: np.ndarray, prob_bits: int, lanes: int) -> np.ndarray:
        """The n words from ans_encode's output (the model checked by the caller, raw of the exact
        length); ValueError when the stream is corrupt: a length, a state or padding out of place."""

    def ans_encode_many(self, items: Sequence[tuple[np.ndarray, AnsModel]]) -> list[tuple[bytes, bytes]]:
        """ans_encode over (words, model) items (in parallel where the backend can)."""

    def ans_decode_many(
        self, items: Sequence[tuple[Buffer, Buffer, int, AnsModel]]
    ) -> tuple[list[np.ndarray], int, str]:
        """ans_decode over (stream, raw, n, model) items: (words list, index of the first failed
        item or -1, its message)."""

    def crc32c(self, data: Buffer, crc: int = 0) -> int:
        """CRC-32C (Castagnoli) of a C-contiguous buffer, continuing from `crc`."""

    def join_crc32c(self, parts: Sequence[Buffer]) -> bytes:
        """The C-contiguous buffers joined, then the CRC-32C of all of them, 4 bytes little-endian:
        a message's last step (encode_model)."""


NAMES = tuple(name for name in Kernels.__dict__ if not name.startswith("_"))


class DeviceKernels(Protocol):
    """The kernels for torch tensors on a device (CUDA), run where the tensors are: `_torch_kernels`.

    The kernels shared with Kernels have its signatures, rules and errors (NaN in a top-k input:
    ValueError "input contains NaN"), and take the arguments that the same validators pass (torch
    tensors on one device instead of NumPy arrays; masks as bool tensors, never packed bits), with
    one difference: topk_masks returns new masks on the device. Numbers come back to the host (a
    wait for the device). Beyond those, what FedDIPSGD's per-layer step on a device takes (norms
    kept on the device, no wait) and the codecs' device step. FedDIPSGD's multi-layer step in
    Triton is `_backend.triton_step()`'s, where Triton imports.
    """

    # Global magnitude top-k (the Triton radix select where it applies, else torch operations).
    def magnitude_threshold(self, tensors: Sequence[torch.Tensor], k: int) -> float:
        """The k-th largest |x| over the tensors, +inf for k = 0."""

    def topk_masks(self, tensors: Sequence[torch.Tensor], k: int) -> list[torch.Tensor]:
        """New bool masks (views into one flat mask on the device) keeping the k largest |x|."""

    def max_magnitude(self, tensors: Sequence[torch.Tensor]) -> float:
        """The largest |x| over the tensors, 0.0 for no elements."""

    # The local step.
    def masked_ef_step(
        self,
        w: torch.Tensor,
        g: torch.Tensor,
        mask: Optional[torch.Tensor],
        *,
        momentum_buffer: Optional[torch.Tensor],
        pruned_out: Optional[torch.Tensor],
        lr: float,
        weight_decay: float,
        lam: float,
        momentum: float,
        p: int,
        norm: Optional[float],
        mask_packed: bool = False,
    ) -> float:
        """Kernels.masked_ef_step on device tensors."""

    def masked_ef_step_many(
        self,
        ws: Sequence[torch.Tensor],
        gs: Sequence[torch.Tensor],
        masks: Sequence[Optional[torch.Tensor]],
        *,
        momentum_buffers: Sequence[Optional[torch.Tensor]],
        pruned_outs: Sequence[Optional[torch.Tensor]],
        lr: float,
        weight_decay: float,
        lam: float,
        momentum: float,
        p: int,
        norms: Sequence[Optional[float]],
        mask_packed: bool = False,
    ) -> list[float]:
        """Kernels.masked_ef_step_many on device tensors (of one device); the public layer checks
        overlaps."""

    # FedDIPSGD's per-layer step on a device: the norms stay there as 0-d float64 tensors.
    def hyper(self, lr: float, weight_decay: float, lam: float, momentum: float, device: torch.device) -> torch.Tensor:
        """The step's scalars as one float64 tensor on the device (a new value does not recompile)."""

    def ef_step(
        self,
        w: torch.Tensor,
        g: torch.Tensor,
        m: Optional[torch.Tensor],
        buf: Optional[torch.Tensor],
        wp: Optional[torch.Tensor],
        hp: torch.Tensor,
        p: int,
        prev_norm: Optional[torch.Tensor],
    ) -> torch.Tensor:
        """masked_ef_step of one layer (shaped alike) in torch operations; ||w * m||_p after it,
        a 0-d float64 tensor on the device."""

    def ef_step_fused(
        self,
        w: torch.Tensor,
        g: torch.Tensor,
        m: Optional[torch.Tensor],
        buf: Optional[torch.Tensor],
        wp: Optional[torch.Tensor],
        hp: torch.Tensor,
        p: int,
        prev_norm: Optional[torch.Tensor],
    ) -> torch.Tensor:
        """ef_step compiled by torch.compile into one kernel per layer shape."""

    def sgd_step(self, w: torch.Tensor, g: torch.Tensor, buf: Optional[torch.Tensor], *, lr: float,
                 weight_decay: float, momentum: float) -> None:
        """Plain SGD in place, as torch.optim.SGD (a layer without a mask)."""

    # The codecs' device step (encode_model, encode_stream): classes of _torch_golomb.
    def DeviceSparse(self, items: Sequence[tuple[torch.Tensor, Any, bool]], run: Optional[int]) -> Any:  # noqa: N802
        """Sparsify (tensor, mask, send -0.0) items where they are: .counts(), then .fetch(plans)."""

    def Plan(self, ms: Sequence[int], bits: bool, sign_m: int, sign_bits: bool) -> Any:  # noqa: N802
        """The host's choice for one item from its counts (Golomb parameters, what to fetch)."""


DEVICE_NAMES = tuple(name for name in DeviceKernels.__dict__ if not name.startswith("_"))
SHARED_NAMES = tuple(name for name in DEVICE_NAMES if name in NAMES)
"""The kernels that host and device kernels both have: the same signatures (but topk_masks)."""
