// The global top-k's fast path: the pass over one slice that counts the keys above the sample's
// bracket and gathers those inside it, in the generic loop (which the compiler vectorises) and the
// float32 AVX2 and AVX-512 loops, which compact with a permute or a compress.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "topk_internal.hpp"

#ifdef FEDDIP_X86
#include <immintrin.h>

#include "lanes.hpp"
#endif

namespace feddip::topk {
namespace {

// The pass over one slice: count keys > hi, append keys in [lo, hi], and where `mask` is given,
// write mask[i] = key > hi and append the candidates' indices (base + i) too. Blocks of kBlock get
// a vectorised count first and are compacted (branchless) only when they hold candidates. Keys
// have the top bit clear, so signed compares, which SSE2/AVX2 have for 32-bit lanes, order them.
template <class T, class S>
FEDDIP_VECTOR_CLONES void scan_slice(const T* p, std::size_t m, S hi, S lo, Scan<bits_t<T>>& scan, std::uint8_t* mask,
                                     std::uint32_t base) {
    using U = bits_t<T>;
    const S inf = static_cast<S>(inf_key<T>());
    for (std::size_t b0 = 0; b0 < m; b0 += kBlock) {
        const std::size_t b1 = std::min(m, b0 + kBlock);
        std::uint32_t above = 0, inside = 0, nan = 0;
        for (std::size_t i = b0; i < b1; ++i) {
            const S key = static_cast<S>(magnitude_key(p[i]));
            above += key > hi;
            inside += key >= lo;
            nan += key > inf;
        }
        if (mask)
            for (std::size_t i = b0; i < b1; ++i) mask[i] = static_cast<S>(magnitude_key(p[i])) > hi;
        scan.above += above;
        scan.nan |= nan != 0;
        if (inside == above) continue;
        if (scan.size + kBlock > scan.cap) {
            scan.overflow = true;
            return;
        }
        U* out = scan.out + scan.size;
        std::uint32_t* pos = mask ? scan.pos + scan.size : nullptr;
        std::size_t j = 0;
        for (std::size_t i = b0; i < b1; ++i) {
            const S key = static_cast<S>(magnitude_key(p[i]));
            out[j] = static_cast<U>(key);
            if (pos) pos[j] = base + static_cast<std::uint32_t>(i);
            j += (key >= lo) & (key <= hi);
        }
        scan.size += j;
    }
}

#ifdef FEDDIP_X86

// The float32 pass with AVX2. Branchless: every block's candidates are packed eight lanes at a
// time by a permute from kCompressLanes and stored, most of the time zero of them. A branch on "this block
// holds one" mispredicts often and cost more (GCC does not vectorise a
// compaction by itself).
template <bool Masks>
__attribute__((target("avx2,popcnt"))) void scan_slice_avx2(const float* p, std::size_t m, std::int32_t hi,
                                                            std::int32_t lo, Scan<std::uint32_t>& scan,
                                                            std::uint8_t* mask) {
    const __m256i sign_clear = _mm256_set1_epi32(0x7fffffff);
    const __m256i vhi = _mm256_set1_epi32(hi);
    const __m256i vlo = _mm256_set1_epi32(lo - 1);  // key >= lo as key > lo - 1 (lo >= 0)
    const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256i above = _mm256_setzero_si256(), peak = _mm256_setzero_si256();
    std::uint32_t* out = scan.out + scan.size;
    std::uint32_t* pos = Masks ? scan.pos + scan.size : nullptr;
    std::uint32_t* const end = scan.out + scan.cap;
    std::size_t i = 0;
    for (; i + kBlock <= m; i += kBlock) {
        if (end - out < std::ptrdiff_t(kBlock)) {
            scan.overflow = true;
            return;
        }
        for (std::size_t q = 0; q < kBlock; q += 8) {
            const __m256i key =
                _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + q)), sign_clear);
            const __m256i gt = _mm256_cmpgt_epi32(key, vhi);
            above = _mm256_sub_epi32(above, gt);
            peak = _mm256_max_epi32(peak, key);
            const __m256i in = _mm256_andnot_si256(gt, _mm256_cmpgt_epi32(key, vlo));
            const int bits = _mm256_movemask_ps(_mm256_castsi256_ps(in));
            const __m256i lanes =
                _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(kCompressLanes.entry + bits)));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_permutevar8x32_epi32(key, lanes));
            const int count = _mm_popcnt_u32(static_cast<unsigned>(bits));
            out += count;
            if constexpr (Masks) {
                const int kept = _mm256_movemask_ps(_mm256_castsi256_ps(gt));
                std::memcpy(mask + i + q, kMaskBytes.entry + kept, 8);
                const __m256i index = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(i + q)), iota);
                _mm256_storeu_si256(reinterpret_cast<__m256i*>(pos), _mm256_permutevar8x32_epi32(index, lanes));
                pos += count;
            }
        }
    }
    scan.size = static_cast<std::size_t>(out - scan.out);
    alignas(32) std::int32_t lane[8];  // lane counts stay below 2^31: a slice is kSlice elements
    _mm256_store_si256(reinterpret_cast<__m256i*>(lane), above);
    for (int q = 0; q < 8; ++q) scan.above += static_cast<std::uint32_t>(lane[q]);
    _mm256_store_si256(reinterpret_cast<__m256i*>(lane), peak);
    for (int q = 0; q < 8; ++q) scan.nan |= lane[q] > std::int32_t(inf_key<float>());
    if (i < m)
        scan_slice<float, std::int32_t>(p + i, m - i, hi, lo, scan, Masks ? mask + i : nullptr,
                                        static_cast<std::uint32_t>(i));
}

// The float32 pass with AVX-512: compares give lane masks, and a register compress packs the
// candidates (the compress-to-memory form is microcoded and slow on AMD Zen 4).
template <bool Masks>
__attribute__((target("avx512f,popcnt"))) void scan_slice_avx512(const float* p, std::size_t m, std::int32_t hi,
                                                                 std::int32_t lo, Scan<std::uint32_t>& scan,
                                                                 std::uint8_t* mask) {
    const __m512i sign_clear = _mm512_set1_epi32(0x7fffffff);
    const __m512i vhi = _mm512_set1_epi32(hi);
    const __m512i vlo = _mm512_set1_epi32(lo);
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512i peak = _mm512_setzero_si512();
    std::uint64_t above = 0;
    std::uint32_t* out = scan.out + scan.size;
    std::uint32_t* pos = Masks ? scan.pos + scan.size : nullptr;
    std::uint32_t* const end = scan.out + scan.cap;
    std::size_t i = 0;
    for (; i + kBlock <= m; i += kBlock) {
        if (end - out < std::ptrdiff_t(kBlock)) {
            scan.overflow = true;
            return;
        }
        for (std::size_t q = 0; q < kBlock; q += 16) {
            const __m512i key = _mm512_and_si512(_mm512_loadu_si512(p + i + q), sign_clear);
            const __mmask16 gt = _mm512_cmpgt_epi32_mask(key, vhi);
            const __mmask16 in = _mm512_mask_cmpge_epi32_mask(static_cast<__mmask16>(~gt), key, vlo);
            above += static_cast<unsigned>(_mm_popcnt_u32(gt));
            // The masked form: the plain _mm512_max_epi32 trips GCC 12's -Wmaybe-uninitialized.
            peak = _mm512_mask_max_epi32(peak, __mmask16(0xffff), peak, key);
            _mm512_storeu_si512(out, _mm512_maskz_compress_epi32(in, key));
            const int count = _mm_popcnt_u32(in);
            out += count;
            if constexpr (Masks) {
                // The merge form of the narrowing: the plain one trips the same GCC warning.
                _mm_storeu_si128(
                    reinterpret_cast<__m128i*>(mask + i + q),
                    _mm512_mask_cvtepi32_epi8(_mm_setzero_si128(), __mmask16(0xffff), _mm512_maskz_set1_epi32(gt, 1)));
                const __m512i index = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(i + q)), iota);
                _mm512_storeu_si512(pos, _mm512_maskz_compress_epi32(in, index));
                pos += count;
            }
        }
    }
    scan.size = static_cast<std::size_t>(out - scan.out);
    scan.above += above;
    scan.nan |= _mm512_cmpgt_epi32_mask(peak, _mm512_set1_epi32(std::int32_t(inf_key<float>()))) != 0;
    if (i < m)
        scan_slice<float, std::int32_t>(p + i, m - i, hi, lo, scan, Masks ? mask + i : nullptr,
                                        static_cast<std::uint32_t>(i));
}

#endif

}  // namespace

// The widest loop `isa` (isa() at the call, which tests cap) allows.
template <class T>
void scan(const Slice<T>& ch, std::make_signed_t<bits_t<T>> hi, std::make_signed_t<bits_t<T>> lo, Scan<bits_t<T>>& sc,
          Isa isa, std::uint8_t* mask) {
    if (sc.overflow) return;  // the fast path has failed already: the caller falls back
    if (!sc.reserve(ch.size + kBlock, mask != nullptr)) {  // the slice's keys, all of them if need be
        sc.overflow = true;
        return;
    }
#ifdef FEDDIP_X86
    if constexpr (sizeof(T) == 4) {
        if (isa == Isa::avx512)
            return mask ? scan_slice_avx512<true>(ch.data, ch.size, hi, lo, sc, mask)
                        : scan_slice_avx512<false>(ch.data, ch.size, hi, lo, sc, nullptr);
        if (isa == Isa::avx2)
            return mask ? scan_slice_avx2<true>(ch.data, ch.size, hi, lo, sc, mask)
                        : scan_slice_avx2<false>(ch.data, ch.size, hi, lo, sc, nullptr);
    }
#endif
    (void)isa;
    scan_slice<T>(ch.data, ch.size, hi, lo, sc, mask, 0);
}

template void scan(const Slice<float>&, std::int32_t, std::int32_t, Scan<std::uint32_t>&, Isa, std::uint8_t*);
template void scan(const Slice<double>&, std::int64_t, std::int64_t, Scan<std::uint64_t>&, Isa, std::uint8_t*);

}  // namespace feddip::topk
