#include "sparse.hpp"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "bitpack.hpp"
#include "bits.hpp"
#include "common.hpp"
#include "isa.hpp"

#ifdef FEDDIP_X86
#include <immintrin.h>

#include "lanes.hpp"
#endif

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

// -0.0's bits: the sign bit alone. No other float has them (a NaN or a subnormal with the sign
// set has others), so one integer compare tells -0.0 from +0.0 and from every other value.
template <class T>
constexpr bits_t<T> kNegativeZero = bits_t<T>(1) << (8 * sizeof(T) - 1);

template <class T>
inline bool is_negative_zero(T v) {
    bits_t<T> u;
    std::memcpy(&u, &v, sizeof u);
    return u == kNegativeZero<T>;
}

// What a span is packed into bits: x != 0 (also finding whether some element is -0.0, with
// kNonzeroFind), or x is -0.0.
enum class Pack { kNonzero, kNonzeroFind, kNegative };

// Packs a span, 8 elements per byte; vectorisable. Returns whether some element is -0.0 (for
// kNonzeroFind an OR beside the compare, so no second read of x; false for kNonzero).
template <Pack kMode, class T>
FEDDIP_VECTOR_CLONES bool pack_generic(const T* x, std::size_t n, std::uint8_t* bits) {
    std::uint8_t found = 0;
    const auto byte = [&](const T* v, std::size_t count) {
        std::uint8_t b = 0, neg = 0;
        for (std::size_t j = 0; j < count; ++j) {
            if constexpr (kMode != Pack::kNegative) b |= std::uint8_t(v[j] != T(0)) << j;
            if constexpr (kMode != Pack::kNonzero) neg |= std::uint8_t(is_negative_zero(v[j])) << j;
        }
        found |= neg;
        return kMode == Pack::kNegative ? neg : b;
    };
    const std::size_t full = n / 8;
    for (std::size_t i = 0; i < full; ++i) bits[i] = byte(x + 8 * i, 8);
    if (n % 8) bits[full] = byte(x + 8 * full, n % 8);
    return found != 0;
}

#ifdef FEDDIP_X86
// 32 elements as the 4 bytes pack_generic writes for them. A compare and a movemask a vector keep
// up with memory, where the compiler's code (a byte at a time) did not. For
// kNonzeroFind, `low` keeps the lanes' minimum of the bits read as signed integers: -0.0's are
// the smallest of all, so one instruction a vector finds it (a compare and an OR, as float64
// does, made the pass slower; benchmarks/RESULTS.md).
template <Pack kMode>
__attribute__((target("avx2"))) inline std::uint32_t pack32(const float* x, __m256i& low) {
    std::uint32_t w = 0;
    for (int q = 0; q < 4; ++q) {
        const __m256 v = _mm256_loadu_ps(x + 8 * q);
        // NEQ_UQ is x != 0 in C++: NaN counts as non-zero, -0.0 as zero.
        const __m256 lanes =
            kMode == Pack::kNegative
                ? _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_castps_si256(v), _mm256_set1_epi32(INT32_MIN)))
                : _mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_NEQ_UQ);
        w |= static_cast<std::uint32_t>(_mm256_movemask_ps(lanes)) << (8 * q);
        if constexpr (kMode == Pack::kNonzeroFind) low = _mm256_min_epi32(low, _mm256_castps_si256(v));
    }
    return w;
}

// As above; AVX2 has no 64-bit minimum, so `hit` ORs the lanes that are -0.0 (all ones there).
template <Pack kMode>
__attribute__((target("avx2"))) inline std::uint32_t pack32(const double* x, __m256i& hit) {
    const __m256i sign = _mm256_set1_epi64x(INT64_MIN);
    std::uint32_t w = 0;
    for (int q = 0; q < 8; ++q) {
        const __m256d v = _mm256_loadu_pd(x + 4 * q);
        const __m256i neg = _mm256_cmpeq_epi64(_mm256_castpd_si256(v), sign);
        const __m256d lanes =
            kMode == Pack::kNegative ? _mm256_castsi256_pd(neg) : _mm256_cmp_pd(v, _mm256_setzero_pd(), _CMP_NEQ_UQ);
        w |= static_cast<std::uint32_t>(_mm256_movemask_pd(lanes)) << (4 * q);
        if constexpr (kMode == Pack::kNonzeroFind) hit = _mm256_or_si256(hit, neg);
    }
    return w;
}

// pack_generic over the first n / 32 * 32 elements.
template <Pack kMode, class T>
__attribute__((target("avx2"))) bool pack_avx2(const T* x, std::size_t n, std::uint8_t* bits) {
    constexpr bool kMin = sizeof(T) == 4;  // float32's accumulator is a minimum, float64's an OR
    __m256i acc = kMin ? _mm256_set1_epi32(INT32_MAX) : _mm256_setzero_si256();
    std::uint32_t any = 0;  // kNegative: some bit written
    for (std::size_t i = 0; i + 32 <= n; i += 32) {
        const std::uint32_t w = pack32<kMode>(x + i, acc);
        std::memcpy(bits + i / 8, &w, 4);
        if constexpr (kMode == Pack::kNegative) any |= w;
    }
    if constexpr (kMode != Pack::kNonzeroFind) {
        return any != 0;
    } else {
        if (kMin) acc = _mm256_cmpeq_epi32(acc, _mm256_set1_epi32(INT32_MIN));
        return !_mm256_testz_si256(acc, acc);
    }
}
#endif

// `loops` (isa(), which tests cap) picks the loop: the hand-written AVX2 one or the generic one.
template <Pack kMode, class T>
bool pack_span(const T* x, std::size_t n, std::uint8_t* bits, Isa loops) {
#ifdef FEDDIP_X86
    if (loops >= Isa::avx2) {
        const std::size_t head = n / 32 * 32;  // whole bytes: the rest starts at bits + head / 8
        const bool found = pack_avx2<kMode>(x, head, bits);
        return pack_generic<kMode>(x + head, n - head, bits + head / 8) || found;
    }
#else
    (void)loops;
#endif
    return pack_generic<kMode>(x, n, bits);
}

// Calls pack(lo, len) once per span of the n elements, in parallel from 2^18 elements; true when
// a call returned true (each span's answer kept apart, combined after the loop).
template <class Pack_>
bool for_each_span(std::size_t n, Pack_&& pack) {
    constexpr std::size_t kSpan = std::size_t(1) << 16;  // elements per task, a multiple of 32
    const long long n_spans = static_cast<long long>((n + kSpan - 1) / kSpan);
    const int nt = n < (std::size_t(1) << 18) ? 1 : max_threads(0);
    std::vector<std::uint8_t> found(static_cast<std::size_t>(n_spans), 0);
    parallel_for(nt, n_spans, [&](long long s) {
        const std::size_t lo = static_cast<std::size_t>(s) * kSpan;
        found[static_cast<std::size_t>(s)] = pack(lo, std::min(kSpan, n - lo));
    });
    return std::find(found.begin(), found.end(), std::uint8_t(1)) != found.end();
}

}  // namespace

template <class T>
void pack_positions(const T* x, const std::uint8_t* mask, std::size_t n, std::uint8_t* bits, bool* negative_zero) {
    const bool find = negative_zero && !mask;
    const Isa loops = isa();
    const bool found = for_each_span(n, [&](std::size_t lo, std::size_t len) {
        if (mask) {
            pack_bits(mask + lo, len, bits + lo / 8);
            return false;
        }
        return find ? pack_span<Pack::kNonzeroFind>(x + lo, len, bits + lo / 8, loops)
                    : pack_span<Pack::kNonzero>(x + lo, len, bits + lo / 8, loops);
    });
    if (find) *negative_zero = found;
}

template <class T>
bool pack_negative_zeros(const T* x, std::size_t n, std::uint8_t* bits) {
    const Isa loops = isa();
    return for_each_span(n, [&](std::size_t lo, std::size_t len) {
        return pack_span<Pack::kNegative>(x + lo, len, bits + lo / 8, loops);
    });
}

namespace {

// Work split: blocks of kWords 64-bit words of positions, with the index of each block's first value.
constexpr std::size_t kWords = 1024;

std::vector<std::size_t> block_offsets(const std::uint8_t* bits, std::size_t n, std::size_t n_blocks, int nt) {
    std::vector<std::size_t> first(n_blocks + 1, 0);
    parallel_for(nt, static_cast<long long>(n_blocks), [&](long long b) {
        const std::size_t lo = static_cast<std::size_t>(b) * kWords * 64, hi = std::min(n, lo + kWords * 64);
        first[static_cast<std::size_t>(b) + 1] = static_cast<std::size_t>(count_bits(bits + lo / 8, hi - lo));
    });
    for (std::size_t b = 0; b < n_blocks; ++b) first[b + 1] += first[b];
    return first;
}

// Calls block(w0, w1, j) once per block of 64-bit words [w0, w1) of positions, j being the rank
// of the block's first set position among all. Blocks run in parallel for large n.
template <class Block>
void for_each_block(const std::uint8_t* bits, std::size_t n, Block&& block) {
    const std::size_t n_words = (n + 63) / 64;
    const std::size_t n_blocks = (n_words + kWords - 1) / kWords;
    const int nt = n < (std::size_t(1) << 18) ? 1 : max_threads(0);
    const std::vector<std::size_t> first = block_offsets(bits, n, n_blocks, nt);
    parallel_for(nt, static_cast<long long>(n_blocks), [&](long long b) {
        const std::size_t w0 = static_cast<std::size_t>(b) * kWords;
        block(w0, std::min(n_words, w0 + kWords), first[static_cast<std::size_t>(b)]);
    });
}

// Calls start(lo, hi) once per block of elements [lo, hi), then visit(j, i) for each set position i
// of the block, j being its rank among all set positions.
template <class Start, class Visit>
void for_each_position(const std::uint8_t* bits, std::size_t n, Start&& start, Visit&& visit) {
    for_each_block(bits, n, [&](std::size_t w0, std::size_t w1, std::size_t j) {
        start(64 * w0, std::min(n, 64 * w1));
        for (std::size_t w = w0; w < w1; ++w)
            for (std::uint64_t v = load_word(bits, n, w); v; v &= v - 1)
                visit(j++, 64 * w + static_cast<std::size_t>(ctz64(v)));
    });
}

}  // namespace

template <class T>
void gather(const T* x, const std::uint8_t* bits, std::size_t n, T* values) {
    for_each_position(
        bits, n, [](std::size_t, std::size_t) {}, [&](std::size_t j, std::size_t i) { values[j] = x[i]; });
}

#ifdef FEDDIP_X86
namespace {

// Elements [64 w0, 64 w1) of a float32 densify, all full words, `out` 16-byte aligned: each line
// is built in registers (8 lanes: the next values spread over the set lanes, zeros elsewhere) and
// streamed to memory. No zeroing pass before the scatter, and no read of the output's lines
// before they are written: half the memory traffic of memset-then-scatter. Returns the values
// past the ones it placed.
__attribute__((target("avx2,popcnt"))) const float* expand_words(const std::uint8_t* bits, std::size_t w0,
                                                                 std::size_t w1, const float* values, float* out) {
    const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256i lane_index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (std::size_t w = w0; w < w1; ++w) {
        std::uint64_t word;
        std::memcpy(&word, bits + 8 * w, 8);
        float* o = out + 64 * w;
        for (int q = 0; q < 8; ++q, word >>= 8) {
            const unsigned m = static_cast<unsigned>(word & 0xff);
            const int count = _mm_popcnt_u32(m);
            // Only `count` values are read: the masked load never touches memory past them.
            const __m256 v = _mm256_maskload_ps(values, _mm256_cmpgt_epi32(_mm256_set1_epi32(count), lane_index));
            const __m256i from =
                _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(kExpandLanes.entry + m)));
            const __m256i set =
                _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(m)), lane_bit), lane_bit);
            const __m256 line = _mm256_and_ps(_mm256_permutevar8x32_ps(v, from), _mm256_castsi256_ps(set));
            _mm_stream_ps(o + 8 * q, _mm256_castps256_ps128(line));
            _mm_stream_ps(o + 8 * q + 4, _mm256_extractf128_ps(line, 1));
            values += count;
        }
    }
    _mm_sfence();
    return values;
}

}  // namespace
#endif

template <class T>
void scatter(const std::uint8_t* bits, std::size_t n, const T* values, T* out) {
#ifdef FEDDIP_X86
    if constexpr (std::is_same_v<T, float>) {
        if (isa() >= Isa::avx2 && (reinterpret_cast<std::uintptr_t>(out) & 15) == 0 && n >= 64) {
            for_each_block(bits, n, [&](std::size_t w0, std::size_t w1, std::size_t j) {
                const std::size_t full = std::min(w1, n / 64);  // the last, partial word goes below
                const float* next = w0 < full ? expand_words(bits, w0, full, values + j, out) : values + j;
                if (full < w1) {
                    std::memset(out + 64 * full, 0, (n - 64 * full) * sizeof(T));
                    for (std::uint64_t v = load_word(bits, n, full); v; v &= v - 1)
                        out[64 * full + static_cast<std::size_t>(ctz64(v))] = *next++;
                }
            });
            return;
        }
    }
#endif
    for_each_position(
        bits, n, [&](std::size_t lo, std::size_t hi) { std::memset(out + lo, 0, (hi - lo) * sizeof(T)); },
        [&](std::size_t j, std::size_t i) { out[i] = values[j]; });
}

template void pack_positions(const float*, const std::uint8_t*, std::size_t, std::uint8_t*, bool*);
template void pack_positions(const double*, const std::uint8_t*, std::size_t, std::uint8_t*, bool*);
template bool pack_negative_zeros(const float*, std::size_t, std::uint8_t*);
template bool pack_negative_zeros(const double*, std::size_t, std::uint8_t*);
template void gather(const float*, const std::uint8_t*, std::size_t, float*);
template void gather(const double*, const std::uint8_t*, std::size_t, double*);
template void scatter(const std::uint8_t*, std::size_t, const float*, float*);
template void scatter(const std::uint8_t*, std::size_t, const double*, double*);

}  // namespace feddip
