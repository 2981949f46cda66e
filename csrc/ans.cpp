#include "ans.hpp"

#include "common.hpp"

#include <algorithm>
#include <cstring>
#include <numeric>
#include <stdexcept>

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

// 8 bytes from `at` (fewer at the end of the buffer, the rest zero), little-endian.
std::uint64_t load64(const std::uint8_t* p, std::size_t len, std::size_t at) {
    std::uint64_t v = 0;
    if (at + 8 <= len) {
        for (int b = 0; b < 8; ++b) v |= std::uint64_t(p[at + b]) << (8 * b);
        return v;
    }
    for (std::size_t b = 0; at + b < len; ++b) v |= std::uint64_t(p[at + b]) << (8 * b);
    return v;
}

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
    std::vector<std::uint16_t> words(n);  // at most one a symbol, filled from the end
    std::uint16_t* const end = words.data() + n;
    std::uint16_t* p = end;
    std::uint32_t x[kMaxLanes];
    std::fill(x, x + m.lanes, kLow);
    unsigned lane = n ? static_cast<unsigned>((n - 1) % m.lanes) : 0;
    for (std::size_t i = n; i-- > 0;) {
        const std::uint64_t s = ((w[i] & mask) >> m.shift) - m.base;
        if (s >= m.n_symbols || !m.freqs[s]) throw std::invalid_argument("entropy-coded values: a symbol has no frequency");
        const EncSymbol& e = table[static_cast<std::size_t>(s)];
        std::uint32_t xv = x[lane];
        if (xv >= e.x_max) {
            *--p = static_cast<std::uint16_t>(xv);
            xv >>= 16;
        }
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

    // Slot -> symbol, and each symbol's frequency and start.
    const std::uint32_t total = 1u << m.prob_bits, slot_mask = total - 1;
    std::vector<std::uint16_t> slot_symbol(total);
    std::vector<std::uint32_t> freq(m.n_symbols), start(m.n_symbols);
    std::uint32_t cum = 0;
    for (std::size_t s = 0; s < m.n_symbols; ++s) {
        freq[s] = m.freqs[s];
        start[s] = cum;
        std::fill(slot_symbol.begin() + cum, slot_symbol.begin() + cum + m.freqs[s], static_cast<std::uint16_t>(s));
        cum += m.freqs[s];
    }

    std::uint32_t x[kMaxLanes];
    for (unsigned j = 0; j < m.lanes; ++j) {
        x[j] = get_le32(stream + 4 * j);
        if (x[j] < kLow || x[j] >= (1u << 31)) throw std::invalid_argument("entropy-coded values: initial state out of range");
    }
    const std::uint8_t* p = stream + 4 * m.lanes;
    const std::uint8_t* const end = stream + stream_len;
    const std::uint64_t low = low_mask(m.shift);
    unsigned lane = 0;
    std::size_t bit = 0;
    for (std::size_t i = 0; i < n; ++i, bit += width) {
        std::uint32_t xv = x[lane];
        const std::uint32_t slot = xv & slot_mask;
        const std::uint32_t s = slot_symbol[slot];
        xv = freq[s] * (xv >> m.prob_bits) + slot - start[s];
        if (xv < kLow) {
            if (p == end) throw std::invalid_argument("entropy-coded values: stream ends early");
            xv = xv << 16 | std::uint32_t(p[0]) | std::uint32_t(p[1]) << 8;
            p += 2;
        }
        x[lane] = xv;
        lane = lane + 1 == m.lanes ? 0 : lane + 1;

        const std::size_t at = bit >> 3;
        const unsigned off = bit & 7;
        std::uint64_t field = load64(raw, raw_len, at) >> off;
        if (off + width > 64) field |= std::uint64_t(raw[at + 8]) << (64 - off);
        const std::uint64_t mag = (m.base + s) << m.shift | (field & low);
        const std::uint64_t sign = (field >> m.shift) & 1;
        out[i] = static_cast<W>(mag | sign << (m.word_bits - 1));
    }
    if (p != end) throw std::invalid_argument("entropy-coded values: stream does not end where its symbols do");
    for (unsigned j = 0; j < m.lanes; ++j)
        if (x[j] != kLow) throw std::invalid_argument("entropy-coded values: stream does not end where its symbols do");
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
