// Packing of boolean masks into bits, little-endian bit order: element i is bit (i % 8) of byte i / 8.
#pragma once

#include <cstddef>
#include <cstdint>

namespace feddip {

// Packs n mask bytes (any non-zero byte counts as set) into (n + 7) / 8 bytes; the unused high
// bits of the last byte are zero.
void pack_bits(const std::uint8_t* mask, std::size_t n, std::uint8_t* out);

// Unpacks n elements from (n + 7) / 8 bytes into 0/1 bytes.
void unpack_bits(const std::uint8_t* bits, std::size_t n, std::uint8_t* out);

// Number of set bits among the first n elements of a packed mask.
std::uint64_t count_bits(const std::uint8_t* bits, std::size_t n);

// Mask deltas (a set of positions coded relative to a reference set `ref` that contains it), all
// over n elements. select_bits writes, for the j-th set position of ref, bit j of `out` = whether
// `bits` has that position (count_bits(ref, n) bits, (d + 7) / 8 bytes, padding zero);
// deposit_bits is its inverse, placing the d bits of `sub` at ref's set positions of an n-bit
// `out` (zeros elsewhere). Cost: one pass over ref's words plus a step per set position.
void select_bits(const std::uint8_t* bits, const std::uint8_t* ref, std::size_t n, std::uint8_t* out);
void deposit_bits(const std::uint8_t* sub, const std::uint8_t* ref, std::size_t n, std::uint8_t* out);

}  // namespace feddip
