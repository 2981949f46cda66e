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

// Radix select on the bit patterns of |x|: one histogram pass over the top 15 bits, then
// either a second histogram pass or, when few candidates remain, a gather pass and an
// in-cache selection. Typically two passes over memory, no allocation proportional to n.
// Throws std::invalid_argument when an element is NaN or k exceeds the element count.
template <class T>
MagnitudeThreshold<T> global_magnitude_threshold(const std::vector<Segment<T>>& segments,
                                                 std::uint64_t k, int n_threads = 0);

// Writes one byte (0/1) per element into masks[i] (same length as segments[i]): exactly k ones,
// at the k largest |x|. Ties at the threshold are taken in list order (tensor, then flat index).
template <class T>
MagnitudeThreshold<T> global_topk_masks(const std::vector<Segment<T>>& segments,
                                        const std::vector<std::uint8_t*>& masks, std::uint64_t k,
                                        int n_threads = 0);

}  // namespace feddip
