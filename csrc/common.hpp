// Shared helpers for the feddip-kernels C++ core. Plain C++17, no Python.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#ifdef _OPENMP
#include <omp.h>
#endif

// Hot loops are compiled twice on x86-64 (baseline SSE2 and AVX2) and picked at load time, so the
// package needs no -march flag and still uses the wider vectors where the CPU has them.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
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

// Threads a parallel kernel uses: its own request, else the library-wide setting, else OpenMP's.
inline int max_threads(int requested) {
#ifdef _OPENMP
    if (requested > 0) return requested;
    const int set = default_threads().load(std::memory_order_relaxed);
    return set > 0 ? set : omp_get_max_threads();
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

}  // namespace feddip
