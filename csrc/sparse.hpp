// Dense <-> (packed positions, values) conversions for sparse tensors.
#pragma once

#include <cstddef>
#include <cstdint>

namespace feddip {

// Positions are packed bits (little-endian bit order, see bitpack.hpp).

// positions = mask (bytes, non-zero = kept) when given, else (x != 0); -0.0 counts as zero.
// Writes (n + 7) / 8 bytes into `bits`.
template <class T>
void pack_positions(const T* x, const std::uint8_t* mask, std::size_t n, std::uint8_t* bits);

// values[j] = x at the j-th set position, for every set position (the caller sizes `values`
// with count_bits).
template <class T>
void gather(const T* x, const std::uint8_t* bits, std::size_t n, T* values);

// Inverse: out[i] = next value where bit i is set, 0 elsewhere. `values` holds one value per set
// bit (checked by the caller).
template <class T>
void scatter(const std::uint8_t* bits, std::size_t n, const T* values, T* out);

}  // namespace feddip
