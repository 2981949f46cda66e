#include "ef_step.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <limits>
#include <map>
#include <mutex>
#include <stdexcept>
#include <type_traits>
#include <utility>
#include <vector>

#include "common.hpp"
#include "isa.hpp"

#if defined(__x86_64__) && defined(__GNUC__)
#define FEDDIP_X86_AVX2 1
#include <immintrin.h>
#endif

namespace feddip {
namespace {

// Chunk: the unit of parallel work. Norm terms (squares or |v|) are summed in double throughout:
// in float, a chunk of weights of 3e19 would overflow (3e19^2 > FLT_MAX) where the norm is finite.
constexpr std::size_t kChunk = 4096;
// Below this, threads cost more than they save.
constexpr std::size_t kParallelMin = std::size_t(1) << 16;

inline int threads_for(int requested, std::size_t n) {
    return n < kParallelMin ? 1 : max_threads(requested);
}

// Sum of chunk(b, m) over the chunks [b, b + m) of n elements, in parallel, added in chunk order
// whatever the thread count: results are the same bits with 1, 2 or 16 threads.
template <class F>
double sum_over_chunks(std::size_t n, int nt, F&& chunk) {
    const long long n_chunks = static_cast<long long>((n + kChunk - 1) / kChunk);
    if (n_chunks <= 1) return n_chunks ? chunk(std::size_t(0), n) : 0.0;
    std::vector<double> part(static_cast<std::size_t>(n_chunks));
    parallel_for(nt, n_chunks, [&](long long c) {
        const std::size_t b = static_cast<std::size_t>(c) * kChunk;
        part[static_cast<std::size_t>(c)] = chunk(b, std::min(kChunk, n - b));
    });
    double total = 0.0;
    for (const double x : part) total += x;
    return total;
}

// 1 for a non-zero mask byte, else 0, with integer arithmetic only (no compare), so it vectorises.
template <class T>
inline T mask_value(std::uint8_t byte) {
    const std::uint32_t x = byte;
    return static_cast<T>(static_cast<std::int32_t>((x | (0u - x)) >> 31));
}

// A mask is absent (all kept), one byte an element (non-zero = kept), or packed bits (element i
// is bit i % 8 of byte i / 8). Chunks and tiles start at multiples of 8 elements, so a packed mask
// can be offset by whole bytes.
enum class Layout { none, bytes, bits };

template <Layout L, class T>
inline T mask_at(const std::uint8_t* mask, std::size_t i) {
    if constexpr (L == Layout::none)
        return T(1);
    else if constexpr (L == Layout::bytes)
        return mask_value<T>(mask[i]);
    else
        return static_cast<T>((mask[i >> 3] >> (i & 7)) & 1);
}

template <Layout L>
inline const std::uint8_t* mask_from(const std::uint8_t* mask, std::size_t first) {
    if constexpr (L == Layout::none)
        return nullptr;
    else if constexpr (L == Layout::bytes)
        return mask + first;
    else
        return mask + first / 8;
}

// sign(x) with sign(0) = 0, written as selects so that loops using it vectorise.
template <class T>
inline T sign(T x) {
    const T pos = x > T(0) ? T(1) : T(0);
    const T neg = x < T(0) ? T(1) : T(0);
    return pos - neg;
}

template <class T, Layout Mask, int P>
FEDDIP_VECTOR_CLONES double norm_chunk(const T* w, const std::uint8_t* mask, std::size_t n) {
    double acc = 0;
#pragma omp simd reduction(+ : acc)
    for (std::size_t i = 0; i < n; ++i) {
        const double v = static_cast<double>(w[i] * mask_at<Mask, T>(mask, i));
        acc += P == 2 ? v * v : std::abs(v);
    }
    return acc;
}

template <class T, Layout Mask>
FEDDIP_VECTOR_CLONES T max_abs_chunk(const T* w, const std::uint8_t* mask, std::size_t n) {
    T acc = 0;
#pragma omp simd reduction(max : acc)
    for (std::size_t i = 0; i < n; ++i) {
        const T v = std::abs(w[i] * mask_at<Mask, T>(mask, i));
        acc = v > acc ? v : acc;
    }
    return acc;
}

template <class T, Layout Mask>
FEDDIP_VECTOR_CLONES double scaled_sq_chunk(const T* w, const std::uint8_t* mask, std::size_t n, double s) {
    double acc = 0;
#pragma omp simd reduction(+ : acc)
    for (std::size_t i = 0; i < n; ++i) {
        const double v = static_cast<double>(w[i] * mask_at<Mask, T>(mask, i)) * s;
        acc += v * v;
    }
    return acc;
}

// The double sum of squares is exact enough unless squares fall below double's smallest normal
// (float64 weights under ~1e-146) or overflow it (float64 weights over ~1e154; float32 squares
// always fit). Then the 2-norm is recomputed from values scaled by a power of two (exact) so that
// the largest is near 1: two more read passes, taken only for such layers. NaN is kept as it is.
inline bool sum_sq_unreliable(double sum_sq, std::size_t n) {
    using L = std::numeric_limits<double>;
    return sum_sq < static_cast<double>(n) * (L::min() / L::epsilon()) || sum_sq == L::infinity();
}

template <class T, Layout Mask>
double norm2_scaled(const T* w, const std::uint8_t* mask, std::size_t n, int nt) {
    const long long n_chunks = static_cast<long long>((n + kChunk - 1) / kChunk);
    T mx = 0;
    RegionProbe probe(nt);
#pragma omp parallel num_threads(nt)
    {
        probe.enter();
#pragma omp for schedule(static) reduction(max : mx)
        for (long long c = 0; c < n_chunks; ++c) {
            const std::size_t b = static_cast<std::size_t>(c) * kChunk, m = std::min(kChunk, n - b);
            const T v = max_abs_chunk<T, Mask>(w + b, mask_from<Mask>(mask, b), m);
            mx = v > mx ? v : mx;
        }
    }
    if (!(mx > 0)) return 0.0;
    using D = std::numeric_limits<double>;
    const int e = std::min(std::max(std::ilogb(static_cast<double>(mx)), 2 - D::max_exponent), -D::min_exponent);
    const double s = std::ldexp(1.0, -e);
    const double total = sum_over_chunks(n, nt, [&](std::size_t b, std::size_t m) {
        return scaled_sq_chunk<T, Mask>(w + b, mask_from<Mask>(mask, b), m, s);
    });
    return std::ldexp(std::sqrt(total), e);
}

// ||w*m||_p from a sum of |v| (P = 1) or of squares (P = 2) over the same n elements.
template <class T, Layout Mask, int P>
double finish_norm(double total, const T* w, const std::uint8_t* mask, std::size_t n, int nt) {
    if (P == 1) return total;
    // float32 squares always lie in double's normal range (1.4e-45^2 = 2e-90, 3.4e38^2 = 1.2e77):
    // the sum is exact enough as it is. Checking it anyway sent every layer whose kept weights are
    // all zero (common at high sparsity) through two more read passes.
    if constexpr (std::is_same_v<T, float>) return std::sqrt(total);
    return sum_sq_unreliable(total, n) ? norm2_scaled<T, Mask>(w, mask, n, nt) : std::sqrt(total);
}

template <class T, Layout Mask, int P>
double norm_impl(const T* w, const std::uint8_t* mask, std::size_t n, int nt) {
    const double total = sum_over_chunks(n, nt, [&](std::size_t b, std::size_t m) {
        return norm_chunk<T, Mask, P>(w + b, mask_from<Mask>(mask, b), m);
    });
    return finish_norm<T, Mask, P>(total, w, mask, n, nt);
}

// The step runs a tile of kTile elements at a time. Where the pruned copy is streamed out (see
// StepStores) and is not aligned for the vector stores, the tile is written to a buffer in cache
// and then streamed out; that costs 5-10% of the step (measured against fused SGD, issue 11), and
// NumPy's and torch's allocations are aligned.
constexpr std::size_t kTile = 512;

template <class T>
inline void stream_store(T* dst, const T* src, std::size_t n) {
#if defined(FEDDIP_X86_AVX2)
    std::size_t i = 0;
    for (; i < n && (reinterpret_cast<std::uintptr_t>(dst + i) & 15) != 0; ++i) dst[i] = src[i];
    constexpr std::size_t L = 16 / sizeof(T);
    for (; i + L <= n; i += L) {
        if constexpr (std::is_same_v<T, float>)
            _mm_stream_ps(dst + i, _mm_loadu_ps(src + i));
        else
            _mm_stream_pd(dst + i, _mm_loadu_pd(src + i));
    }
    for (; i < n; ++i) dst[i] = src[i];
#else
    std::memcpy(dst, src, n * sizeof(T));
#endif
}

inline void stream_fence() {
#if defined(FEDDIP_X86_AVX2)
    _mm_sfence();
#endif
}

template <class T, Layout Mask, bool Mom, bool Pruned, int P>
FEDDIP_VECTOR_CLONES double step_tile(T* w, const T* g, const std::uint8_t* mask, T* buf, T* out, std::size_t n,
                                 T lr, T wd, T reg, T scale, T mom) {
    // P == 2: reg * scale = lam / ||w*m||_2, split so that neither factor overflows; P == 1: reg = lam.
    // The scale multiplies the masked value, which is bounded by the norm; an unmasked w_i * scale could overflow.
    double acc = 0;
#pragma omp simd reduction(+ : acc)
    for (std::size_t i = 0; i < n; ++i) {
        const T wi = w[i];
        const T mi = mask_at<Mask, T>(mask, i);
        T d = g[i] + wd * wi + reg * (P == 2 ? (mi * wi) * scale : mi * sign(wi));
        if (Mom) {
            d = mom * buf[i] + d;
            buf[i] = d;
        }
        const T wn = wi - lr * d;
        w[i] = wn;
        const T v = wn * mi;
        if (Pruned) out[i] = v;
        const double v64 = static_cast<double>(v);
        acc += P == 2 ? v64 * v64 : std::abs(v64);
    }
    return acc;
}

#if defined(FEDDIP_X86_AVX2)
// The step with AVX2 + FMA, chosen at run time. Compilers vectorise step_tile's mix of byte masks
// and floats poorly (narrow vectors, accumulators spilled to the stack), which made the step
// compute-bound; this loop does the same arithmetic 8 (float) or 4 (double) lanes at a time.

#define FEDDIP_AVX2 __attribute__((target("avx2,fma"), always_inline)) static inline

template <class T>
struct Avx2;

template <>
struct Avx2<double> {
    using V = __m256d;
    static constexpr std::size_t W = 4;
    FEDDIP_AVX2 V set1(double x) { return _mm256_set1_pd(x); }
    FEDDIP_AVX2 V load(const double* p) { return _mm256_loadu_pd(p); }
    FEDDIP_AVX2 void store(double* p, V v) { _mm256_storeu_pd(p, v); }
    FEDDIP_AVX2 V add(V a, V b) { return _mm256_add_pd(a, b); }
    FEDDIP_AVX2 V sub(V a, V b) { return _mm256_sub_pd(a, b); }
    FEDDIP_AVX2 V mul(V a, V b) { return _mm256_mul_pd(a, b); }
    FEDDIP_AVX2 V fmadd(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
    FEDDIP_AVX2 V fnmadd(V a, V b, V c) { return _mm256_fnmadd_pd(a, b, c); }
    FEDDIP_AVX2 V and_(V a, V b) { return _mm256_and_pd(a, b); }
    FEDDIP_AVX2 V andnot(V a, V b) { return _mm256_andnot_pd(a, b); }
    FEDDIP_AVX2 V gt(V a, V b) { return _mm256_cmp_pd(a, b, _CMP_GT_OQ); }
    FEDDIP_AVX2 V abs_bits() { return _mm256_castsi256_pd(_mm256_set1_epi64x(0x7fffffffffffffffLL)); }
    // (bits: i is a multiple of 4, half a mask byte)
    FEDDIP_AVX2 V mask_zero(const std::uint8_t* m, std::size_t i, bool bits) {
        __m256i k;
        if (bits) {
            k = _mm256_and_si256(_mm256_set1_epi64x(m[i >> 3] >> (i & 7)), _mm256_setr_epi64x(1, 2, 4, 8));
        } else {
            std::int32_t four;
            std::memcpy(&four, m + i, 4);
            k = _mm256_cvtepu8_epi64(_mm_cvtsi32_si128(four));
        }
        return _mm256_castsi256_pd(_mm256_cmpeq_epi64(k, _mm256_setzero_si256()));
    }
    using Acc = V;
    FEDDIP_AVX2 Acc acc_zero() { return _mm256_setzero_pd(); }
    template <int P>
    FEDDIP_AVX2 Acc acc_add(Acc a, V v) {
        return P == 2 ? fmadd(v, v, a) : add(and_(v, abs_bits()), a);
    }
    // Four lanes added as (x0 + x2) + (x1 + x3).
    FEDDIP_AVX2 double lanes_sum(V a) {
        alignas(32) double x[4];
        _mm256_store_pd(x, a);
        return (x[0] + x[2]) + (x[1] + x[3]);
    }
    FEDDIP_AVX2 double acc_sum(Acc a0, Acc a1) { return lanes_sum(_mm256_add_pd(a0, a1)); }
};

template <>
struct Avx2<float> {
    using V = __m256;
    static constexpr std::size_t W = 8;
    FEDDIP_AVX2 V set1(float x) { return _mm256_set1_ps(x); }
    FEDDIP_AVX2 V load(const float* p) { return _mm256_loadu_ps(p); }
    FEDDIP_AVX2 void store(float* p, V v) { _mm256_storeu_ps(p, v); }
    FEDDIP_AVX2 V add(V a, V b) { return _mm256_add_ps(a, b); }
    FEDDIP_AVX2 V sub(V a, V b) { return _mm256_sub_ps(a, b); }
    FEDDIP_AVX2 V mul(V a, V b) { return _mm256_mul_ps(a, b); }
    FEDDIP_AVX2 V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
    FEDDIP_AVX2 V fnmadd(V a, V b, V c) { return _mm256_fnmadd_ps(a, b, c); }
    FEDDIP_AVX2 V and_(V a, V b) { return _mm256_and_ps(a, b); }
    FEDDIP_AVX2 V andnot(V a, V b) { return _mm256_andnot_ps(a, b); }
    FEDDIP_AVX2 V gt(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_GT_OQ); }
    // All-ones lanes where elements i.. are not kept (bits: i is a multiple of 8, one mask byte).
    FEDDIP_AVX2 V mask_zero(const std::uint8_t* m, std::size_t i, bool bits) {
        const __m256i k =
            bits ? _mm256_and_si256(_mm256_set1_epi32(m[i >> 3]), _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128))
                 : _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(m + i)));
        return _mm256_castsi256_ps(_mm256_cmpeq_epi32(k, _mm256_setzero_si256()));
    }
    // The norm's terms accumulate in double: the 8 lanes widened into two vectors of 4.
    struct Acc {
        __m256d lo, hi;
    };
    FEDDIP_AVX2 Acc acc_zero() { return {_mm256_setzero_pd(), _mm256_setzero_pd()}; }
    template <int P>
    FEDDIP_AVX2 Acc acc_add(Acc a, V v) {
        const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v)), hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
        if constexpr (P == 2) return {_mm256_fmadd_pd(lo, lo, a.lo), _mm256_fmadd_pd(hi, hi, a.hi)};
        const __m256d sign = _mm256_set1_pd(-0.0);
        return {_mm256_add_pd(_mm256_andnot_pd(sign, lo), a.lo), _mm256_add_pd(_mm256_andnot_pd(sign, hi), a.hi)};
    }
    // a0 holds the terms of elements 0-7 of each group of 16, a1 those of 8-15: as step_tile_avx512's
    // two accumulators, and added up as they are there.
    FEDDIP_AVX2 double acc_sum(Acc a0, Acc a1) {
        const __m256d s_lo = _mm256_add_pd(a0.lo, a1.lo), s_hi = _mm256_add_pd(a0.hi, a1.hi);
        return Avx2<double>::lanes_sum(_mm256_add_pd(s_lo, s_hi));
    }
};


// The AVX2 step's constants, and one vector of it: elements [i, i + W), their norm terms added to acc.
template <class T, Layout Mask, bool Mom, bool Pruned, int P, bool Stream>
struct Avx2Step {
    using A = Avx2<T>;
    using V = typename A::V;
    V one, zero, vlr, vwd, vreg, vsc, vmom;

    __attribute__((target("avx2,fma"), always_inline)) inline void vector(std::size_t i, T* w, const T* g,
                                                                          const std::uint8_t* mask, T* buf, T* out,
                                                                          typename A::Acc& acc) const {
        const Avx2Step& c = *this;
        const V wi = A::load(w + i);
        const V mi = Mask == Layout::none ? c.one : A::andnot(A::mask_zero(mask, i, Mask == Layout::bits), c.one);
        // sign(w) as (w > 0) - (0 > w): zero for 0 and NaN, like step_tile.
        const V r = P == 2 ? A::mul(A::mul(mi, wi), c.vsc)
                           : A::mul(mi, A::sub(A::and_(A::gt(wi, c.zero), c.one), A::and_(A::gt(c.zero, wi), c.one)));
        V d = A::fmadd(c.vwd, wi, A::load(g + i));
        d = A::fmadd(c.vreg, r, d);
        if (Mom) {
            d = A::fmadd(c.vmom, A::load(buf + i), d);
            A::store(buf + i, d);
        }
        const V wn = A::fnmadd(c.vlr, d, wi);
        A::store(w + i, wn);
        const V v = A::mul(wn, mi);
        if (Pruned) {
            if constexpr (Stream) {
                if constexpr (std::is_same_v<T, float>) {
                    _mm_stream_ps(out + i, _mm256_castps256_ps128(v));
                    _mm_stream_ps(out + i + 4, _mm256_extractf128_ps(v, 1));
                } else {
                    _mm_stream_pd(out + i, _mm256_castpd256_pd128(v));
                    _mm_stream_pd(out + i + 2, _mm256_extractf128_pd(v, 1));
                }
            } else {
                A::store(out + i, v);
            }
        }
        acc = A::template acc_add<P>(acc, v);
    }
};

// The step, two vectors an iteration (16 floats, 8 doubles), each with its own accumulators: for
// float32 the norm's terms then fall into the lanes of step_tile_avx512's accumulators (element j of
// a group of 16 into lane j) and are added up in the same order, so the two loops give the same
// bits and either may be chosen for a call (see StepTuning).
template <class T, Layout Mask, bool Mom, bool Pruned, int P, bool Stream = false>
__attribute__((target("avx2,fma"))) double step_tile_avx2(T* w, const T* g, const std::uint8_t* mask, T* buf, T* out,
                                                      std::size_t n, T lr, T wd, T reg, T scale, T mom) {
    using S = Avx2Step<T, Mask, Mom, Pruned, P, Stream>;
    using A = typename S::A;
    const S c{A::set1(T(1)), A::set1(T(0)), A::set1(lr), A::set1(wd), A::set1(reg), A::set1(scale), A::set1(mom)};
    typename A::Acc acc0 = A::acc_zero(), acc1 = A::acc_zero();
    std::size_t i = 0;
    // 2 * W is a multiple of 8: with packed bits the scalar tail starts on a mask byte.
    for (; i + 2 * A::W <= n; i += 2 * A::W) {
        c.vector(i, w, g, mask, buf, out, acc0);
        c.vector(i + A::W, w, g, mask, buf, out, acc1);
    }
    double total = A::acc_sum(acc0, acc1);
    if (i < n)
        total += step_tile<T, Mask, Mom, Pruned, P>(w + i, g + i, mask_from<Mask>(mask, i), Mom ? buf + i : nullptr,
                                                    Pruned ? out + i : nullptr, n - i, lr, wd, reg, scale, mom);
    return total;
}

// GCC 12's AVX-512 casts and conversions take an "undefined" source that its uninitialized-value
// warnings report wrongly (GCC bug 105593); the step's loop is silenced for them alone.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
// The float32 step with AVX-512: the same arithmetic as step_tile_avx2, in the same order, 16
// lanes at a time, the mask a lane mask (two bytes of packed bits are one). Half the instructions
// of the AVX2 loop, which bound the step where its arrays stay in cache or the core's memory is
// fast (benchmarks/RESULTS.md, issue 11).
template <Layout Mask, bool Mom, bool Pruned, int P, int Stream = 0>  // Stream: the copy's alignment for NT stores
__attribute__((target("avx512f,avx2,fma"))) double step_tile_avx512(float* w, const float* g, const std::uint8_t* mask,
                                                                 float* buf, float* out, std::size_t n, float lr,
                                                                 float wd, float reg, float scale, float mom) {
    const __m512 one = _mm512_set1_ps(1.0f), zero = _mm512_setzero_ps(), vlr = _mm512_set1_ps(lr),
                 vwd = _mm512_set1_ps(wd), vreg = _mm512_set1_ps(reg), vsc = _mm512_set1_ps(scale),
                 vmom = _mm512_set1_ps(mom);
    __m512d acc_lo = _mm512_setzero_pd(), acc_hi = _mm512_setzero_pd();
    std::size_t i = 0;
    // The scalar tail starts where the AVX2 loop's does, on a mask byte.
    for (; i + 16 <= n; i += 16) {
        const __m512 wi = _mm512_loadu_ps(w + i);
        __m512 mi = one;
        if constexpr (Mask == Layout::bits) {
            std::uint16_t k;
            std::memcpy(&k, mask + i / 8, 2);
            mi = _mm512_maskz_mov_ps(k, one);
        } else if constexpr (Mask == Layout::bytes) {
            const __m512i x = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mask + i)));
            mi = _mm512_maskz_mov_ps(_mm512_test_epi32_mask(x, x), one);
        }
        __m512 r;
        if constexpr (P == 2) {
            r = _mm512_mul_ps(_mm512_mul_ps(mi, wi), vsc);
        } else {  // sign(w) as (w > 0) - (0 > w): zero for 0 and NaN
            r = _mm512_mul_ps(mi, _mm512_sub_ps(_mm512_maskz_mov_ps(_mm512_cmp_ps_mask(wi, zero, _CMP_GT_OQ), one),
                                                _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(zero, wi, _CMP_GT_OQ), one)));
        }
        __m512 d = _mm512_fmadd_ps(vwd, wi, _mm512_loadu_ps(g + i));
        d = _mm512_fmadd_ps(vreg, r, d);
        if constexpr (Mom) {
            d = _mm512_fmadd_ps(vmom, _mm512_loadu_ps(buf + i), d);
            _mm512_storeu_ps(buf + i, d);
        }
        const __m512 wn = _mm512_fnmadd_ps(vlr, d, wi);
        _mm512_storeu_ps(w + i, wn);
        const __m512 v = _mm512_mul_ps(wn, mi);
        if constexpr (Pruned) {
            if constexpr (Stream == 64) {
                _mm512_stream_ps(out + i, v);
            } else if constexpr (Stream == 16) {  // the copy only 16-byte aligned (NumPy's large arrays)
                const __m256 a = _mm512_castps512_ps256(v);
                const __m256 b = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
                _mm_stream_ps(out + i, _mm256_castps256_ps128(a));
                _mm_stream_ps(out + i + 4, _mm256_extractf128_ps(a, 1));
                _mm_stream_ps(out + i + 8, _mm256_castps256_ps128(b));
                _mm_stream_ps(out + i + 12, _mm256_extractf128_ps(b, 1));
            } else {
                _mm512_storeu_ps(out + i, v);
            }
        }
        // The norm's terms in double: the 16 lanes widened into two vectors of 8.
        const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
        const __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
        if constexpr (P == 2) {
            acc_lo = _mm512_fmadd_pd(lo, lo, acc_lo);
            acc_hi = _mm512_fmadd_pd(hi, hi, acc_hi);
        } else {
            acc_lo = _mm512_add_pd(_mm512_abs_pd(lo), acc_lo);
            acc_hi = _mm512_add_pd(_mm512_abs_pd(hi), acc_hi);
        }
    }
    // Added up as the AVX2 loop adds its accumulators: lane j + lane j + 8, then the halves, then
    // (x0 + x2) + (x1 + x3), so that the two loops give the same bits.
    const __m512d s = _mm512_add_pd(acc_lo, acc_hi);
    const __m256d x = _mm256_add_pd(_mm512_castpd512_pd256(s), _mm512_extractf64x4_pd(s, 1));
    alignas(32) double xs[4];
    _mm256_store_pd(xs, x);
    double total = (xs[0] + xs[2]) + (xs[1] + xs[3]);
    if (i < n)
        total += step_tile<float, Mask, Mom, Pruned, P>(w + i, g + i, mask_from<Mask>(mask, i), Mom ? buf + i : nullptr,
                                                        Pruned ? out + i : nullptr, n - i, lr, wd, reg, scale, mom);
    return total;
}
#pragma GCC diagnostic pop
#endif

template <class T>
using TileLoop = double (*)(T*, const T*, const std::uint8_t*, T*, T*, std::size_t, T, T, T, T, T);

// The loop of `isa` for a tile, writing the pruned copy (if any) through the cache (stream_align 0)
// or with streaming stores for a copy aligned to stream_align bytes (16 or 64); null where there is
// no such loop.
template <class T, Layout Mask, bool Mom, bool Pruned, int P>
TileLoop<T> tile_loop(Isa isa, int stream_align) {
#if defined(FEDDIP_X86_AVX2)
    if constexpr (std::is_same_v<T, float>) {
        if (isa == Isa::avx512) {
            if (stream_align == 0) return &step_tile_avx512<Mask, Mom, Pruned, P, 0>;
            if (stream_align == 64) return &step_tile_avx512<Mask, Mom, Pruned, P, 64>;
            return &step_tile_avx512<Mask, Mom, Pruned, P, 16>;
        }
    }
    if (isa >= Isa::avx2) {
        if (stream_align) return &step_tile_avx2<T, Mask, Mom, Pruned, P, true>;
        return &step_tile_avx2<T, Mask, Mom, Pruned, P, false>;
    }
#endif
    return stream_align ? nullptr : &step_tile<T, Mask, Mom, Pruned, P>;
}

// The step on elements [0, n) of a layer (a chunk) with the loops of `isa`, a tile of kTile elements
// at a time, each tile's norm terms summed in its vector lanes and the tiles' sums added in order:
// every store path below gives the same bits. stream: the pruned copy goes out with streaming
// stores (see StepStores), straight from the registers where it is aligned for them, else through a
// tile in cache; else through the cache.
template <class T, Layout Mask, bool Mom, bool Pruned, int P>
double step_chunk(T* w, const T* g, const std::uint8_t* mask, T* buf, T* pruned, std::size_t n, T lr, T wd,
                  T reg, T scale, T mom, Isa isa, bool stream) {
    int align = 0;
    if (Pruned && stream) {
        const std::uintptr_t at = reinterpret_cast<std::uintptr_t>(pruned);
        align = (at & 63) == 0 ? 64 : (at & 15) == 0 ? 16 : -1;
    }
    const TileLoop<T> direct = align < 0 ? nullptr : tile_loop<T, Mask, Mom, Pruned, P>(isa, align);
    const TileLoop<T> cached = tile_loop<T, Mask, Mom, Pruned, P>(isa, 0);
    alignas(64) T tile[Pruned ? kTile : 1];
    double total = 0;
    for (std::size_t b = 0; b < n; b += kTile) {
        const std::size_t m = std::min(kTile, n - b);
        const std::uint8_t* mb = mask_from<Mask>(mask, b);
        T* bb = Mom ? buf + b : nullptr;
        if (direct) {
            total += direct(w + b, g + b, mb, bb, Pruned ? pruned + b : nullptr, m, lr, wd, reg, scale, mom);
        } else {
            total += cached(w + b, g + b, mb, bb, tile, m, lr, wd, reg, scale, mom);
            stream_store(pruned + b, tile, m);
        }
    }
    if (Pruned && stream) stream_fence();
    return total;
}

// The regulariser's factors for a layer whose ||w*m||_p before the step is `norm`: reg * scale =
// lam / norm for p = 2, reg = lam for p = 1. lam / norm can overflow T for a tiny norm although
// each term lam * w_i / norm is at most lam: w_i is scaled by a power of two (exact, kept within T's
// normal range) and lam divided by the norm scaled alike. A zero or non-finite norm, or lam == 0,
// gives no regulariser term.
template <class T>
std::pair<double, double> regulariser(double lam, int p, double norm) {
    if (p == 1) return {lam, 1.0};
    if (lam == 0 || !(norm > 0) || !std::isfinite(norm)) return {0.0, 1.0};
    using L = std::numeric_limits<T>;
    const int e = std::min(std::max(-std::ilogb(norm), L::min_exponent), L::max_exponent - 2);
    const double scale = std::ldexp(1.0, e);
    return {lam / (norm * scale), scale};
}

// One layer of a step, bound to the kernel instantiation its mask layout, momentum, pruned copy
// and p select: chunk(b, m) steps elements [b, b + m) and returns their norm terms; finish turns
// the layer's summed terms into ||w*m||_p.
template <class T>
struct BoundLayer {
    const LayerStep<T>* layer;
    T lr, wd, reg, scale, mom;
    double (*chunk)(const BoundLayer&, std::size_t b, std::size_t m, Isa isa, bool stream);
    double (*finish)(const BoundLayer&, double total, int nt);
    double (*norm)(const LayerStep<T>&, int nt);
};

template <class T, Layout Mask, bool Mom, bool Pruned, int P>
struct Kernel {
    static double chunk(const BoundLayer<T>& s, std::size_t b, std::size_t m, Isa isa, bool stream) {
        const LayerStep<T>& L = *s.layer;
        return step_chunk<T, Mask, Mom, Pruned, P>(L.w + b, L.g + b, mask_from<Mask>(L.mask.data, b),
                                                   Mom ? L.buf + b : nullptr, Pruned ? L.pruned + b : nullptr, m,
                                                   s.lr, s.wd, s.reg, s.scale, s.mom, isa, stream);
    }
    static double finish(const BoundLayer<T>& s, double total, int nt) {
        return finish_norm<T, Mask, P>(total, s.layer->w, s.layer->mask.data, s.layer->n, nt);
    }
    static double norm(const LayerStep<T>& L, int nt) { return norm_impl<T, Mask, P>(L.w, L.mask.data, L.n, nt); }
};

template <class T, Layout Mask, bool Mom, bool Pruned>
BoundLayer<T> bind_p(int p) {
    BoundLayer<T> s{};
    if (p == 1) {
        s.chunk = &Kernel<T, Mask, Mom, Pruned, 1>::chunk;
        s.finish = &Kernel<T, Mask, Mom, Pruned, 1>::finish;
        s.norm = &Kernel<T, Mask, Mom, Pruned, 1>::norm;
    } else {
        s.chunk = &Kernel<T, Mask, Mom, Pruned, 2>::chunk;
        s.finish = &Kernel<T, Mask, Mom, Pruned, 2>::finish;
        s.norm = &Kernel<T, Mask, Mom, Pruned, 2>::norm;
    }
    return s;
}

template <class T, Layout Mask, bool Mom>
BoundLayer<T> bind_pruned(bool pruned, int p) {
    return pruned ? bind_p<T, Mask, Mom, true>(p) : bind_p<T, Mask, Mom, false>(p);
}

template <class T, Layout Mask>
BoundLayer<T> bind_mom(bool mom, bool pruned, int p) {
    return mom ? bind_pruned<T, Mask, true>(pruned, p) : bind_pruned<T, Mask, false>(pruned, p);
}

template <class T>
BoundLayer<T> bind(const LayerStep<T>& L, int p) {
    const bool mom = L.buf != nullptr, pruned = L.pruned != nullptr;
    if (!L.mask.data) return bind_mom<T, Layout::none>(mom, pruned, p);
    return L.mask.packed ? bind_mom<T, Layout::bits>(mom, pruned, p) : bind_mom<T, Layout::bytes>(mom, pruned, p);
}

// How pruned copies are written (StepStores). Streaming (non-temporal) stores skip the
// read-for-ownership of the copy's lines and keep it from evicting w, g and the buffer; stores
// through the cache leave the copy in cache for the forward pass that reads it next. Not chosen by
// timing: a cached store's write-back to memory comes after the call, so timing calls would favour
// it wherever the step streams from memory.
std::atomic<int> g_step_stores{static_cast<int>(StepStores::stream)};
std::atomic<bool> g_step_tuning{true};

// Which loop runs a float32 step on an AVX-512 CPU (StepTuning). The AVX-512 loop runs half the
// instructions of the AVX2 one, which wins where the step is bound by them (its arrays in cache:
// 6-29% on this project's Zen 4 machine), and lost 3-8% from memory on one Zen 4 core. Which
// holds depends on the machine, the model's size and the thread count, so the first calls of each
// size and thread count time both and the faster is kept. Both give the same bits.
struct LoopTrial {
    bool narrow = false;  // the AVX2 loop
    bool timed = false;
    std::pair<int, int> key{};  // size class, threads
};

class LoopTuner {
public:
    // Calls of each loop timed before choosing, after one untimed call (its page faults and cold
    // caches would count against whichever loop it ran).
    static constexpr int kTrials = 4;

    LoopTrial plan(std::size_t bytes, int threads) {
        if (!g_step_tuning.load(std::memory_order_relaxed)) return {};
        LoopTrial t;
        t.key = {bytes ? 63 - __builtin_clzll(bytes) : 0, threads};  // floor(log2(bytes))
        std::lock_guard<std::mutex> lock(mu_);
        Entry& e = table_[t.key];
        if (e.chosen >= 0) {
            t.narrow = e.chosen == 1;
            return t;
        }
        const int call = e.calls++;
        t.narrow = call % 2 == 0 && call > 0;  // the first, untimed call runs the AVX-512 loop
        t.timed = call > 0;
        return t;
    }

    void report(const LoopTrial& t, double seconds) {
        std::lock_guard<std::mutex> lock(mu_);
        Entry& e = table_[t.key];
        const int loop = t.narrow ? 1 : 0;
        e.best[loop] = std::min(e.best[loop], seconds);
        ++e.timed[loop];
        if (e.chosen < 0 && e.timed[0] >= kTrials && e.timed[1] >= kTrials)
            e.chosen = e.best[1] < e.best[0] ? 1 : 0;
    }

    std::vector<StepTuningChoice> choices() {
        std::lock_guard<std::mutex> lock(mu_);
        std::vector<StepTuningChoice> out;
        for (const auto& [key, e] : table_) {
            const char* chosen = e.chosen < 0 ? "open" : e.chosen == 1 ? "avx2" : "avx512";
            out.push_back({key.first, key.second, chosen, e.best[0], e.best[1]});
        }
        return out;
    }

    void forget() {
        std::lock_guard<std::mutex> lock(mu_);
        table_.clear();
    }

private:
    struct Entry {
        int calls = 0, chosen = -1, timed[2] = {0, 0};  // chosen: 0 AVX-512, 1 AVX2
        double best[2] = {std::numeric_limits<double>::infinity(), std::numeric_limits<double>::infinity()};
    };
    std::mutex mu_;
    std::map<std::pair<int, int>, Entry> table_;
};

LoopTuner& loop_tuner() {
    static LoopTuner tuner;
    return tuner;
}

}  // namespace

template <class T>
std::vector<double> masked_ef_step_many(const std::vector<LayerStep<T>>& layers, const EFStepParams& prm,
                                        int n_threads) {
    if (prm.p != 1 && prm.p != 2) throw std::invalid_argument("p must be 1 or 2");
    std::size_t total = 0;
    for (const LayerStep<T>& L : layers) total += L.n;
    const int nt = threads_for(n_threads, total);
    // Bind each layer, with its norm before the step (an extra read pass where not given).
    std::vector<BoundLayer<T>> bound;
    bound.reserve(layers.size());
    for (const LayerStep<T>& L : layers) {
        BoundLayer<T> s = bind(L, prm.p);
        const double norm = L.norm < 0 ? s.norm(L, threads_for(n_threads, L.n)) : L.norm;
        const auto [reg, scale] = regulariser<T>(prm.lam, prm.p, norm);
        s.layer = &L;
        s.lr = T(prm.lr), s.wd = T(prm.weight_decay), s.reg = T(reg), s.scale = T(scale), s.mom = T(prm.momentum);
        bound.push_back(s);
    }
    // Every layer's chunks in one parallel loop: one fork and join for the whole model, and small
    // layers share the threads. Each layer's terms are added in chunk order, so the norms are the
    // same bits whatever the thread count and whether layers are stepped together or alone.
    struct Piece {
        std::size_t layer, begin, size;
    };
    std::vector<Piece> pieces;
    pieces.reserve(total / kChunk + layers.size());
    for (std::size_t l = 0; l < layers.size(); ++l)
        for (std::size_t b = 0; b < layers[l].n; b += kChunk) pieces.push_back({l, b, std::min(kChunk, layers[l].n - b)});
    std::vector<double> part(pieces.size());
    const long long n_pieces = static_cast<long long>(pieces.size());
    // The loop (StepTuning), by the size of what the step reads and writes (w, g and the buffer, the
    // copies, the masks): timed while the loops are tried out.
    LoopTrial trial;
    if (std::is_same_v<T, float> && isa() == Isa::avx512) {
        std::size_t bytes = 0;
        for (const LayerStep<T>& L : layers) {
            const std::size_t arrays = 3 + (L.buf ? 2 : 0) + (L.pruned ? 1 : 0);
            bytes += L.n * sizeof(T) * arrays + (L.mask.data ? (L.mask.packed ? (L.n + 7) / 8 : L.n) : 0);
        }
        trial = loop_tuner().plan(bytes, nt);
    }
    const Isa loop = trial.narrow ? Isa::avx2 : isa();
    const bool stream = g_step_stores.load(std::memory_order_relaxed) == static_cast<int>(StepStores::stream);
    const auto t0 = std::chrono::steady_clock::now();
    parallel_for(nt, n_pieces, [&](long long c) {
        const Piece& pc = pieces[static_cast<std::size_t>(c)];
        const BoundLayer<T>& s = bound[pc.layer];
        part[static_cast<std::size_t>(c)] = s.chunk(s, pc.begin, pc.size, loop, stream);
    });
    if (trial.timed)
        loop_tuner().report(trial, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    std::vector<double> norms(layers.size(), 0.0);
    for (std::size_t c = 0; c < pieces.size(); ++c) norms[pieces[c].layer] += part[c];
    for (std::size_t l = 0; l < layers.size(); ++l)
        norms[l] = bound[l].finish(bound[l], norms[l], threads_for(n_threads, layers[l].n));
    return norms;
}

template <class T>
double masked_ef_step(T* w, const T* g, MaskRef mask, T* buf, T* pruned, std::size_t n,
                      const EFStepParams& params, double norm, int n_threads) {
    const std::vector<LayerStep<T>> one{{w, g, mask, buf, pruned, n, norm}};
    return masked_ef_step_many(one, params, n_threads)[0];
}

StepStores set_step_stores(StepStores stores) {
    return static_cast<StepStores>(g_step_stores.exchange(static_cast<int>(stores)));
}

StepStores step_stores() { return static_cast<StepStores>(g_step_stores.load()); }

bool set_step_tuning(bool on) { return g_step_tuning.exchange(on); }

bool step_tuning() { return g_step_tuning.load(); }

std::vector<StepTuningChoice> step_tuning_choices() { return loop_tuner().choices(); }

void forget_step_tuning() { loop_tuner().forget(); }

template <class T>
double masked_norm(const T* w, MaskRef mask, std::size_t n, int p, int n_threads) {
    if (p != 1 && p != 2) throw std::invalid_argument("p must be 1 or 2");
    const int nt = threads_for(n_threads, n);
    const std::uint8_t* m = mask.data;
    if (!m) return p == 1 ? norm_impl<T, Layout::none, 1>(w, m, n, nt) : norm_impl<T, Layout::none, 2>(w, m, n, nt);
    if (mask.packed)
        return p == 1 ? norm_impl<T, Layout::bits, 1>(w, m, n, nt) : norm_impl<T, Layout::bits, 2>(w, m, n, nt);
    return p == 1 ? norm_impl<T, Layout::bytes, 1>(w, m, n, nt) : norm_impl<T, Layout::bytes, 2>(w, m, n, nt);
}

template std::vector<double> masked_ef_step_many(const std::vector<LayerStep<float>>&, const EFStepParams&, int);
template std::vector<double> masked_ef_step_many(const std::vector<LayerStep<double>>&, const EFStepParams&, int);
template double masked_ef_step(float*, const float*, MaskRef, float*, float*, std::size_t, const EFStepParams&,
                               double, int);
template double masked_ef_step(double*, const double*, MaskRef, double*, double*, std::size_t, const EFStepParams&,
                               double, int);
template double masked_norm(const float*, MaskRef, std::size_t, int, int);
template double masked_norm(const double*, MaskRef, std::size_t, int, int);

}  // namespace feddip
