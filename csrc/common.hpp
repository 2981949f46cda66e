// Shared helpers for the feddip-kernels C++ core. Plain C++17, no Python.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "isa.hpp"

// Hot loops are compiled twice on x86-64 (baseline SSE2 and AVX2) and picked at load time, so the
// package needs no -march flag and still uses the wider vectors where the CPU has them.
#if defined(FEDDIP_X86) && !defined(__clang__) && defined(__linux__)
#define FEDDIP_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define FEDDIP_VECTOR_CLONES
#endif

namespace feddip {

// A read-only contiguous run of elements (one tensor of a model).
template <class T>
struct Segment {
    const T* data;
    std::size_t size;
};

// Unsigned integer of the same width as a floating-point type.
template <class T>
using bits_t = std::conditional_t<sizeof(T) == 4, std::uint32_t, std::uint64_t>;

// Bit pattern of |x|: the IEEE-754 bits with the sign cleared. For non-negative floats the
// unsigned order of the bit patterns equals the numeric order, and NaNs sort above +inf.
template <class T>
inline bits_t<T> magnitude_key(T x) {
    bits_t<T> u;
    std::memcpy(&u, &x, sizeof u);
    return u & (~bits_t<T>(0) >> 1);
}

template <class T>
inline T key_to_value(bits_t<T> key) {
    T x;
    std::memcpy(&x, &key, sizeof x);
    return x;
}

// Key of +inf: keys above it are NaNs.
template <class T>
constexpr bits_t<T> inf_key() {
    return sizeof(T) == 4 ? bits_t<T>(0x7f800000u) : bits_t<T>(0x7ff0000000000000ull);
}

// The library-wide thread count that set_num_threads sets (0: OpenMP's default). One instance
// for the whole library (a static of an inline function).
inline std::atomic<int>& default_threads() {
    static std::atomic<int> n{0};
    return n;
}

inline std::int64_t steady_ns() noexcept {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
}

// Cores shared with another process. A parallel region's threads then start a scheduler slice
// late (milliseconds, where idle cores take microseconds), and every fork and join of a call
// waits that long, spinning, far longer than a region's work (benchmarks/RESULTS.md, "On a busy
// machine"). While recent regions started late, the default thread count is 1; a late
// start backs off 0.1 s, doubling up to 2 s, and one on time ends it (one slow region a period).
class Contention {
public:
    static constexpr std::int64_t kLate = 1'000'000;  // ns: far above an idle wake-up (RESULTS.md)
    static constexpr std::int64_t kFirstBackoff = 100'000'000, kMaxBackoff = 2'000'000'000;

    bool serial() const noexcept {
        return enabled.load(std::memory_order_relaxed) && steady_ns() < until_.load(std::memory_order_relaxed);
    }
    void observe(std::int64_t late) noexcept {
        regions.fetch_add(1, std::memory_order_relaxed);
        if (late <= kLate) {
            backoff_.store(kFirstBackoff, std::memory_order_relaxed);
            return;
        }
        const std::int64_t b = backoff_.load(std::memory_order_relaxed), now = steady_ns();
        last_late.store(now, std::memory_order_relaxed);
        until_.store(now + b, std::memory_order_relaxed);
        backoff_.store(std::min(2 * b, kMaxBackoff), std::memory_order_relaxed);
        late_regions.fetch_add(1, std::memory_order_relaxed);
    }

    std::atomic<bool> enabled{true};
    std::atomic<std::uint64_t> regions{0}, late_regions{0};  // timed (on more than one thread), late
    std::atomic<std::int64_t> last_late{0};  // steady_ns() of the last late start, 0 for none

private:
    std::atomic<std::int64_t> until_{0}, backoff_{kFirstBackoff};
};

inline Contention& contention() {
    static Contention c;
    return c;
}

// Times one parallel region's start: made just before it, enter() by each thread first thing in
// it; its end reports the latest start to contention().
class RegionProbe {
public:
    explicit RegionProbe(int nt) noexcept : on_(nt > 1), fork_(on_ ? steady_ns() : 0) {}
    RegionProbe(const RegionProbe&) = delete;
    RegionProbe& operator=(const RegionProbe&) = delete;
    ~RegionProbe() {
        if (on_) contention().observe(latest_.load(std::memory_order_relaxed));
    }
    std::int64_t latest() const noexcept { return latest_.load(std::memory_order_relaxed); }
    void enter() noexcept {
        if (!on_) return;
        const std::int64_t late = steady_ns() - fork_;
        std::int64_t seen = latest_.load(std::memory_order_relaxed);
        while (late > seen && !latest_.compare_exchange_weak(seen, late, std::memory_order_relaxed)) {
        }
    }

private:
    bool on_;
    std::int64_t fork_;
    std::atomic<std::int64_t> latest_{0};
};

// body(i) for i in [0, count) on nt threads, statically scheduled, the region timed (RegionProbe).
template <class Body>
void parallel_for(int nt, long long count, Body&& body) {
    RegionProbe probe(nt);
#pragma omp parallel num_threads(nt)
    {
        probe.enter();
#pragma omp for schedule(static)
        for (long long i = 0; i < count; ++i) body(i);
    }
}

// An empty region on OpenMP's default thread count, timed as every region is (for callers that
// run no parallel kernel of their own for a while but want to know whether the cores are shared):
// the latest thread's start in ns, 0 with one thread.
inline std::int64_t probe_contention() {
#ifdef _OPENMP
    const int nt = omp_get_max_threads();
    RegionProbe probe(nt);
#pragma omp parallel num_threads(nt)
    probe.enter();
    return probe.latest();
#else
    return 0;
#endif
}

// Threads a parallel kernel uses: its own request, else the library-wide setting, else OpenMP's
// (1 while the cores are contended, see Contention).
inline int max_threads(int requested) {
#ifdef _OPENMP
    if (requested > 0) return requested;
    const int set = default_threads().load(std::memory_order_relaxed);
    if (set > 0) return set;
    return contention().serial() ? 1 : omp_get_max_threads();
#else
    (void)requested;
    return 1;
#endif
}

inline int thread_id() {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

// body(i) for i < count, several at a time. Exceptions must not leave the parallel region: each is
// kept, and the lowest index that threw is returned with its exception in `error` (or -1).
template <class Body>
long long parallel_each(long long count, int n_threads, Body&& body, std::exception_ptr& error) {
    std::vector<std::exception_ptr> errors(static_cast<std::size_t>(count));
    const int nt = static_cast<int>(std::max<long long>(1, std::min<long long>(max_threads(n_threads), count)));
    RegionProbe probe(nt);
#pragma omp parallel num_threads(nt)
    {
        probe.enter();
#pragma omp for schedule(dynamic, 1)
        for (long long i = 0; i < count; ++i) {
            try {
                body(i);
            } catch (...) {
                errors[i] = std::current_exception();
            }
        }
    }
    for (long long i = 0; i < count; ++i)
        if (errors[i]) {
            error = errors[i];
            return i;
        }
    return -1;
}

}  // namespace feddip
