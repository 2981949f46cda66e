#include "sparse.hpp"

#include <algorithm>
#include <cstring>
#include <vector>

#include "bitpack.hpp"
#include "common.hpp"

namespace feddip {
namespace {

// Word w of packed positions (elements 64w .. 64w + 63); bits at or beyond n are cleared, so
// stray padding bits can never address memory past the tensor.
inline std::uint64_t load_word(const std::uint8_t* bits, std::size_t n, std::size_t w) {
    const std::size_t n_bytes = (n + 7) / 8, off = 8 * w;
    std::uint64_t v = 0;
    std::memcpy(&v, bits + off, n_bytes - off < 8 ? n_bytes - off : 8);
    const std::size_t left = n - 64 * w;
    return left < 64 ? v & ((std::uint64_t(1) << left) - 1) : v;
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
    constexpr std::size_t kSpan = std::size_t(1) << 16;  // elements per task, a multiple of 8
    const long long n_spans = static_cast<long long>((n + kSpan - 1) / kSpan);
    const int nt = n < (std::size_t(1) << 18) ? 1 : max_threads(0);
#pragma omp parallel for num_threads(nt) schedule(static)
    for (long long s = 0; s < n_spans; ++s) {
        const std::size_t lo = static_cast<std::size_t>(s) * kSpan, len = std::min(kSpan, n - lo);
        if (mask)
            pack_bits(mask + lo, len, bits + lo / 8);
        else
            pack_nonzero(x + lo, len, bits + lo / 8);
    }
}

namespace {

// Work split: blocks of kWords 64-bit words of positions, with the index of each block's first value.
constexpr std::size_t kWords = 1024;

std::vector<std::size_t> block_offsets(const std::uint8_t* bits, std::size_t n, std::size_t n_blocks) {
    std::vector<std::size_t> first(n_blocks + 1, 0);
    for (std::size_t b = 0; b < n_blocks; ++b) {
        const std::size_t lo = b * kWords * 64, hi = std::min(n, lo + kWords * 64);
        first[b + 1] = first[b] + static_cast<std::size_t>(count_bits(bits + lo / 8, hi - lo));
    }
    return first;
}

// Calls start(lo, hi) once per block of elements [lo, hi), then visit(j, i) for each set position i
// of the block, j being its rank among all set positions. Blocks run in parallel for large n.
template <class Start, class Visit>
void for_each_position(const std::uint8_t* bits, std::size_t n, Start&& start, Visit&& visit) {
    const std::size_t n_words = (n + 63) / 64;
    const std::size_t n_blocks = (n_words + kWords - 1) / kWords;
    const std::vector<std::size_t> first = block_offsets(bits, n, n_blocks);
    const int nt = n < (std::size_t(1) << 18) ? 1 : max_threads(0);
#pragma omp parallel for num_threads(nt) schedule(static)
    for (long long b = 0; b < static_cast<long long>(n_blocks); ++b) {
        const std::size_t w0 = static_cast<std::size_t>(b) * kWords, w1 = std::min(n_words, w0 + kWords);
        start(64 * w0, std::min(n, 64 * w1));
        std::size_t j = first[b];
        for (std::size_t w = w0; w < w1; ++w)
            for (std::uint64_t v = load_word(bits, n, w); v; v &= v - 1)
                visit(j++, 64 * w + static_cast<std::size_t>(__builtin_ctzll(v)));
    }
}

}  // namespace

template <class T>
void gather(const T* x, const std::uint8_t* bits, std::size_t n, T* values) {
    for_each_position(
        bits, n, [](std::size_t, std::size_t) {}, [&](std::size_t j, std::size_t i) { values[j] = x[i]; });
}

template <class T>
void scatter(const std::uint8_t* bits, std::size_t n, const T* values, T* out) {
    for_each_position(
        bits, n, [&](std::size_t lo, std::size_t hi) { std::memset(out + lo, 0, (hi - lo) * sizeof(T)); },
        [&](std::size_t j, std::size_t i) { out[i] = values[j]; });
}

template void pack_positions(const float*, const std::uint8_t*, std::size_t, std::uint8_t*);
template void pack_positions(const double*, const std::uint8_t*, std::size_t, std::uint8_t*);
template void gather(const float*, const std::uint8_t*, std::size_t, float*);
template void gather(const double*, const std::uint8_t*, std::size_t, double*);
template void scatter(const std::uint8_t*, std::size_t, const float*, float*);
template void scatter(const std::uint8_t*, std::size_t, const double*, double*);

}  // namespace feddip
