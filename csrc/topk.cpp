// Exact global magnitude top-k (topk.hpp): the radix select over memory, the fast path's sample,
// bracket and in-cache selection, and the masks. The fast path's pass over a slice is in
// topk_simd.cpp, the sizes in topk_tuning.hpp.
#include "topk.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "isa.hpp"
#include "topk_internal.hpp"

namespace feddip {
namespace {

using namespace topk;  // the parts shared with topk_simd.cpp, and the tuning

template <class T>
std::vector<Slice<T>> make_slices(const std::vector<Segment<T>>& segments, std::uint64_t* total) {
    std::vector<Slice<T>> slices;
    std::uint64_t n = 0;
    for (std::size_t s = 0; s < segments.size(); ++s) {
        const Segment<T>& seg = segments[s];
        for (std::size_t off = 0; off < seg.size; off += kSlice)
            slices.push_back({seg.data + off, std::min(kSlice, seg.size - off), s, off});
        n += seg.size;
    }
    *total = n;
    return slices;
}

inline int threads_for(int requested, std::size_t n_slices) {
    int nt = max_threads(requested);
    return static_cast<int>(std::max<std::size_t>(1, std::min<std::size_t>(nt, n_slices)));
}

// One histogram pass over the 16-bit digit at `shift` of the keys whose bits under `prefix_mask`
// equal `prefix`. Returns the largest key seen by the unfiltered first pass (for the NaN check).
template <class T>
bits_t<T> histogram(const std::vector<Slice<T>>& slices, int nt, int shift, bits_t<T> prefix, bits_t<T> prefix_mask,
                    std::vector<std::uint64_t>& hist) {
    using U = bits_t<T>;
    std::vector<std::uint64_t> local(std::size_t(nt) * kBins, 0);
    std::vector<U> maxima(nt, 0);
    const long long n_slices = static_cast<long long>(slices.size());
    RegionProbe probe(nt);
#pragma omp parallel num_threads(nt)
    {
        probe.enter();
        std::uint64_t* h = local.data() + std::size_t(thread_id()) * kBins;
        U mx = 0;
#pragma omp for schedule(static)
        for (long long c = 0; c < n_slices; ++c) {
            const T* p = slices[c].data;
            const std::size_t m = slices[c].size;
            if (prefix_mask == 0) {
                for (std::size_t i = 0; i < m; ++i) {
                    const U key = magnitude_key(p[i]);
                    ++h[key >> shift];
                    mx = std::max(mx, key);
                }
            } else {
                for (std::size_t i = 0; i < m; ++i) {
                    const U key = magnitude_key(p[i]);
                    if ((key & prefix_mask) == prefix) ++h[(key >> shift) & 0xffff];
                }
            }
        }
        maxima[thread_id()] = mx;
    }
    hist.assign(kBins, 0);
    for (int t = 0; t < nt; ++t)
        for (std::size_t b = 0; b < kBins; ++b) hist[b] += local[std::size_t(t) * kBins + b];
    return *std::max_element(maxima.begin(), maxima.end());
}

template <class U>
struct Rank {
    U key;                    // the rank-th largest key
    std::uint64_t n_greater;  // keys > key
    std::uint64_t n_equal;    // keys == key
};

// One radix level over keys in [lo, hi]: the histogram of their 12-bit digit (key - lo) >> shift,
// with the shift that makes the span's top digit the highest. width 0: all keys equal lo.
template <class U>
struct Level {
    int width = 0, shift = 0;
    std::vector<std::uint32_t> hist;

    Level(const U* keys, std::size_t n, U lo, U hi) : hist(std::size_t(1) << kDigit, 0) {
        const U span = hi - lo;
        while (width < int(8 * sizeof(U)) && (span >> width) != 0) ++width;
        shift = std::max(0, width - kDigit);
        if (width == 0) return;
        // Four interleaved histograms: runs of equal digits (keys cluster) would otherwise chain
        // every increment on the one before through memory.
        std::vector<std::uint32_t> part(3 * hist.size(), 0);
        std::uint32_t* h[4] = {hist.data(), part.data(), part.data() + hist.size(), part.data() + 2 * hist.size()};
        std::size_t i = 0;
        for (; i + 4 <= n; i += 4)
            for (int q = 0; q < 4; ++q) ++h[q][(keys[i + q] - lo) >> shift];
        for (; i < n; ++i) ++hist[(keys[i] - lo) >> shift];
        for (std::size_t b = 0; b < hist.size(); ++b) hist[b] += h[1][b] + h[2][b] + h[3][b];
    }
    // The bin that holds the rank-th largest key, and how many keys lie in higher bins.
    std::pair<std::size_t, std::uint64_t> find(std::uint64_t rank) const {
        std::size_t b = hist.size();
        std::uint64_t cum = 0;
        while (cum + hist[b - 1] < rank) cum += hist[--b];
        return {b - 1, cum};
    }
};

// The rank-th largest (1 <= rank <= n) of n keys that all lie in [lo, hi], in linear time: radix
// levels narrow the range in place (reordering `keys`) until few keys are left for nth_element,
// which alone would cost a mispredicted branch per compare.
template <class U>
Rank<U> kth_largest(U* keys, std::size_t n, std::uint64_t rank, U lo, U hi) {
    std::uint64_t greater = 0;
    while (n > kNthElementMax) {
        const Level<U> level(keys, n, lo, hi);
        if (level.width == 0) return {lo, greater, n};
        const auto [b, above] = level.find(rank);
        greater += above;
        rank -= above;
        // Keep the bin's keys: a branch that is rarely taken where the bin is small, else a
        // branchless copy (a store per key, but no mispredictions).
        const U bin_lo = lo + (U(b) << level.shift), bin_span = (U(1) << level.shift) - 1;
        std::size_t j = 0;
        if (level.hist[b] < n / 16) {
            for (std::size_t i = 0; i < n; ++i)
                if (U(keys[i] - bin_lo) <= bin_span) keys[j++] = keys[i];
        } else {
            for (std::size_t i = 0; i < n; ++i) {
                const U key = keys[i];
                keys[j] = key;
                j += U(key - bin_lo) <= bin_span;
            }
        }
        n = j;
        lo = bin_lo;
        hi = std::min<U>(hi, bin_lo + bin_span);
    }
    U* nth = keys + (rank - 1);
    std::nth_element(keys, nth, keys + n, std::greater<U>());
    const U key = *nth;
    std::uint64_t equal = 0;
    for (std::size_t i = 0; i < n; ++i) {
        greater += keys[i] > key;
        equal += keys[i] == key;
    }
    return {key, greater, equal};
}

// Keys hi >= the r1-th largest and lo <= the r2-th largest of `keys` (1 <= r1 <= r2 <= size):
// the edges of their bins in one histogram of the top kBracketDigit bits of the keys' span.
template <class U>
std::pair<U, U> sample_bracket(const std::vector<U>& keys, std::uint64_t r1, std::uint64_t r2) {
    const U top = *std::max_element(keys.begin(), keys.end());
    int width = 0;
    while (width < int(8 * sizeof(U)) && (top >> width) != 0) ++width;
    const int shift = std::max(0, width - kBracketDigit);
    std::vector<std::uint32_t> hist(std::size_t(top >> shift) + 1, 0);
    for (const U key : keys) ++hist[key >> shift];
    std::size_t b = hist.size();
    std::uint64_t cum = 0;
    while (cum + hist[b - 1] < r1) cum += hist[--b];
    const U hi = std::min<U>(top, (U(b) << shift) - 1);  // the top of bin b - 1
    while (cum + hist[b - 1] < r2) cum += hist[--b];
    return {hi, U(b - 1) << shift};
}

template <class T>
std::vector<bits_t<T>> gather(const std::vector<Slice<T>>& slices, int nt, bits_t<T> prefix, bits_t<T> prefix_mask) {
    using U = bits_t<T>;
    std::vector<std::vector<U>> parts(nt);
    const long long n_slices = static_cast<long long>(slices.size());
    RegionProbe probe(nt);
#pragma omp parallel num_threads(nt)
    {
        probe.enter();
        std::vector<U>& out = parts[thread_id()];
#pragma omp for schedule(static)
        for (long long c = 0; c < n_slices; ++c) {
            const T* p = slices[c].data;
            for (std::size_t i = 0; i < slices[c].size; ++i) {
                const U key = magnitude_key(p[i]);
                if ((key & prefix_mask) == prefix) out.push_back(key);
            }
        }
    }
    std::vector<U> all;
    for (auto& part : parts) all.insert(all.end(), part.begin(), part.end());
    return all;
}

std::atomic<std::uint64_t>& fallback_count() {
    static std::atomic<std::uint64_t> count{0};
    return count;
}

// A strided sample of the keys: runs of kRun consecutive elements at evenly spaced offsets in each
// slice (one cache line and one page per run instead of per key: single strided reads cost a TLB
// miss each without huge pages). Slices fill their own slots in parallel; the sample does not
// depend on the thread count.
template <class T>
std::vector<bits_t<T>> take_sample(const std::vector<Slice<T>>& slices, std::uint64_t n, std::uint64_t n_sample,
                                   int nt) {
    using U = bits_t<T>;
    // Slice c contributes runs[c] runs of kRun keys (the last may be cut short by the slice's
    // end), step[c] elements apart, about its share of n_sample keys.
    std::vector<std::size_t> runs(slices.size()), step(slices.size()), start(slices.size() + 1, 0);
    for (std::size_t c = 0; c < slices.size(); ++c) {
        const std::size_t m = slices[c].size;
        const std::size_t take = static_cast<std::size_t>((m * n_sample + n - 1) / n);
        runs[c] = (take + kRun - 1) / kRun;
        step[c] = m / std::max<std::size_t>(runs[c], 1);
        for (std::size_t r = 0; r < runs[c]; ++r)
            start[c + 1] += std::min(m, r * step[c] + kRun) - std::min(m, r * step[c]);
        start[c + 1] += start[c];
    }
    std::vector<U> sample(start.back());
    const long long n_slices = static_cast<long long>(slices.size());
    parallel_for(nt, n_slices, [&](long long c) {
        const Slice<T>& ch = slices[c];
        U* out = sample.data() + start[c];
        for (std::size_t r = 0; r < runs[c]; ++r)
            for (std::size_t j = r * step[c]; j < std::min(ch.size, r * step[c] + kRun); ++j)
                *out++ = magnitude_key(ch.data[j]);
    });
    return sample;
}

// Fast path, one pass over memory: a sample brackets the k-th largest key in [lo, hi]; one pass
// counts the keys above hi and gathers those inside; selection finishes on the gathered keys.
// With `masks` (one per tensor), the pass also writes them as |x| > hi and keeps where each
// gathered key came from; the selection then sets the gathered keys' bytes, ties in list order.
// Returns false (and the caller falls back to the radix passes, which write the masks anew) when
// the bracket missed the k-th key or held more keys than the gather's room.
template <class T>
bool sample_select(const std::vector<Slice<T>>& slices, std::uint64_t n, std::uint64_t k, int nt,
                   const std::vector<std::uint8_t*>* masks, MagnitudeThreshold<T>* result) {
    using U = bits_t<T>;
    using S = std::make_signed_t<U>;  // keys have the top bit clear: signed compares vectorise
    const std::uint64_t n_sample = sample_size(n);
    std::vector<U> sample = take_sample(slices, n, n_sample, nt);
    const double s = static_cast<double>(sample.size());
    const double r = static_cast<double>(k) * s / static_cast<double>(n);  // expected sample rank
    const double margin = bracket_margin(r, s);
    const auto hi_rank = static_cast<std::int64_t>(std::floor(r - margin)) + 1;  // 1-based
    const auto lo_rank = static_cast<std::int64_t>(std::ceil(r + margin)) + 1;
    // Clamped to the sample: an end past it leaves that side open (hi above every key, lo at 0).
    const std::uint64_t r1 = static_cast<std::uint64_t>(std::max<std::int64_t>(hi_rank, 1));
    const std::uint64_t r2 = static_cast<std::uint64_t>(std::min<std::int64_t>(lo_rank, sample.size()));
    auto [hi, lo] = sample_bracket<U>(sample, r1, r2);
    if (hi_rank < 1) hi = std::numeric_limits<S>::max();
    if (lo_rank > static_cast<std::int64_t>(sample.size())) lo = 0;
    const std::size_t room = gather_room(n);
    // Each thread starts with an even share of the room and grows it as it needs (Scan::reserve).
    // Untouched room costs no memory: only what the pass gathers is ever written.
    std::atomic<std::size_t> gathered{0};
    std::vector<Scan<U>> scans(static_cast<std::size_t>(nt));
    for (Scan<U>& sc : scans) {
        sc.room = room;
        sc.gathered = &gathered;
        sc.reserve(room / static_cast<std::size_t>(nt) + kBlock, masks != nullptr);
    }
    // Each slice's gathered keys: [first[c], first[c] + count[c]) of its thread's part.
    std::vector<std::size_t> first(slices.size()), count(slices.size());
    std::vector<int> owner(slices.size());
    const S shi = static_cast<S>(hi), slo = static_cast<S>(lo);
    const long long n_slices = static_cast<long long>(slices.size());
    const Isa isa = feddip::isa();
    parallel_for(nt, n_slices, [&](long long c) {
        const Slice<T>& ch = slices[c];
        Scan<U>& sc = scans[thread_id()];
        first[c] = sc.size;
        owner[c] = thread_id();
        scan<T>(ch, shi, slo, sc, isa, masks ? (*masks)[ch.segment] + ch.offset : nullptr);
        count[c] = sc.size - first[c];
        gathered.fetch_add(count[c], std::memory_order_relaxed);
    });
    std::uint64_t n_above = 0;
    std::size_t n_keys = 0;
    bool overflow = false;
    for (const Scan<U>& sc : scans) {
        if (sc.nan) throw std::invalid_argument("input contains NaN");
        overflow |= sc.overflow;
        n_above += sc.above;
        n_keys += sc.size;
    }
    if (overflow || k <= n_above || k > n_above + n_keys) return false;
    // The rank's selection reorders what it is given: the parts, joined into one array.
    std::vector<U> keys;
    keys.reserve(n_keys);
    for (const Scan<U>& sc : scans) keys.insert(keys.end(), sc.out, sc.out + sc.size);
    const Rank<U> kth = kth_largest<U>(keys.data(), n_keys, k - n_above, lo, hi);
    *result = {key_to_value<T>(kth.key), n_above + kth.n_greater, kth.n_equal};
    if (masks) {
        // Above the k-th key: kept; equal: kept while ties are wanted, in list order (slices in
        // order, a slice's keys in order); below: not (the pass wrote 0 for all of them).
        const bool all_ties = result->n_greater + result->n_equal == k;
        std::uint64_t ties = k - result->n_greater;
        for (std::size_t c = 0; c < slices.size(); ++c) {
            const Scan<U>& sc = scans[owner[c]];
            std::uint8_t* mask = (*masks)[slices[c].segment] + slices[c].offset;
            for (std::size_t j = first[c]; j < first[c] + count[c]; ++j) {
                const U key = sc.out[j];
                const bool take = key > kth.key || (key == kth.key && (all_ties || ties > 0));
                ties -= (key == kth.key && take && !all_ties);
                mask[sc.pos[j]] = take;
            }
        }
    }
    return true;
}

// The k-th largest key. With `masks`, *masks_written says whether the fast path wrote them.
template <class T>
MagnitudeThreshold<T> select(const std::vector<Slice<T>>& slices, std::uint64_t n, std::uint64_t k, int nt,
                             const std::vector<std::uint8_t*>* masks = nullptr, bool* masks_written = nullptr) {
    using U = bits_t<T>;
    constexpr int kBits = 8 * sizeof(U);
    if (k > n)
        throw std::invalid_argument("k = " + std::to_string(k) + " exceeds the number of elements (" +
                                    std::to_string(n) + ")");
    if (k > 0 && n >= kSampleMinN) {
        MagnitudeThreshold<T> result;
        if (sample_select(slices, n, k, nt, masks, &result)) {
            if (masks_written) *masks_written = masks != nullptr;
            return result;
        }
        fallback_count().fetch_add(1, std::memory_order_relaxed);
    }
    std::vector<std::uint64_t> hist;
    U prefix = 0, prefix_mask = 0;
    std::uint64_t rank = k;  // rank-th largest among the remaining candidates
    std::uint64_t above = 0;
    for (int shift = kBits - 16; shift >= 0; shift -= 16) {
        const U mx = histogram(slices, nt, shift, prefix, prefix_mask, hist);
        if (prefix_mask == 0) {
            if (mx > inf_key<T>()) throw std::invalid_argument("input contains NaN");
            if (k == 0) return {std::numeric_limits<T>::infinity(), 0, 0};
        }
        std::size_t b = kBins;
        std::uint64_t cum = 0;
        while (cum + hist[b - 1] < rank) cum += hist[--b];
        --b;
        above += cum;
        rank -= cum;
        prefix |= U(b) << shift;
        prefix_mask |= U(0xffff) << shift;
        const std::uint64_t candidates = hist[b];
        if (shift == 0) return {key_to_value<T>(prefix), above, candidates};
        if (candidates <= kGatherMax) {
            std::vector<U> keys = gather(slices, nt, prefix, prefix_mask);
            const U lo = prefix, hi = prefix | U(~prefix_mask);
            const Rank<U> kth = kth_largest<U>(keys.data(), keys.size(), rank, lo, hi);
            return {key_to_value<T>(kth.key), above + kth.n_greater, kth.n_equal};
        }
    }
    throw std::logic_error("radix select did not terminate");  // unreachable
}

template <class T>
FEDDIP_VECTOR_CLONES bits_t<T> slice_peak(const T* p, std::size_t m) {
    bits_t<T> peak = 0;
    for (std::size_t i = 0; i < m; ++i) peak = std::max(peak, magnitude_key(p[i]));
    return peak;
}

}  // namespace

std::uint64_t sample_fallbacks() { return fallback_count().load(std::memory_order_relaxed); }

template <class T>
MagnitudeThreshold<T> global_magnitude_threshold(const std::vector<Segment<T>>& segments, std::uint64_t k,
                                                 int n_threads) {
    std::uint64_t n = 0;
    const auto slices = make_slices(segments, &n);
    return select(slices, n, k, threads_for(n_threads, slices.size()));
}

template <class T>
T max_magnitude(const std::vector<Segment<T>>& segments, int n_threads) {
    using U = bits_t<T>;
    std::uint64_t n = 0;
    const auto slices = make_slices(segments, &n);
    const int nt = threads_for(n_threads, slices.size());
    const long long n_slices = static_cast<long long>(slices.size());
    U peak = 0;
    RegionProbe probe(nt);
#pragma omp parallel num_threads(nt)
    {
        probe.enter();
#pragma omp for schedule(static) reduction(max : peak)
        for (long long c = 0; c < n_slices; ++c) peak = std::max(peak, slice_peak(slices[c].data, slices[c].size));
    }
    if (peak > inf_key<T>()) throw std::invalid_argument("input contains NaN");
    return key_to_value<T>(peak);
}

// out[i] = |p[i]| > the value of `key` (on magnitude keys; NaN never occurs here). Keys have the top
// bit clear, so the compare is done signed, which vectorises (no unsigned 32-bit compare in AVX2).
template <class T>
FEDDIP_VECTOR_CLONES void write_mask(const T* p, std::size_t m, std::make_signed_t<bits_t<T>> key, std::uint8_t* out) {
    using S = std::make_signed_t<bits_t<T>>;
    for (std::size_t i = 0; i < m; ++i) out[i] = static_cast<S>(magnitude_key(p[i])) > key;
}

template <class T>
MagnitudeThreshold<T> global_topk_masks(const std::vector<Segment<T>>& segments,
                                        const std::vector<std::uint8_t*>& masks, std::uint64_t k, int n_threads) {
    using U = bits_t<T>;
    using S = std::make_signed_t<U>;
    if (masks.size() != segments.size()) throw std::invalid_argument("need one mask per tensor");
    std::uint64_t n = 0;
    const auto slices = make_slices(segments, &n);
    const int nt = threads_for(n_threads, slices.size());
    bool written = false;  // by the fast path's one pass; else by the pass below
    const MagnitudeThreshold<T> th = select(slices, n, k, nt, &masks, &written);
    if (written) return th;
    const U key = magnitude_key(th.value);
    // All ties fit: take |x| >= value. Otherwise take |x| > value, then the first ties in order.
    const bool take_all_ties = k > 0 && th.n_greater + th.n_equal == k;
    const long long n_slices = static_cast<long long>(slices.size());
    parallel_for(nt, n_slices, [&](long long c) {
        const Slice<T>& ch = slices[c];
        std::uint8_t* out = masks[ch.segment] + ch.offset;
        if (k == 0)
            std::fill(out, out + ch.size, std::uint8_t(0));
        else
            write_mask<T>(ch.data, ch.size, static_cast<S>(take_all_ties ? key - 1 : key), out);
    });
    if (k > 0 && !take_all_ties) {
        std::uint64_t ties = k - th.n_greater;
        for (std::size_t c = 0; c < slices.size() && ties > 0; ++c) {
            const Slice<T>& ch = slices[c];
            std::uint8_t* out = masks[ch.segment] + ch.offset;
            for (std::size_t i = 0; i < ch.size && ties > 0; ++i)
                if (magnitude_key(ch.data[i]) == key) {
                    out[i] = 1;
                    --ties;
                }
        }
    }
    return th;
}

template MagnitudeThreshold<float> global_magnitude_threshold(const std::vector<Segment<float>>&, std::uint64_t, int);
template MagnitudeThreshold<double> global_magnitude_threshold(const std::vector<Segment<double>>&, std::uint64_t, int);
template float max_magnitude(const std::vector<Segment<float>>&, int);
template double max_magnitude(const std::vector<Segment<double>>&, int);
template MagnitudeThreshold<float> global_topk_masks(const std::vector<Segment<float>>&,
                                                     const std::vector<std::uint8_t*>&, std::uint64_t, int);
template MagnitudeThreshold<double> global_topk_masks(const std::vector<Segment<double>>&,
                                                      const std::vector<std::uint8_t*>&, std::uint64_t, int);

}  // namespace feddip
