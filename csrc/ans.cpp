#include "ans.hpp"

#include "common.hpp"
#include "isa.hpp"

#include <algorithm>
#include <cstring>
#include <numeric>
#include <stdexcept>
#include <type_traits>

#ifdef FEDDIP_X86
// GCC 12's AVX-512 intrinsics pass an undefined source vector to their masked builtins, which
// -Wmaybe-uninitialized reports at the header's lines wherever they are inlined; in this file,
// whose vector loops use many of them, the warning is off (every other file keeps it).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>
#endif

namespace feddip {

namespace {

constexpr std::uint32_t kLow = 1u << 15;     // states live in [kLow, 2^31)
constexpr unsigned kMaxLanes = 32;

std::uint64_t magnitude_mask(unsigned word_bits) {
    return word_bits >= 64 ? ~std::uint64_t(0) >> 1 : (std::uint64_t(1) << (word_bits - 1)) - 1;
}

std::uint64_t low_mask(unsigned bits) { return bits >= 64 ? ~std::uint64_t(0) : (std::uint64_t(1) << bits) - 1; }

template <class W>
void histogram(const W* w, std::size_t n, unsigned word_bits, std::size_t max_symbols, unsigned& shift,
               std::uint64_t& base, std::vector<std::uint64_t>& counts) {
    counts.clear();
    shift = 0;
    base = 0;
    if (n == 0) return;
    const W mask = static_cast<W>(magnitude_mask(word_bits));
    W lo = static_cast<W>(~W(0)), hi = 0;
    for (std::size_t i = 0; i < n; ++i) {  // vectorised: min and max
        const W m = static_cast<W>(w[i] & mask);
        lo = std::min(lo, m);
        hi = std::max(hi, m);
    }
    const std::uint64_t l = lo, h = hi;
    while ((h >> shift) - (l >> shift) >= max_symbols) ++shift;
    base = l >> shift;
    const std::size_t size = static_cast<std::size_t>((h >> shift) - base + 1);
    // Four histograms taken in turn: a run of one symbol would otherwise wait on one counter.
    std::vector<std::uint64_t> part(4 * size, 0);
    std::size_t i = 0;
    for (; i + 4 <= n; i += 4)
        for (std::size_t j = 0; j < 4; ++j) ++part[j * size + static_cast<std::size_t>(((w[i + j] & mask) >> shift) - base)];
    for (; i < n; ++i) ++part[static_cast<std::size_t>(((w[i] & mask) >> shift) - base)];
    counts.resize(size);
    for (std::size_t s = 0; s < size; ++s) counts[s] = part[s] + part[size + s] + part[2 * size + s] + part[3 * size + s];
}

void check_model(const AnsModel& m) {
    if (m.word_bits < 1 || m.word_bits > 64 || m.shift >= m.word_bits || m.prob_bits < 1 || m.prob_bits > 15 ||
        m.lanes < 1 || m.lanes > kMaxLanes || m.n_symbols < 1)
        throw std::invalid_argument("entropy-coded values: model out of range");
    std::uint64_t sum = 0;
    for (std::size_t s = 0; s < m.n_symbols; ++s) sum += m.freqs[s];
    if (sum != (std::uint64_t(1) << m.prob_bits))
        throw std::invalid_argument("entropy-coded values: frequencies do not add up to 2^prob_bits");
}

// The encoder's view of a symbol: x -> (x / f) * 2^P + x % f + cum as x + bias + q * cmpl, q = x / f
// by a multiplication with f's reciprocal (rcp, rcp_shift), exact for x < 2^31 (Alverson 1991).
struct EncSymbol {
    std::uint32_t x_max;  // renormalise at or above: f * 2^(31 - P)
    std::uint32_t rcp;
    std::uint32_t bias;
    std::uint32_t cmpl;
    std::uint32_t rcp_shift;
};

std::vector<EncSymbol> encoder_table(const AnsModel& m) {
    std::vector<EncSymbol> t(m.n_symbols);
    const std::uint32_t total = 1u << m.prob_bits;
    std::uint32_t cum = 0;
    for (std::size_t s = 0; s < m.n_symbols; ++s) {
        const std::uint32_t f = m.freqs[s];
        EncSymbol& e = t[s];
        e.x_max = f << (31 - m.prob_bits);  // 0 for an absent symbol: never coded
        if (f == 1) {                       // q = x - 1 from the all-ones reciprocal; the bias adds back
            e.rcp = ~0u;
            e.rcp_shift = 0;
            e.bias = cum + total - 1;
            e.cmpl = total - 1;
        } else if (f > 1) {
            unsigned sh = 0;
            while ((std::uint32_t(1) << sh) < f) ++sh;
            e.rcp = static_cast<std::uint32_t>(((std::uint64_t(1) << (sh + 31)) + f - 1) / f);
            e.rcp_shift = sh - 1;
            e.bias = cum;
            e.cmpl = total - f;
        }
        cum += f;
    }
    return t;
}

void put_le32(std::uint8_t* p, std::uint32_t v) {
    for (int b = 0; b < 4; ++b) p[b] = static_cast<std::uint8_t>(v >> (8 * b));
}

std::uint32_t get_le32(const std::uint8_t* p) {
    return std::uint32_t(p[0]) | std::uint32_t(p[1]) << 8 | std::uint32_t(p[2]) << 16 | std::uint32_t(p[3]) << 24;
}

// Writes fixed-width fields back to back, least significant bit first.
class FieldWriter {
public:
    explicit FieldWriter(std::uint8_t* out) : out_(out) {}
    void put(std::uint64_t v, unsigned width) {  // v < 2^width, width <= 64
        acc_ |= v << used_;
        const unsigned total = used_ + width;
        if (total >= 64) {
            for (int b = 0; b < 8; ++b) out_[b] = static_cast<std::uint8_t>(acc_ >> (8 * b));
            out_ += 8;
            acc_ = used_ ? v >> (64 - used_) : 0;
            used_ = total - 64;
        } else {
            used_ = total;
        }
    }
    void finish() {
        for (unsigned b = 0; b < (used_ + 7) / 8; ++b) out_[b] = static_cast<std::uint8_t>(acc_ >> (8 * b));
    }

private:
    std::uint8_t* out_;
    std::uint64_t acc_ = 0;
    unsigned used_ = 0;
};

std::size_t raw_bytes(std::size_t n, unsigned shift) { return (n * (shift + 1) + 7) / 8; }

template <class W>
AnsCoded encode(const W* w, std::size_t n, const AnsModel& m) {
    AnsCoded out;
    const std::uint64_t mask = magnitude_mask(m.word_bits), low = low_mask(m.shift);
    const unsigned width = m.shift + 1, sign_at = m.word_bits - 1;
    out.raw.assign(raw_bytes(n, m.shift) + 8, 0);
    FieldWriter fw(out.raw.data());
    for (std::size_t i = 0; i < n; ++i) {
        const std::uint64_t v = w[i];
        fw.put(((v >> sign_at) & 1) << m.shift | (v & low), width);
    }
    fw.finish();
    out.raw.resize(raw_bytes(n, m.shift));

    const std::vector<EncSymbol> table = encoder_table(m);
    std::vector<std::uint16_t> words(n + 1);  // at most one a symbol, filled from the end (and one spare)
    std::uint16_t* const end = words.data() + n + 1;
    std::uint16_t* p = end;
    std::uint32_t x[kMaxLanes];
    std::fill(x, x + m.lanes, kLow);
    unsigned lane = n ? static_cast<unsigned>((n - 1) % m.lanes) : 0;
    for (std::size_t i = n; i-- > 0;) {
        const std::uint64_t s = ((w[i] & mask) >> m.shift) - m.base;
        if (s >= m.n_symbols || !m.freqs[s]) throw std::invalid_argument("entropy-coded values: a symbol has no frequency");
        const EncSymbol& e = table[static_cast<std::size_t>(s)];
        std::uint32_t xv = x[lane];
        // Branchless: the low word is written below p either way and kept only when p moves.
        const bool emit = xv >= e.x_max;
        p[-1] = static_cast<std::uint16_t>(xv);
        p -= emit;
        xv >>= 16 * emit;
        const std::uint32_t q = static_cast<std::uint32_t>((std::uint64_t(xv) * e.rcp) >> 32) >> e.rcp_shift;
        x[lane] = xv + e.bias + q * e.cmpl;
        lane = lane ? lane - 1 : m.lanes - 1;
    }
    const std::size_t n_words = static_cast<std::size_t>(end - p);
    out.stream.resize(4 * m.lanes + 2 * n_words);
    for (unsigned j = 0; j < m.lanes; ++j) put_le32(out.stream.data() + 4 * j, x[j]);
    std::uint8_t* o = out.stream.data() + 4 * m.lanes;
    for (std::size_t j = 0; j < n_words; ++j) {
        o[2 * j] = static_cast<std::uint8_t>(p[j]);
        o[2 * j + 1] = static_cast<std::uint8_t>(p[j] >> 8);
    }
    return out;
}

// The decoder's symbol loop: Lanes states and ProbBits (0: m's, known at run time only) write each
// word's symbol bits, (base + symbol) << shift, from its slot. The 16-bit words come from `p`, padded with 2 * kMaxLanes
// bytes so that a renormalisation need not branch: the read is taken or not by a select, and a
// stream that ends early shows as p past `end` after its group. Returns where the words ended, or
// nullptr for a stream that ends early.
template <class W, unsigned Lanes, unsigned ProbBits, class Value>
const std::uint8_t* decode_symbols(std::uint32_t* x, const std::uint8_t* p, const std::uint8_t* end, std::size_t n,
                                   const AnsModel& m, const Value* slot_value, const std::uint32_t* slot_step, W* out) {
    const unsigned lanes = Lanes ? Lanes : m.lanes, prob_bits = ProbBits ? ProbBits : m.prob_bits;
    const std::uint32_t slot_mask = (1u << prob_bits) - 1;
    for (std::size_t g = 0; g < n; g += lanes) {
        const unsigned todo = static_cast<unsigned>(std::min<std::size_t>(lanes, n - g));
        for (unsigned j = 0; j < todo; ++j) {
            std::uint32_t xv = x[j];
            const std::uint32_t slot = xv & slot_mask, step = slot_step[slot];
            out[g + j] = static_cast<W>(slot_value[slot]);
            xv = (step & 0xFFFF) * (xv >> prob_bits) + (step >> 16);
            const bool more = xv < kLow;
            const std::uint32_t word = std::uint32_t(p[0]) | std::uint32_t(p[1]) << 8;
            x[j] = more ? xv << 16 | word : xv;
            p += 2 * more;
        }
        if (p > end) return nullptr;
    }
    return p;
}

// Adds each word's raw field (bit i * width of `raw`, padded with 16 zero bytes so that a field is
// one unaligned 8-byte load, and one more byte for fields of 58 bits or more): low bits and sign.
template <class W>
void add_raw(const std::uint8_t* raw, std::size_t from, std::size_t n, const AnsModel& m, W* out) {
    const unsigned shift = m.shift, width = shift + 1, sign_at = m.word_bits - 1;
    const std::uint64_t low = low_mask(shift);
    std::size_t bit = from * width;
    if (width <= 57) {
        for (std::size_t i = from; i < n; ++i, bit += width) {
            std::uint64_t field;
            std::memcpy(&field, raw + (bit >> 3), 8);
            field >>= bit & 7;
            out[i] = static_cast<W>(out[i] | (field & low) | ((field >> shift) & 1) << sign_at);
        }
        return;
    }
    for (std::size_t i = from; i < n; ++i, bit += width) {
        std::uint64_t field;
        std::memcpy(&field, raw + (bit >> 3), 8);
        field >>= bit & 7;
        if ((bit & 7) + width > 64) field |= std::uint64_t(raw[(bit >> 3) + 8]) << (64 - (bit & 7));
        out[i] = static_cast<W>(out[i] | (field & low) | ((field >> shift) & 1) << sign_at);
    }
}

#ifdef FEDDIP_X86
// AVX-512 forms of the decoder's loops for words of up to 32 bits. The symbol loop takes 32 lanes as
// two registers of 16: the slots' steps and values by gathers, and the renormalising words by an
// expand, which gives the k lanes below kLow the next k words in lane order, as the scalar loop
// reads them. Returns as decode_symbols does, after `groups` groups of 32 words.
template <class W>
__attribute__((target("avx512f,popcnt"))) const std::uint8_t* decode_symbols_avx512(
    std::uint32_t* x, const std::uint8_t* p, const std::uint8_t* end, std::size_t groups, unsigned prob_bits,
    const std::uint32_t* slot_value, const std::uint32_t* slot_step, W* out) {
    const __m512i slot_mask = _mm512_set1_epi32(static_cast<int>((1u << prob_bits) - 1));
    const __m512i low16 = _mm512_set1_epi32(0xFFFF), low_state = _mm512_set1_epi32(static_cast<int>(kLow));
    const __m128i by = _mm_cvtsi32_si128(static_cast<int>(prob_bits));
    const __m512i zero = _mm512_setzero_si512();
    __m512i xs[2] = {_mm512_loadu_si512(x), _mm512_loadu_si512(x + 16)};
    for (std::size_t g = 0; g < groups; ++g) {
        for (int h = 0; h < 2; ++h) {
            __m512i xv = xs[h];
            const __m512i slot = _mm512_and_si512(xv, slot_mask);
            const __m512i step = _mm512_mask_i32gather_epi32(zero, 0xFFFF, slot, slot_step, 4);
            const __m512i value = _mm512_mask_i32gather_epi32(zero, 0xFFFF, slot, slot_value, 4);
            W* dst = out + 32 * g + 16 * h;
            if constexpr (sizeof(W) == 4)
                _mm512_storeu_si512(dst, value);
            else if constexpr (sizeof(W) == 2)
                _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst),
                                    _mm512_mask_cvtepi32_epi16(_mm256_setzero_si256(), 0xFFFF, value));
            else
                _mm_storeu_si128(reinterpret_cast<__m128i*>(dst),
                                 _mm512_mask_cvtepi32_epi8(_mm_setzero_si128(), 0xFFFF, value));
            xv = _mm512_add_epi32(_mm512_mullo_epi32(_mm512_and_si512(step, low16), _mm512_srl_epi32(xv, by)),
                                  _mm512_srli_epi32(step, 16));
            const __mmask16 more = _mm512_cmplt_epu32_mask(xv, low_state);
            const __m512i words =
                _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
            xs[h] = _mm512_mask_mov_epi32(xv, more, _mm512_or_si512(_mm512_slli_epi32(xv, 16),
                                                                      _mm512_maskz_expand_epi32(more, words)));
            p += 2 * _mm_popcnt_u32(more);
        }
        if (p > end) return nullptr;
    }
    _mm512_storeu_si512(x, xs[0]);
    _mm512_storeu_si512(x + 16, xs[1]);
    return p;
}

// For the AVX2 loop: for each 8-bit mask of lanes that take a word, each lane's index among the
// words they take (the set lanes below it), as vpermd indices.
struct ExpandTable {
    alignas(8) std::uint8_t index[256][8];
    constexpr ExpandTable() : index{} {
        for (int m = 0; m < 256; ++m) {
            int k = 0;
            for (int j = 0; j < 8; ++j) {
                index[m][j] = static_cast<std::uint8_t>(k);
                k += (m >> j) & 1;
            }
        }
    }
};
constexpr ExpandTable kExpand{};

// The symbol loop in AVX2 for 32-bit words: 32 lanes as four registers of 8, the renormalising
// words placed by a permutation from kExpand (AVX2 has no expand).
__attribute__((target("avx2,popcnt"))) const std::uint8_t* decode_symbols_avx2(
    std::uint32_t* x, const std::uint8_t* p, const std::uint8_t* end, std::size_t groups, unsigned prob_bits,
    const std::uint32_t* slot_value, const std::uint32_t* slot_step, std::uint32_t* out) {
    const __m256i slot_mask = _mm256_set1_epi32(static_cast<int>((1u << prob_bits) - 1));
    const __m256i low16 = _mm256_set1_epi32(0xFFFF), low_state = _mm256_set1_epi32(static_cast<int>(kLow));
    const __m128i by = _mm_cvtsi32_si128(static_cast<int>(prob_bits));
    __m256i xs[4];
    for (int h = 0; h < 4; ++h) xs[h] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 8 * h));
    for (std::size_t g = 0; g < groups; ++g) {
        for (int h = 0; h < 4; ++h) {
            __m256i xv = xs[h];
            const __m256i slot = _mm256_and_si256(xv, slot_mask);
            const __m256i step = _mm256_i32gather_epi32(reinterpret_cast<const int*>(slot_step), slot, 4);
            const __m256i value = _mm256_i32gather_epi32(reinterpret_cast<const int*>(slot_value), slot, 4);
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 32 * g + 8 * h), value);
            xv = _mm256_add_epi32(_mm256_mullo_epi32(_mm256_and_si256(step, low16), _mm256_srl_epi32(xv, by)),
                                  _mm256_srli_epi32(step, 16));
            const __m256i more = _mm256_cmpgt_epi32(low_state, xv);  // states are below 2^31: signed works
            const unsigned bits = static_cast<unsigned>(_mm256_movemask_ps(_mm256_castsi256_ps(more)));
            std::uint64_t idx;
            std::memcpy(&idx, kExpand.index[bits], 8);
            const __m256i words = _mm256_permutevar8x32_epi32(
                _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
                _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(idx))));
            xs[h] = _mm256_blendv_epi8(xv, _mm256_or_si256(_mm256_slli_epi32(xv, 16), words), more);
            p += 2 * _mm_popcnt_u32(bits);
        }
        if (p > end) return nullptr;
    }
    for (int h = 0; h < 4; ++h) _mm256_storeu_si256(reinterpret_cast<__m256i*>(x + 8 * h), xs[h]);
    return p;
}

// add_raw_avx512's AVX2 form: 8 fields at a time.
__attribute__((target("avx2"))) std::size_t add_raw_avx2(const std::uint8_t* raw, std::size_t n, unsigned shift,
                                                         std::uint32_t* out) {
    const unsigned width = shift + 1;
    const __m256i lane_bits =
        _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(static_cast<int>(width)));
    const __m256i low = _mm256_set1_epi32(static_cast<int>(low_mask(shift))), seven = _mm256_set1_epi32(7);
    const __m256i one = _mm256_set1_epi32(1);
    const __m128i by = _mm_cvtsi32_si128(static_cast<int>(shift));
    std::size_t i = 0;
    for (; i + 8 <= n && (i + 8) * width < (std::size_t(1) << 31); i += 8) {
        const __m256i bits = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(i * width)), lane_bits);
        const __m256i field = _mm256_srlv_epi32(
            _mm256_i32gather_epi32(reinterpret_cast<const int*>(raw), _mm256_srli_epi32(bits, 3), 1),
            _mm256_and_si256(bits, seven));
        const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(_mm256_srl_epi32(field, by), one), 31);
        const __m256i v = _mm256_or_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(out + i)),
                                          _mm256_or_si256(_mm256_and_si256(field, low), sign));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), v);
    }
    return i;
}

// add_raw for 32-bit words with fields of up to 25 bits (each within the 4 bytes from its first
// byte): 16 fields at a time by a gather of those bytes and a shift per lane.
__attribute__((target("avx512f"))) std::size_t add_raw_avx512(const std::uint8_t* raw, std::size_t n,
                                                             unsigned shift, std::uint32_t* out) {
    const unsigned width = shift + 1;
    const __m512i lane_bits = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32(static_cast<int>(width)));
    const __m512i low = _mm512_set1_epi32(static_cast<int>(low_mask(shift))), seven = _mm512_set1_epi32(7);
    const __m512i one = _mm512_set1_epi32(1);
    const __m128i by = _mm_cvtsi32_si128(static_cast<int>(shift));
    std::size_t i = 0;
    // Bit offsets as 32-bit lanes: blocks start below 2^31 bits (and a field's bytes are padded).
    for (; i + 16 <= n && (i + 16) * width < (std::size_t(1) << 31); i += 16) {
        const __m512i bits = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(i * width)), lane_bits);
        const __m512i field = _mm512_srlv_epi32(
            _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), 0xFFFF, _mm512_srli_epi32(bits, 3), raw, 1),
                                                _mm512_and_si512(bits, seven));
        const __m512i sign = _mm512_slli_epi32(_mm512_and_si512(_mm512_srl_epi32(field, by), one), 31);
        const __m512i v = _mm512_or_si512(_mm512_loadu_si512(out + i),
                                          _mm512_or_si512(_mm512_and_si512(field, low), sign));
        _mm512_storeu_si512(out + i, v);
    }
    return i;
}
#endif

template <class W>
void decode(const std::uint8_t* stream, std::size_t stream_len, const std::uint8_t* raw, std::size_t raw_len,
            std::size_t n, const AnsModel& m, W* out) {
    check_model(m);
    if (stream_len < 4 * std::size_t(m.lanes) || (stream_len - 4 * m.lanes) % 2)
        throw std::invalid_argument("entropy-coded values: stream of a bad length");
    if (raw_len != raw_bytes(n, m.shift)) throw std::invalid_argument("entropy-coded values: raw bits of a bad length");
    const unsigned width = m.shift + 1;
    if ((n * width) % 8 && raw[raw_len - 1] >> ((n * width) % 8))
        throw std::invalid_argument("entropy-coded values: non-zero padding bits");

    // Per slot: its symbol's bits in the word, and the decoder's step: the symbol's frequency, and
    // above it the slot's offset in the symbol's range (both below 2^16: prob_bits <= 15).
    const std::uint32_t total = 1u << m.prob_bits;
    using Value = std::conditional_t<sizeof(W) <= 4, std::uint32_t, W>;  // 32-bit entries for the gathers
    std::vector<Value> slot_value(total);
    std::vector<std::uint32_t> slot_step(total);
    std::uint32_t cum = 0;
    for (std::size_t s = 0; s < m.n_symbols; ++s) {
        const std::uint32_t f = m.freqs[s];
        const Value value = static_cast<Value>((m.base + s) << m.shift);
        for (std::uint32_t t = 0; t < f; ++t) {
            slot_value[cum + t] = value;
            slot_step[cum + t] = (f & 0xFFFF) | t << 16;
        }
        cum += f;
    }

    std::uint32_t x[kMaxLanes];
    for (unsigned j = 0; j < m.lanes; ++j) {
        x[j] = get_le32(stream + 4 * j);
        if (x[j] < kLow || x[j] >= (1u << 31)) throw std::invalid_argument("entropy-coded values: initial state out of range");
    }
    std::vector<std::uint8_t> padded(raw_len + 16, 0);
    std::memcpy(padded.data(), raw, raw_len);
    const std::size_t words_len = stream_len - 4 * m.lanes;
    std::vector<std::uint8_t> words(words_len + 2 * kMaxLanes, 0);
    std::memcpy(words.data(), stream + 4 * m.lanes, words_len);
    const std::uint8_t* const begin = words.data();
    const std::uint8_t* const end = begin + words_len;
    // The widest loop for the lanes' full groups, then the scalar loop: the encoder's usual model
    // (32 lanes, 2^12 slots) with constants, any other at run time.
    const std::uint8_t* p = begin;
    std::size_t done = 0;
    const Isa loops = isa();
    const bool avx512 = loops == Isa::avx512, avx2 = loops == Isa::avx2;
#ifdef FEDDIP_X86
    if constexpr (sizeof(W) <= 4) {
        if (avx512 && m.lanes == kMaxLanes) {
            p = decode_symbols_avx512<W>(x, p, end, n / kMaxLanes, m.prob_bits, slot_value.data(), slot_step.data(),
                                         out);
            done = n / kMaxLanes * kMaxLanes;
        }
    }
    if constexpr (sizeof(W) == 4) {
        if (avx2 && m.lanes == kMaxLanes) {
            p = decode_symbols_avx2(x, p, end, n / kMaxLanes, m.prob_bits, slot_value.data(), slot_step.data(), out);
            done = n / kMaxLanes * kMaxLanes;
        }
    }
#endif
    if (p)
        p = m.lanes == kMaxLanes && m.prob_bits == 12
                ? decode_symbols<W, kMaxLanes, 12>(x, p, end, n - done, m, slot_value.data(), slot_step.data(),
                                                   out + done)
                : decode_symbols<W, 0, 0>(x, p, end, n - done, m, slot_value.data(), slot_step.data(), out + done);
    if (!p) throw std::invalid_argument("entropy-coded values: stream ends early");
    if (p != end) throw std::invalid_argument("entropy-coded values: stream does not end where its symbols do");
    for (unsigned j = 0; j < m.lanes; ++j)
        if (x[j] != kLow) throw std::invalid_argument("entropy-coded values: stream does not end where its symbols do");
    std::size_t from = 0;
#ifdef FEDDIP_X86
    if constexpr (sizeof(W) == 4) {
        if (m.word_bits == 32 && m.shift < 25 && avx512) from = add_raw_avx512(padded.data(), n, m.shift, out);
        if (m.word_bits == 32 && m.shift < 25 && avx2) from = add_raw_avx2(padded.data(), n, m.shift, out);
    }
#endif
    add_raw(padded.data(), from, n, m, out);
}

template <class F>
auto by_width(unsigned elem_bytes, F&& f) {
    switch (elem_bytes) {
        case 1: return f(std::uint8_t{});
        case 2: return f(std::uint16_t{});
        case 4: return f(std::uint32_t{});
        case 8: return f(std::uint64_t{});
        default: throw std::invalid_argument("entropy-coded values: words of 1, 2, 4 or 8 bytes");
    }
}

// Item order largest first, so that the last item to start is a small one.
template <class T>
std::vector<std::size_t> largest_first(const std::vector<T>& items) {
    std::vector<std::size_t> order(items.size());
    std::iota(order.begin(), order.end(), std::size_t(0));
    std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return items[a].n > items[b].n; });
    return order;
}

}  // namespace

void ans_histogram(const void* words, std::size_t n, unsigned elem_bytes, unsigned word_bits,
                   std::size_t max_symbols, unsigned& shift, std::uint64_t& base, std::vector<std::uint64_t>& counts) {
    if (max_symbols < 1 || word_bits < 1 || word_bits > 8 * elem_bytes)
        throw std::invalid_argument("ans_histogram: word_bits or max_symbols out of range");
    by_width(elem_bytes, [&](auto t) {
        using W = decltype(t);
        histogram(static_cast<const W*>(words), n, word_bits, max_symbols, shift, base, counts);
    });
}

AnsCoded ans_encode(const void* words, std::size_t n, unsigned elem_bytes, const AnsModel& model) {
    check_model(model);
    return by_width(elem_bytes, [&](auto t) {
        using W = decltype(t);
        return encode(static_cast<const W*>(words), n, model);
    });
}

void ans_decode(const std::uint8_t* stream, std::size_t stream_len, const std::uint8_t* raw, std::size_t raw_len,
                std::size_t n, unsigned elem_bytes, const AnsModel& model, void* out) {
    by_width(elem_bytes, [&](auto t) {
        using W = decltype(t);
        decode(stream, stream_len, raw, raw_len, n, model, static_cast<W*>(out));
    });
}

std::vector<AnsCoded> ans_encode_many(const std::vector<AnsInput>& inputs, int n_threads) {
    std::vector<AnsCoded> out(inputs.size());
    const std::vector<std::size_t> order = largest_first(inputs);
    std::exception_ptr error;
    const long long failed = parallel_each(static_cast<long long>(inputs.size()), n_threads, [&](long long i) {
        const AnsInput& in = inputs[order[static_cast<std::size_t>(i)]];
        out[order[static_cast<std::size_t>(i)]] = ans_encode(in.words, in.n, in.elem_bytes, in.model);
    }, error);
    if (failed >= 0) std::rethrow_exception(error);
    return out;
}

long long ans_decode_many(const std::vector<AnsStream>& streams, int n_threads, std::string& error) {
    const std::vector<std::size_t> order = largest_first(streams);
    std::vector<std::exception_ptr> errors(streams.size());
    std::exception_ptr first;
    parallel_each(static_cast<long long>(streams.size()), n_threads, [&](long long i) {
        const std::size_t k = order[static_cast<std::size_t>(i)];
        const AnsStream& s = streams[k];
        try {
            ans_decode(s.stream, s.stream_len, s.raw, s.raw_len, s.n, s.elem_bytes, s.model, s.out);
        } catch (...) {
            errors[k] = std::current_exception();
        }
    }, first);
    for (std::size_t k = 0; k < streams.size(); ++k)
        if (errors[k]) {
            try {
                std::rethrow_exception(errors[k]);
            } catch (const std::exception& e) {
                error = e.what();
            } catch (...) {
                error = "entropy-coded values are invalid";
            }
            return static_cast<long long>(k);
        }
    return -1;
}

}  // namespace feddip
