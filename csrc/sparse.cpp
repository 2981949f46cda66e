#include "sparse.hpp"

#include <cstring>

#include "bitpack.hpp"
#include "common.hpp"

namespace feddip {
namespace {

inline std::uint64_t load_word(const std::uint8_t* bits, std::size_t n_bytes, std::size_t w) {
    std::uint64_t v = 0;
    const std::size_t off = 8 * w;
    std::memcpy(&v, bits + off, n_bytes - off < 8 ? n_bytes - off : 8);
    return v;
}

// Packs (x != 0) into bits, 8 elements per byte; vectorisable.
template <class T>
FEDDIP_VECTOR_CLONES void pack_nonzero(const T* x, std::size_t n, std::uint8_t* bits) {
    const std::size_t full = n / 8;
    for (std::size_t i = 0; i < full; ++i) {
        std::uint8_t b = 0;
        for (int j = 0; j < 8; ++j) b |= std::uint8_t(x[8 * i + j] != T(0)) << j;
        bits[i] = b;
    }
    if (n % 8) {
        std::uint8_t b = 0;
        for (std::size_t j = 0; j < n % 8; ++j) b |= std::uint8_t(x[8 * full + j] != T(0)) << j;
        bits[full] = b;
    }
}

}  // namespace

template <class T>
void pack_positions(const T* x, const std::uint8_t* mask, std::size_t n, std::uint8_t* bits) {
    if (mask)
        pack_bits(mask, n, bits);
    else
        pack_nonzero(x, n, bits);
}

template <class T>
void gather(const T* x, const std::uint8_t* bits, std::size_t n, T* values) {
    const std::size_t n_bytes = (n + 7) / 8;
    const std::size_t n_words = (n_bytes + 7) / 8;
    std::size_t j = 0;
    for (std::size_t w = 0; w < n_words; ++w) {
        std::uint64_t v = load_word(bits, n_bytes, w);
        const T* base = x + 64 * w;
        while (v) {
            values[j++] = base[__builtin_ctzll(v)];
            v &= v - 1;
        }
    }
}

template <class T>
void scatter(const std::uint8_t* bits, std::size_t n, const T* values, T* out) {
    std::memset(out, 0, n * sizeof(T));
    const std::size_t n_bytes = (n + 7) / 8;
    const std::size_t n_words = (n_bytes + 7) / 8;
    std::size_t j = 0;
    for (std::size_t w = 0; w < n_words; ++w) {
        std::uint64_t v = load_word(bits, n_bytes, w);
        T* base = out + 64 * w;
        while (v) {
            base[__builtin_ctzll(v)] = values[j++];
            v &= v - 1;
        }
    }
}

template void pack_positions(const float*, const std::uint8_t*, std::size_t, std::uint8_t*);
template void pack_positions(const double*, const std::uint8_t*, std::size_t, std::uint8_t*);
template void gather(const float*, const std::uint8_t*, std::size_t, float*);
template void gather(const double*, const std::uint8_t*, std::size_t, double*);
template void scatter(const std::uint8_t*, std::size_t, const float*, float*);
template void scatter(const std::uint8_t*, std::size_t, const double*, double*);

}  // namespace feddip
