// Exact global magnitude top-k over a list of tensors, without concatenating them.
#pragma once

#include <cstdint>
#include <vector>

#include "common.hpp"

namespace feddip {

// Where the k-th largest magnitude of a list of tensors lies.
template <class T>
struct MagnitudeThreshold {
    T value;                  // k-th largest |x|; +inf when k == 0
    std::uint64_t n_greater;  // elements with |x| > value
    std::uint64_t n_equal;    // elements with |x| == value
};

// Selection on the bit patterns of |x|. From 2^20 elements, one pass over memory: a sample
// brackets the k-th key, the pass counts the keys above the bracket and gathers those inside it
// (at most max(2^18, n / 64) keys), and a radix select in cache finishes. Where the bracket misses
// or holds too many keys (heavy ties), and below 2^20 elements: radix select over memory, one
// histogram pass per 16-bit digit until few enough candidates remain to gather.
// Throws std::invalid_argument when an element is NaN or k exceeds the element count.
template <class T>
MagnitudeThreshold<T> global_magnitude_threshold(const std::vector<Segment<T>>& segments, std::uint64_t k,
                                                 int n_threads = 0);

// How many selections so far tried the one-pass fast path and fell back to the radix passes.
std::uint64_t sample_fallbacks();

// The largest |x| (0 for no elements) in one streaming read: the memory roofline the selection is
// measured against. Throws std::invalid_argument when an element is NaN.
template <class T>
T max_magnitude(const std::vector<Segment<T>>& segments, int n_threads = 0);

// Writes one byte (0/1) per element into masks[i] (same length as segments[i]): exactly k ones,
// at the k largest |x|. Ties at the threshold are taken in list order (tensor, then flat index).
// On the fast path the masks are written by the selection's one pass (|x| above the bracket),
// then the gathered keys' bytes; elsewhere by a second pass once the threshold is known.
template <class T>
MagnitudeThreshold<T> global_topk_masks(const std::vector<Segment<T>>& segments,
                                        const std::vector<std::uint8_t*>& masks, std::uint64_t k, int n_threads = 0);

}  // namespace feddip
