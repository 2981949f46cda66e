#include "topk.hpp"

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <stdexcept>
#include <string>

namespace feddip {
namespace {

constexpr std::size_t kChunk = std::size_t(1) << 15;
constexpr std::size_t kBins = std::size_t(1) << 16;
// Below this many candidates, gather them and select in cache instead of another histogram.
constexpr std::uint64_t kGatherMax = std::uint64_t(1) << 18;
// Sample size of the one-pass fast path, and the smallest input it is used for.
constexpr std::uint64_t kSample = std::uint64_t(1) << 16;
constexpr std::uint64_t kSampleMinN = std::uint64_t(1) << 20;
constexpr std::size_t kBlock = 32;
constexpr std::size_t kRun = 16;  // sample run length (one 64-byte line of float32)

template <class T>
struct Chunk {
    const T* data;
    std::size_t size;
    std::size_t segment;
    std::size_t offset;
};

template <class T>
std::vector<Chunk<T>> make_chunks(const std::vector<Segment<T>>& segments, std::uint64_t* total) {
    std::vector<Chunk<T>> chunks;
    std::uint64_t n = 0;
    for (std::size_t s = 0; s < segments.size(); ++s) {
        const Segment<T>& seg = segments[s];
        for (std::size_t off = 0; off < seg.size; off += kChunk)
            chunks.push_back({seg.data + off, std::min(kChunk, seg.size - off), s, off});
        n += seg.size;
    }
    *total = n;
    return chunks;
}

inline int threads_for(int requested, std::size_t n_chunks) {
    int nt = max_threads(requested);
    return static_cast<int>(std::max<std::size_t>(1, std::min<std::size_t>(nt, n_chunks)));
}

// One histogram pass over the 16-bit digit at `shift` of the keys whose bits under `prefix_mask`
// equal `prefix`. Returns the largest key seen by the unfiltered first pass (for the NaN check).
template <class T>
bits_t<T> histogram(const std::vector<Chunk<T>>& chunks, int nt, int shift, bits_t<T> prefix,
                    bits_t<T> prefix_mask, std::vector<std::uint64_t>& hist) {
    using U = bits_t<T>;
    std::vector<std::uint64_t> local(std::size_t(nt) * kBins, 0);
    std::vector<U> maxima(nt, 0);
    const long long n_chunks = static_cast<long long>(chunks.size());
#pragma omp parallel num_threads(nt)
    {
        std::uint64_t* h = local.data() + std::size_t(thread_id()) * kBins;
        U mx = 0;
#pragma omp for schedule(static)
        for (long long c = 0; c < n_chunks; ++c) {
            const T* p = chunks[c].data;
            const std::size_t m = chunks[c].size;
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

// The rank-th largest of `keys` (rank >= 1), with `above` more keys known to be larger.
template <class T>
MagnitudeThreshold<T> select_in(std::vector<bits_t<T>>& keys, std::uint64_t rank, std::uint64_t above) {
    using U = bits_t<T>;
    auto nth = keys.begin() + static_cast<std::ptrdiff_t>(rank - 1);
    std::nth_element(keys.begin(), nth, keys.end(), std::greater<U>());
    const U key = *nth;
    std::uint64_t greater = 0, equal = 0;
    for (U x : keys) {
        greater += x > key;
        equal += x == key;
    }
    return {key_to_value<T>(key), above + greater, equal};
}

template <class T>
std::vector<bits_t<T>> gather(const std::vector<Chunk<T>>& chunks, int nt, bits_t<T> prefix,
                              bits_t<T> prefix_mask) {
    using U = bits_t<T>;
    std::vector<std::vector<U>> parts(nt);
    const long long n_chunks = static_cast<long long>(chunks.size());
#pragma omp parallel num_threads(nt)
    {
        std::vector<U>& out = parts[thread_id()];
#pragma omp for schedule(static)
        for (long long c = 0; c < n_chunks; ++c) {
            const T* p = chunks[c].data;
            for (std::size_t i = 0; i < chunks[c].size; ++i) {
                const U key = magnitude_key(p[i]);
                if ((key & prefix_mask) == prefix) out.push_back(key);
            }
        }
    }
    std::vector<U> all;
    for (auto& part : parts) all.insert(all.end(), part.begin(), part.end());
    return all;
}

struct ChunkScan {
    std::uint64_t above = 0;  // keys > hi
    bool nan = false;
    bool overflow = false;    // the gather buffer would have exceeded `cap`
};

// The one pass of the fast path over one chunk: count keys > hi and append keys in [lo, hi] to
// `out` (up to `cap` in all). Blocks of kBlock get a vectorised count first and are compacted
// (branchless) only when they hold candidates. Keys have the top bit clear, so signed compares,
// which SSE2/AVX2 have for 32-bit lanes, order them correctly.
template <class T, class S>
FEDDIP_VECTOR_CLONES void scan_chunk(const T* p, std::size_t m, S hi, S lo, std::size_t cap,
                                     std::vector<bits_t<T>>& out, ChunkScan& scan) {
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
        scan.above += above;
        scan.nan |= nan != 0;
        if (inside == above || scan.overflow) continue;
        if (out.size() + (inside - above) > cap) {
            scan.overflow = true;
            continue;
        }
        U buf[kBlock];
        std::size_t j = 0;
        for (std::size_t i = b0; i < b1; ++i) {
            const S key = static_cast<S>(magnitude_key(p[i]));
            buf[j] = static_cast<U>(key);
            j += (key >= lo) & (key <= hi);
        }
        out.insert(out.end(), buf, buf + j);
    }
}

// Fast path, one pass over memory: a strided sample brackets the k-th largest key in [lo, hi]; one
// pass counts the keys above hi and gathers those inside; selection finishes on the gathered keys.
// Returns false (and the caller falls back to the radix passes) when the bracket missed the k-th
// key or held more than kGatherMax keys.
template <class T>
bool sample_select(const std::vector<Chunk<T>>& chunks, std::uint64_t n, std::uint64_t k, int nt,
                   MagnitudeThreshold<T>* result) {
    using U = bits_t<T>;
    using S = std::make_signed_t<U>;  // keys have the top bit clear: signed compares vectorise
    const std::uint64_t n_sample = std::min<std::uint64_t>(n, kSample);
    std::vector<U> sample;
    sample.reserve(n_sample + chunks.size());
    // Runs of kRun consecutive elements at evenly spaced offsets: one cache line and one page per
    // run instead of per sample (single strided samples cost a TLB miss each without huge pages).
    for (const Chunk<T>& ch : chunks) {
        const std::size_t take = static_cast<std::size_t>((ch.size * n_sample + n - 1) / n);
        const std::size_t runs = (take + kRun - 1) / kRun;
        const std::size_t step = ch.size / std::max<std::size_t>(runs, 1);
        for (std::size_t r = 0; r < runs; ++r)
            for (std::size_t j = r * step; j < std::min(ch.size, r * step + kRun); ++j)
                sample.push_back(magnitude_key(ch.data[j]));
    }
    const double s = static_cast<double>(sample.size());
    const double r = static_cast<double>(k) * s / static_cast<double>(n);  // expected sample rank
    const double margin = 4.0 * std::sqrt(r * (1.0 - r / s)) + 16.0;
    const auto hi_pos = static_cast<std::ptrdiff_t>(std::floor(r - margin));
    const auto lo_pos = static_cast<std::ptrdiff_t>(std::ceil(r + margin));
    U hi = std::numeric_limits<S>::max(), lo = 0;
    if (hi_pos >= 0) {
        std::nth_element(sample.begin(), sample.begin() + hi_pos, sample.end(), std::greater<U>());
        hi = sample[hi_pos];
    }
    if (lo_pos < static_cast<std::ptrdiff_t>(sample.size())) {
        std::nth_element(sample.begin(), sample.begin() + lo_pos, sample.end(), std::greater<U>());
        lo = sample[lo_pos];
    }
    const S shi = static_cast<S>(hi), slo = static_cast<S>(lo);
    std::vector<std::vector<U>> parts(nt);
    std::vector<ChunkScan> scans(nt);
    const std::size_t part_cap = kGatherMax / static_cast<std::size_t>(nt) + 1;
    const long long n_chunks = static_cast<long long>(chunks.size());
#pragma omp parallel for num_threads(nt) schedule(static)
    for (long long c = 0; c < n_chunks; ++c) {
        const int t = thread_id();
        scan_chunk(chunks[c].data, chunks[c].size, shi, slo, part_cap, parts[t], scans[t]);
    }
    bool overflow = false;
    std::uint64_t n_above = 0;
    for (const ChunkScan& sc : scans) {
        if (sc.nan) throw std::invalid_argument("input contains NaN");
        overflow |= sc.overflow;
        n_above += sc.above;
    }
    if (overflow) return false;
    std::vector<U> keys;
    for (auto& part : parts) keys.insert(keys.end(), part.begin(), part.end());
    if (k <= n_above || k > n_above + keys.size()) return false;
    *result = select_in<T>(keys, k - n_above, n_above);
    return true;
}

template <class T>
MagnitudeThreshold<T> select(const std::vector<Chunk<T>>& chunks, std::uint64_t n, std::uint64_t k,
                             int nt) {
    using U = bits_t<T>;
    constexpr int kBits = 8 * sizeof(U);
    if (k > n)
        throw std::invalid_argument("k = " + std::to_string(k) + " exceeds the number of elements (" +
                                    std::to_string(n) + ")");
    if (k > 0 && n >= kSampleMinN) {
        MagnitudeThreshold<T> result;
        if (sample_select(chunks, n, k, nt, &result)) return result;
    }
    std::vector<std::uint64_t> hist;
    U prefix = 0, prefix_mask = 0;
    std::uint64_t rank = k;  // rank-th largest among the remaining candidates
    std::uint64_t above = 0;
    for (int shift = kBits - 16; shift >= 0; shift -= 16) {
        const U mx = histogram(chunks, nt, shift, prefix, prefix_mask, hist);
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
            std::vector<U> keys = gather(chunks, nt, prefix, prefix_mask);
            return select_in<T>(keys, rank, above);
        }
    }
    throw std::logic_error("radix select did not terminate");  // unreachable
}

}  // namespace

template <class T>
MagnitudeThreshold<T> global_magnitude_threshold(const std::vector<Segment<T>>& segments,
                                                 std::uint64_t k, int n_threads) {
    std::uint64_t n = 0;
    const auto chunks = make_chunks(segments, &n);
    return select(chunks, n, k, threads_for(n_threads, chunks.size()));
}

// out[i] = |p[i]| > the value of `key` (on magnitude keys; NaN never occurs here). Keys have the top
// bit clear, so the compare is done signed, which vectorises (no unsigned 32-bit compare in AVX2).
template <class T>
FEDDIP_VECTOR_CLONES void write_mask(const T* p, std::size_t m, std::make_signed_t<bits_t<T>> key,
                                     std::uint8_t* out) {
    using S = std::make_signed_t<bits_t<T>>;
    for (std::size_t i = 0; i < m; ++i) out[i] = static_cast<S>(magnitude_key(p[i])) > key;
}

template <class T>
MagnitudeThreshold<T> global_topk_masks(const std::vector<Segment<T>>& segments,
                                        const std::vector<std::uint8_t*>& masks, std::uint64_t k,
                                        int n_threads) {
    using U = bits_t<T>;
    using S = std::make_signed_t<U>;
    if (masks.size() != segments.size())
        throw std::invalid_argument("need one mask per tensor");
    std::uint64_t n = 0;
    const auto chunks = make_chunks(segments, &n);
    const int nt = threads_for(n_threads, chunks.size());
    const MagnitudeThreshold<T> th = select(chunks, n, k, nt);
    const U key = magnitude_key(th.value);
    // All ties fit: take |x| >= value. Otherwise take |x| > value, then the first ties in order.
    const bool take_all_ties = k > 0 && th.n_greater + th.n_equal == k;
    const long long n_chunks = static_cast<long long>(chunks.size());
#pragma omp parallel for num_threads(nt) schedule(static)
    for (long long c = 0; c < n_chunks; ++c) {
        const Chunk<T>& ch = chunks[c];
        std::uint8_t* out = masks[ch.segment] + ch.offset;
        if (k == 0)
            std::fill(out, out + ch.size, std::uint8_t(0));
        else
            write_mask<T>(ch.data, ch.size, static_cast<S>(take_all_ties ? key - 1 : key), out);
    }
    if (k > 0 && !take_all_ties) {
        std::uint64_t ties = k - th.n_greater;
        for (std::size_t c = 0; c < chunks.size() && ties > 0; ++c) {
            const Chunk<T>& ch = chunks[c];
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

template MagnitudeThreshold<float> global_magnitude_threshold(const std::vector<Segment<float>>&,
                                                              std::uint64_t, int);
template MagnitudeThreshold<double> global_magnitude_threshold(const std::vector<Segment<double>>&,
                                                               std::uint64_t, int);
template MagnitudeThreshold<float> global_topk_masks(const std::vector<Segment<float>>&,
                                                    const std::vector<std::uint8_t*>&, std::uint64_t,
                                                    int);
template MagnitudeThreshold<double> global_topk_masks(const std::vector<Segment<double>>&,
                                                      const std::vector<std::uint8_t*>&,
                                                      std::uint64_t, int);

}  // namespace feddip
