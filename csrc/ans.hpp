// Entropy-coded values (docs/wire-format.md, "Entropy-coded values"): rANS over interleaved
// states for the symbols of words' magnitudes, raw bits for their signs and low bits.
//
// A word w of word_bits bits has the magnitude |w| (its low word_bits - 1 bits) and the sign (its
// top bit). Its symbol is (|w| >> shift) - base, coded with frequencies adding up to 2^prob_bits;
// its raw bits are the sign above the low `shift` bits of |w|, (shift + 1) bits a word, back to
// back from the least significant bit of the first byte. Word i is coded by state i % lanes.
// States live in [2^15, 2^31) and renormalise 16 bits at a time; the encoder starts every state
// at 2^15 and codes the words last to first, so the decoder reads the stream front to back: the
// lanes' final states (u32 each), then the 16-bit words, and ends with every state at 2^15.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace feddip {

struct AnsModel {
    unsigned word_bits;  // 1..64
    unsigned shift;      // < word_bits
    std::uint64_t base;
    const std::uint32_t* freqs;  // n_symbols, adding up to 2^prob_bits (prob_bits <= 15)
    std::size_t n_symbols;
    unsigned prob_bits;
    unsigned lanes;  // 1..32
};

// (shift, base, counts) of n words (elem_bytes 1, 2, 4 or 8 each): the smallest shift at which the
// symbols span at most max_symbols values, the smallest symbol, each symbol's count.
void ans_histogram(const void* words, std::size_t n, unsigned elem_bytes, unsigned word_bits,
                   std::size_t max_symbols, unsigned& shift, std::uint64_t& base, std::vector<std::uint64_t>& counts);

struct AnsCoded {
    std::vector<std::uint8_t> stream;  // final states, then the 16-bit words
    std::vector<std::uint8_t> raw;     // the raw bits
};

// Codes n words whose symbols all have a frequency (the caller's model, from their histogram).
AnsCoded ans_encode(const void* words, std::size_t n, unsigned elem_bytes, const AnsModel& model);

// Decodes n words into `out`. Throws std::invalid_argument when the stream or raw bits are not
// what ans_encode writes: lengths, states out of range, a stream that ends early or late,
// non-zero padding bits.
void ans_decode(const std::uint8_t* stream, std::size_t stream_len, const std::uint8_t* raw, std::size_t raw_len,
                std::size_t n, unsigned elem_bytes, const AnsModel& model, void* out);

struct AnsInput {
    const void* words;
    std::size_t n;
    unsigned elem_bytes;
    AnsModel model;
};
std::vector<AnsCoded> ans_encode_many(const std::vector<AnsInput>& inputs, int n_threads);

struct AnsStream {
    const std::uint8_t* stream;
    std::size_t stream_len;
    const std::uint8_t* raw;
    std::size_t raw_len;
    std::size_t n;
    unsigned elem_bytes;
    AnsModel model;
    void* out;
};
// Returns the index of the first stream that failed, with its message in `error`, or -1.
long long ans_decode_many(const std::vector<AnsStream>& streams, int n_threads, std::string& error);

}  // namespace feddip
