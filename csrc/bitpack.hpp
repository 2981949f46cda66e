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

}  // namespace feddip
