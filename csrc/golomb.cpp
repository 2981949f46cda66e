#include "golomb.hpp"

#include "bitpack.hpp"
#include "bits.hpp"
#include "common.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <exception>
#include <string>

namespace feddip {
namespace {

struct Params {
    std::uint32_t m, b, cut;  // b = ceil(log2 m), cut = 2^b - m
};

Params params_of(std::uint32_t m) {
    if (m == 0) throw std::invalid_argument("Golomb parameter must be >= 1");
    std::uint32_t b = 0;
    while ((std::uint64_t(1) << b) < m) ++b;
    return {m, b, static_cast<std::uint32_t>((std::uint64_t(1) << b) - m)};
}

// gap / m and gap % m.
inline void divmod(std::uint64_t gap, std::uint32_t m, std::uint64_t& q, std::uint64_t& r) {
    if (gap <= 0xffffffffu) {  // 32-bit division is several times cheaper than 64-bit
        q = static_cast<std::uint32_t>(gap) / m;
    } else {
        q = gap / m;
    }
    r = gap - q * m;
}

// Calls f(gap) for each set position, in order.
template <class F>
void for_each_gap(const std::uint8_t* bits, std::size_t n, F&& f) {
    const std::size_t n_words = (n + 63) / 64;
    std::uint64_t prev_end = 0;  // index after the previous set position
    for (std::size_t w = 0; w < n_words; ++w) {
        std::uint64_t v = 0;
        if (w + 1 < n_words) {
            std::memcpy(&v, bits + 8 * w, 8);
        } else {  // last word: partial bytes, padding bits ignored
            const std::size_t n_bytes = (n + 7) / 8;
            std::memcpy(&v, bits + 8 * w, n_bytes - 8 * w);
            if (n % 64) v &= (std::uint64_t(1) << (n % 64)) - 1;
        }
        for (; v; v &= v - 1) {
            const std::uint64_t pos = 64 * w + static_cast<std::uint64_t>(ctz64(v));
            f(pos - prev_end);
            prev_end = pos + 1;
        }
    }
}

// Branch-free bit writer: every put stores the whole 64-bit accumulator and advances by the
// complete bytes in it. Needs 8 bytes of slack past the last byte written (the capacity adds it).
class BitWriter {
public:
    explicit BitWriter(std::size_t capacity) : out_(capacity + 8) {}
    // Appends the low `len` (<= 56) bits of `value` (higher bits of `value` must be zero).
    void put(std::uint64_t value, unsigned len) {
        acc_ |= value << fill_;
        fill_ += len;
        std::memcpy(out_.data() + at_, &acc_, 8);  // little-endian hosts only (checked in bindings)
        const unsigned bytes = fill_ >> 3;
        at_ += bytes;
        acc_ = bytes == 8 ? 0 : acc_ >> (8 * bytes);
        fill_ &= 7;
    }
    void zeros(std::uint64_t count) {
        for (; count > 56; count -= 56) put(0, 56);
        put(0, static_cast<unsigned>(count));
    }
    std::vector<std::uint8_t> finish() {
        out_.resize(at_ + (fill_ > 0 ? 1 : 0));  // the partial byte is already stored
        return std::move(out_);
    }

private:
    std::vector<std::uint8_t> out_;
    std::size_t at_ = 0;
    std::uint64_t acc_ = 0;
    unsigned fill_ = 0;  // < 8 between puts
};

class BitReader {
public:
    BitReader(const std::uint8_t* data, std::size_t size) : data_(data), size_(size) {}
    std::uint64_t bits_consumed() const { return consumed_; }
    std::uint64_t bits_total() const { return 8 * static_cast<std::uint64_t>(size_); }
    // Next `len` (<= 32) bits; throws past the end.
    std::uint64_t get(unsigned len) {
        if (len == 0) return 0;
        refill();
        if (consumed_ + len > bits_total()) throw std::invalid_argument("Golomb stream is truncated");
        const std::uint64_t v = acc_ & ((std::uint64_t(1) << len) - 1);
        acc_ >>= len;
        fill_ -= len;
        consumed_ += len;
        return v;
    }
    // Counts zero bits up to and including the next one bit; throws past the end or above `limit`.
    std::uint64_t unary(std::uint64_t limit) {
        std::uint64_t q = 0;
        for (;;) {
            refill();
            if (fill_ == 0) throw std::invalid_argument("Golomb stream is truncated");
            if (acc_ == 0) {
                q += fill_;
                consumed_ += fill_;
                fill_ = 0;
                acc_ = 0;
                if (q > limit) throw std::invalid_argument("Golomb stream: position out of range");
                continue;
            }
            const unsigned z = static_cast<unsigned>(ctz64(acc_));
            q += z;
            acc_ >>= z;
            acc_ >>= 1;
            fill_ -= z + 1;
            consumed_ += z + 1;
            if (consumed_ > bits_total()) throw std::invalid_argument("Golomb stream is truncated");
            if (q > limit) throw std::invalid_argument("Golomb stream: position out of range");
            return q;
        }
    }

    // Fast path for one whole code (unary quotient, then remainder) when it lies in the buffered
    // bits: returns false, consuming nothing, when it does not (the caller takes the slow path).
    bool code(const Params& p, std::uint64_t& q, std::uint64_t& r) {
        refill();
        if (acc_ == 0) return false;
        const unsigned z = static_cast<unsigned>(ctz64(acc_));
        // A code filling all 64 bits would need shifts by 64 (undefined): the slow path takes it.
        if (z + 1 + p.b > fill_ || z + 1 + p.b >= 64) return false;
        const unsigned b1 = p.b == 0 ? 0 : p.b - 1;
        const std::uint64_t x = acc_ >> (z + 1);
        const std::uint64_t lo = x & ((std::uint64_t(1) << b1) - 1);
        const bool big = p.b > 0 && lo >= p.cut;
        r = big ? ((lo << 1) | ((x >> b1) & 1)) - p.cut : lo;
        q = z;
        const unsigned used = z + 1 + b1 + big;
        acc_ >>= used;
        fill_ -= used;
        consumed_ += used;
        return true;
    }

    // True when every bit after the consumed ones is zero (padding).
    bool rest_is_zero() {
        refill();
        return acc_ == 0 && pos_ == size_;
    }

private:
    void refill() {
        if (fill_ <= 56 && pos_ + 8 <= size_) {  // whole bytes up to 56..63 valid bits, one load
            std::uint64_t word;
            std::memcpy(&word, data_ + pos_, 8);
            const unsigned fill = fill_ | 56;
            acc_ = (acc_ | (word << fill_)) & ((std::uint64_t(1) << fill) - 1);
            pos_ += (63 - fill_) >> 3;
            fill_ = fill;
            return;
        }
        while (fill_ <= 56 && pos_ < size_) {
            acc_ |= std::uint64_t(data_[pos_++]) << fill_;
            fill_ += 8;
        }
    }
    const std::uint8_t* data_;
    std::size_t size_, pos_ = 0;
    std::uint64_t acc_ = 0, consumed_ = 0;
    unsigned fill_ = 0;
};

}  // namespace

std::uint32_t golomb_parameter(std::uint64_t nnz, std::uint64_t n) {
    if (nnz == 0 || nnz >= n) return 1;
    const double theta = 1.0 - static_cast<double>(nnz) / static_cast<double>(n);  // P(zero)
    const double m = std::ceil(std::log(1.0 + theta) / -std::log(theta));
    if (!(m >= 1.0)) return 1;
    return m > 2147483648.0 ? 2147483648u : static_cast<std::uint32_t>(m);
}

std::vector<std::uint8_t> golomb_encode(const std::uint8_t* bits, std::size_t n, std::uint32_t m) {
    const Params p = params_of(m);
    // Upper bound: the quotients sum to at most n / m bits, every code adds 1 + b more.
    const std::uint64_t nnz = count_bits(bits, n);
    BitWriter w(static_cast<std::size_t>((n / p.m + nnz * (1 + p.b)) / 8 + 8));
    for_each_gap(bits, n, [&](std::uint64_t gap) {
        std::uint64_t q, r;
        divmod(gap, p.m, q, r);
        // Remainder code as (value, length): r < cut in b - 1 bits, else v = r + cut as v >> 1
        // in b - 1 bits and then v & 1.
        const bool big = p.b > 0 && r >= p.cut;
        const std::uint64_t v = r + p.cut;
        const std::uint64_t rv = big ? (v >> 1) | ((v & 1) << (p.b - 1)) : r;
        const unsigned rl = (p.b == 0 ? 0 : p.b - 1) + big;
        if (q + 1 + rl <= 56) {  // the common case: one write for the whole code
            w.put((std::uint64_t(1) << q) | (rv << (q + 1)), static_cast<unsigned>(q + 1 + rl));
        } else {
            w.zeros(q);
            w.put(1 | (rv << 1), 1 + rl);
        }
    });
    return w.finish();
}

void golomb_decode(const std::uint8_t* data, std::size_t size, std::size_t n, std::uint64_t nnz, std::uint32_t m,
                   std::uint8_t* bits) {
    const Params p = params_of(m);
    if (nnz > n) throw std::invalid_argument("Golomb stream: more positions than elements");
    std::memset(bits, 0, (n + 7) / 8);
    BitReader r(data, size);
    std::uint64_t next = 0;  // smallest position the next code may give
    const std::uint64_t max_q = n / p.m + 1;
    for (std::uint64_t i = 0; i < nnz; ++i) {
        std::uint64_t q, rem;
        if (!r.code(p, q, rem)) {  // code straddles the buffer or has a long quotient
            q = r.unary(max_q);
            rem = 0;
            if (p.b > 0) {
                rem = r.get(p.b - 1);
                if (rem >= p.cut) rem = ((rem << 1) | r.get(1)) - p.cut;
            }
        }
        if (rem >= p.m) throw std::invalid_argument("Golomb stream: bad remainder");
        const std::uint64_t pos = next + q * p.m + rem;
        if (pos >= n) throw std::invalid_argument("Golomb stream: position out of range");
        bits[pos >> 3] |= std::uint8_t(1u << (pos & 7));
        next = pos + 1;
    }
    // Anything but zero padding in the last byte means the stream does not match nnz. (The same
    // message as the Python backends': one stream, one error, whichever backend reads it.)
    if ((r.bits_consumed() + 7) / 8 != size || !r.rest_is_zero())
        throw std::invalid_argument("Golomb stream: bytes or bits left after the last code");
}

std::vector<std::vector<std::uint8_t>> golomb_encode_many(const std::vector<GolombInput>& inputs, int n_threads) {
    std::vector<std::vector<std::uint8_t>> out(inputs.size());
    std::exception_ptr error;  // only out of memory: the inputs were checked by the caller
    const auto encode = [&](long long i) { out[i] = golomb_encode(inputs[i].bits, inputs[i].n, inputs[i].m); };
    if (parallel_each(static_cast<long long>(inputs.size()), n_threads, encode, error) >= 0)
        std::rethrow_exception(error);
    return out;
}

long long golomb_decode_many(const std::vector<GolombStream>& streams, int n_threads, std::string& error) {
    std::exception_ptr thrown;
    const long long failed = parallel_each(
        static_cast<long long>(streams.size()), n_threads,
        [&](long long i) {
            const GolombStream& s = streams[i];
            golomb_decode(s.data, s.size, s.n, s.nnz, s.m, s.bits);
        },
        thrown);
    if (failed >= 0) {
        try {
            std::rethrow_exception(thrown);
        } catch (const std::exception& e) {
            error = *e.what() ? e.what() : "Golomb stream is invalid";
        } catch (...) {
            error = "Golomb stream is invalid";
        }
    }
    return failed;
}

}  // namespace feddip
