// Bit scans and counts of 64-bit words: the GCC and Clang builtins (one instruction where the
// target has it), MSVC's intrinsics, or portable code. Plain C++17, no Python.
#pragma once

#include <cstdint>

#if defined(_MSC_VER) && !defined(__clang__)
#include <intrin.h>
#endif

namespace feddip {

// Index of the lowest set bit of v != 0.
inline int ctz64(std::uint64_t v) {
#if defined(__GNUC__) || defined(__clang__)
    return __builtin_ctzll(v);
#elif defined(_MSC_VER) && (defined(_M_X64) || defined(_M_ARM64))
    unsigned long i;
    _BitScanForward64(&i, v);
    return static_cast<int>(i);
#else
    int i = 0;
    for (; !(v & 1); v >>= 1) ++i;
    return i;
#endif
}

// Zero bits above the highest set bit of v != 0 (63 - floor(log2 v)).
inline int clz64(std::uint64_t v) {
#if defined(__GNUC__) || defined(__clang__)
    return __builtin_clzll(v);
#elif defined(_MSC_VER) && (defined(_M_X64) || defined(_M_ARM64))
    unsigned long i;
    _BitScanReverse64(&i, v);
    return 63 - static_cast<int>(i);
#else
    int i = 0;
    for (; !(v >> 63); v <<= 1) ++i;
    return i;
#endif
}

// Set bits of v. Not MSVC's __popcnt64: it emits the POPCNT instruction unchecked, and baseline
// x86-64 CPUs lack it; the bit-parallel sum below is a dozen instructions.
inline int popcount64(std::uint64_t v) {
#if defined(__GNUC__) || defined(__clang__)
    return __builtin_popcountll(v);
#else
    v -= (v >> 1) & 0x5555555555555555ull;
    v = (v & 0x3333333333333333ull) + ((v >> 2) & 0x3333333333333333ull);
    v = (v + (v >> 4)) & 0x0f0f0f0f0f0f0f0full;
    return static_cast<int>((v * 0x0101010101010101ull) >> 56);
#endif
}

}  // namespace feddip
