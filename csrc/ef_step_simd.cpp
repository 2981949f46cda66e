// The error-feedback step's loops over a block of a layer: the generic loop (which the compiler
// vectorises; the vector loops match it bit for bit and run their tails with it), the AVX2 + FMA
// loop and the float32 AVX-512 loop, and the tiles that carry the pruned copy out through the cache
// or with streaming stores. ef_step.cpp binds a layer to one instantiation of step_block.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common.hpp"
#include "ef_step_internal.hpp"

#ifdef FEDDIP_X86
#include <immintrin.h>
#endif

namespace feddip::step {
namespace {

// sign(x) with sign(0) = 0, written as selects so that loops using it vectorise.
template <class T>
inline T sign(T x) {
    const T pos = x > T(0) ? T(1) : T(0);
    const T neg = x < T(0) ? T(1) : T(0);
    return pos - neg;
}

// The step runs a tile of kTile elements at a time. Where the pruned copy is streamed out (see
// StepStores) and is not aligned for the vector stores, the tile is written to a buffer in cache
// and then streamed out; that costs a few percent of the step (benchmarks/RESULTS.md), and
// NumPy's and torch's allocations are aligned.
constexpr std::size_t kTile = 512;

template <class T>
inline void stream_store(T* dst, const T* src, std::size_t n) {
#ifdef FEDDIP_X86
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
#ifdef FEDDIP_X86
    _mm_sfence();
#endif
}

template <class T, Layout Mask, bool Mom, bool Pruned, int P>
FEDDIP_VECTOR_CLONES double step_tile(T* w, const T* g, const std::uint8_t* mask, T* buf, T* out, std::size_t n, T lr,
                                      T wd, T reg, T scale, T mom) {
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

#ifdef FEDDIP_X86
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
        const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v)),
                      hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
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

// GCC 12's AVX-512 extracts, casts and widenings pass an "undefined" vector as the source of the
// unselected lanes, which its uninitialised-value warnings report (GCC bug 105593). Their
// zero-masking forms with every lane selected are the same instructions (a merge under an all-ones
// mask folds away) and leave the warnings on for the rest of the code.
#define FEDDIP_AVX512 __attribute__((target("avx512f"), always_inline)) static inline

FEDDIP_AVX512 __m512i widen_bytes(__m128i x) { return _mm512_maskz_cvtepu8_epi32(__mmask16(0xffff), x); }
FEDDIP_AVX512 __m256d half(__m512d v, int high) {
    return high ? _mm512_maskz_extractf64x4_pd(__mmask8(0xff), v, 1)
                : _mm512_maskz_extractf64x4_pd(__mmask8(0xff), v, 0);
}
FEDDIP_AVX512 __m256 half(__m512 v, int high) { return _mm256_castpd_ps(half(_mm512_castps_pd(v), high)); }
FEDDIP_AVX512 __m512d widen(__m256 x) { return _mm512_maskz_cvtps_pd(__mmask8(0xff), x); }

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
            const __m512i x = widen_bytes(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mask + i)));
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
                const __m256 a = half(v, 0), b = half(v, 1);
                _mm_stream_ps(out + i, _mm256_castps256_ps128(a));
                _mm_stream_ps(out + i + 4, _mm256_extractf128_ps(a, 1));
                _mm_stream_ps(out + i + 8, _mm256_castps256_ps128(b));
                _mm_stream_ps(out + i + 12, _mm256_extractf128_ps(b, 1));
            } else {
                _mm512_storeu_ps(out + i, v);
            }
        }
        // The norm's terms in double: the 16 lanes widened into two vectors of 8.
        const __m512d lo = widen(half(v, 0)), hi = widen(half(v, 1));
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
    const __m256d x = _mm256_add_pd(half(s, 0), half(s, 1));
    alignas(32) double xs[4];
    _mm256_store_pd(xs, x);
    double total = (xs[0] + xs[2]) + (xs[1] + xs[3]);
    if (i < n)
        total += step_tile<float, Mask, Mom, Pruned, P>(w + i, g + i, mask_from<Mask>(mask, i), Mom ? buf + i : nullptr,
                                                        Pruned ? out + i : nullptr, n - i, lr, wd, reg, scale, mom);
    return total;
}
#endif

template <class T>
using TileLoop = double (*)(T*, const T*, const std::uint8_t*, T*, T*, std::size_t, T, T, T, T, T);

// The loop of `isa` for a tile, writing the pruned copy (if any) through the cache (stream_align 0)
// or with streaming stores for a copy aligned to stream_align bytes (16 or 64); null where there is
// no such loop.
template <class T, Layout Mask, bool Mom, bool Pruned, int P>
TileLoop<T> tile_loop(Isa isa, int stream_align) {
#ifdef FEDDIP_X86
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

}  // namespace

// A tile of kTile elements at a time, each tile's norm terms summed in its vector lanes and the
// tiles' sums added in order: every store path below gives the same bits. stream: the pruned copy
// goes out with streaming stores (see StepStores), straight from the registers where it is aligned
// for them, else through a tile in cache; else through the cache.
template <class T, Layout Mask, bool Mom, bool Pruned, int P>
double step_block(T* w, const T* g, const std::uint8_t* mask, T* buf, T* pruned, std::size_t n, T lr, T wd, T reg,
                  T scale, T mom, Isa isa, bool stream) {
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

// Every instantiation ef_step.cpp binds: both types, each mask layout, with and without momentum
// and a pruned copy, p = 1 and 2.
#define FEDDIP_STEP_BLOCK(T, M, MOM, PR, P)                                                                            \
    template double step_block<T, Layout::M, MOM, PR, P>(T*, const T*, const std::uint8_t*, T*, T*, std::size_t, T, T, \
                                                         T, T, T, Isa, bool);
#define FEDDIP_STEP_BLOCK_P(T, M, MOM, PR) FEDDIP_STEP_BLOCK(T, M, MOM, PR, 1) FEDDIP_STEP_BLOCK(T, M, MOM, PR, 2)
#define FEDDIP_STEP_BLOCK_PR(T, M, MOM) FEDDIP_STEP_BLOCK_P(T, M, MOM, false) FEDDIP_STEP_BLOCK_P(T, M, MOM, true)
#define FEDDIP_STEP_BLOCK_MOM(T, M) FEDDIP_STEP_BLOCK_PR(T, M, false) FEDDIP_STEP_BLOCK_PR(T, M, true)
#define FEDDIP_STEP_BLOCK_T(T) \
    FEDDIP_STEP_BLOCK_MOM(T, none) FEDDIP_STEP_BLOCK_MOM(T, bytes) FEDDIP_STEP_BLOCK_MOM(T, bits)
FEDDIP_STEP_BLOCK_T(float)
FEDDIP_STEP_BLOCK_T(double)
#undef FEDDIP_STEP_BLOCK_T
#undef FEDDIP_STEP_BLOCK_MOM
#undef FEDDIP_STEP_BLOCK_PR
#undef FEDDIP_STEP_BLOCK_P
#undef FEDDIP_STEP_BLOCK

}  // namespace feddip::step
