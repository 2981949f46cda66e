// Dense <-> (packed positions, values) conversions for sparse tensors.
#pragma once

#include <cstddef>
#include <cstdint>

namespace feddip {

// Positions are packed bits (little-endian bit order, see bitpack.hpp).

// positions = mask (bytes, non-zero = kept) when given, else (x != 0); -0.0 counts as zero.
// Writes (n + 7) / 8 bytes into `bits`. Without a mask and with `negative_zero` given, also sets
// *negative_zero to whether some element of x is -0.0 (its bits the sign bit alone: a NaN or
// subnormal with the sign set is not), found in the same pass over x. With a mask x is not read
// and *negative_zero is left as it is (pack_negative_zeros finds them).
template <class T>
void pack_positions(const T* x, const std::uint8_t* mask, std::size_t n, std::uint8_t* bits,
                    bool* negative_zero = nullptr);

// Packs (x is -0.0, as above) into (n + 7) / 8 bytes of `bits`; returns whether any element is.
template <class T>
bool pack_negative_zeros(const T* x, std::size_t n, std::uint8_t* bits);

// values[j] = x at the j-th set position, for every set position (the caller sizes `values`
// with count_bits).
template <class T>
void gather(const T* x, const std::uint8_t* bits, std::size_t n, T* values);

// Inverse: out[i] = next value where bit i is set, 0 elsewhere. `values` holds one value per set
// bit (checked by the caller).
template <class T>
void scatter(const std::uint8_t* bits, std::size_t n, const T* values, T* out);

}  // namespace feddip
