#include "bitpack.hpp"

#include <cstring>

#include "bits.hpp"
#include "common.hpp"

namespace feddip {
namespace {

constexpr std::uint64_t kLow7 = 0x7f7f7f7f7f7f7f7full;
constexpr std::uint64_t kOnes = 0x0101010101010101ull;

// Eight mask bytes (little-endian load) to eight bits: first normalise every byte to 0/1, then one
// multiply moves byte j's bit to bit 56 + j.
inline std::uint8_t pack8(const std::uint8_t* p) {
    std::uint64_t v;
    std::memcpy(&v, p, 8);
    v = ((((v & kLow7) + kLow7) | v) >> 7) & kOnes;
    return static_cast<std::uint8_t>((v * 0x0102040810204080ull) >> 56);
}

inline void unpack8(std::uint8_t byte, std::uint8_t* out) {
    // Spread bit j to byte j: replicate the byte, keep bit j in byte j, normalise to 0/1.
    std::uint64_t v = byte * kOnes;
    v &= 0x8040201008040201ull;
    v = ((((v & kLow7) + kLow7) | v) >> 7) & kOnes;
    std::memcpy(out, &v, 8);
}

}  // namespace

void pack_bits(const std::uint8_t* mask, std::size_t n, std::uint8_t* out) {
    const std::size_t full = n / 8;
    for (std::size_t i = 0; i < full; ++i) out[i] = pack8(mask + 8 * i);
    if (n % 8) {
        std::uint8_t b = 0;
        for (std::size_t j = 0; j < n % 8; ++j) b |= std::uint8_t(mask[8 * full + j] != 0) << j;
        out[full] = b;
    }
}

void unpack_bits(const std::uint8_t* bits, std::size_t n, std::uint8_t* out) {
    const std::size_t full = n / 8;
    for (std::size_t i = 0; i < full; ++i) unpack8(bits[i], out + 8 * i);
    for (std::size_t j = 0; j < n % 8; ++j) out[8 * full + j] = (bits[full] >> j) & 1;
}

FEDDIP_VECTOR_CLONES std::uint64_t count_bits(const std::uint8_t* bits, std::size_t n) {
    std::uint64_t c = 0;
    const std::size_t full = n / 8;
    std::size_t i = 0;
    for (; i + 8 <= full; i += 8) {
        std::uint64_t v;
        std::memcpy(&v, bits + i, 8);
        c += static_cast<std::uint64_t>(popcount64(v));
    }
    for (; i < full; ++i) c += static_cast<std::uint64_t>(popcount64(bits[i]));
    if (n % 8) c += static_cast<std::uint64_t>(popcount64(bits[full] & ((1u << (n % 8)) - 1)));
    return c;
}

namespace {

// Bits 64w .. 64w + 63 of a packed n-bit mask; bits at n and beyond read as zero.
inline std::uint64_t word_at(const std::uint8_t* bits, std::size_t n, std::size_t w) {
    const std::size_t bytes = (n + 7) / 8, at = 8 * w;
    std::uint64_t v = 0;
    std::memcpy(&v, bits + at, at + 8 <= bytes ? 8 : bytes - at);
    const std::size_t left = n - 64 * w;
    return left >= 64 ? v : v & ((std::uint64_t(1) << left) - 1);
}

}  // namespace

void select_bits(const std::uint8_t* bits, const std::uint8_t* ref, std::size_t n, std::uint8_t* out) {
    const std::size_t words = (n + 63) / 64;
    const std::uint64_t d = count_bits(ref, n);
    std::memset(out, 0, (d + 7) / 8);
    std::uint64_t j = 0;  // next output bit
    for (std::size_t w = 0; w < words; ++w) {
        std::uint64_t r = word_at(ref, n, w);
        const std::uint64_t b = word_at(bits, n, w);
        for (; r; r &= r - 1, ++j)
            if ((b >> ctz64(r)) & 1) out[j >> 3] |= std::uint8_t(1u << (j & 7));
    }
}

void deposit_bits(const std::uint8_t* sub, const std::uint8_t* ref, std::size_t n, std::uint8_t* out) {
    const std::size_t words = (n + 63) / 64, bytes = (n + 7) / 8;
    std::uint64_t j = 0;  // next input bit
    for (std::size_t w = 0; w < words; ++w) {
        std::uint64_t r = word_at(ref, n, w), v = 0;
        for (; r; r &= r - 1, ++j)
            if ((sub[j >> 3] >> (j & 7)) & 1) v |= std::uint64_t(1) << ctz64(r);
        std::memcpy(out + 8 * w, &v, 8 * w + 8 <= bytes ? 8 : bytes - 8 * w);
    }
}

}  // namespace feddip
