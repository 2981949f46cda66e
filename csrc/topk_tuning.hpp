// The global top-k's tuning: work sizes, when the one-pass fast path is tried and how wide its
// bracket is, when a radix select stops. The results never depend on them (the fast path falls
// back to the radix passes where its bracket misses), only the time. Plain C++17, no Python.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>

namespace feddip::topk {

// Elements a parallel task takes (a slice, within one tensor).
constexpr std::size_t kSlice = std::size_t(1) << 15;
// Bins of a radix pass over memory: a 16-bit digit a pass, a histogram a thread.
constexpr std::size_t kBins = std::size_t(1) << 16;
// Below this many candidates, gather them and select in cache instead of another histogram.
constexpr std::uint64_t kGatherMax = std::uint64_t(1) << 18;
// The one-pass fast path: used from kSampleMinN elements; its sample holds n / 256 keys, at least
// kSampleMin and at most kSampleMax, and it may gather up to max(kGatherMax, n / 64) keys.
constexpr std::uint64_t kSampleMinN = std::uint64_t(1) << 20;
constexpr std::uint64_t kSampleMin = std::uint64_t(1) << 16;
constexpr std::uint64_t kSampleMax = std::uint64_t(1) << 20;
// The pass counts a block of elements (vectorised) before compacting it, and only where it holds
// candidates; a multiple of every loop's vector width.
constexpr std::size_t kBlock = 32;
constexpr std::size_t kRun = 16;  // sample run length (one 64-byte line of float32)
// The in-cache selections: 12 bits a radix level (a 16 KiB histogram), then nth_element on at most
// kNthElementMax keys.
constexpr int kDigit = 12;
constexpr std::size_t kNthElementMax = 2048;
// The sample's bracket: a histogram of the top 16 bits of its keys' span, a bin 2^-9 of an octave
// of float32 magnitudes, so the bracket is hardly wider than the exact ranks'.
constexpr int kBracketDigit = 16;

// Keys in the fast path's sample of n.
inline std::uint64_t sample_size(std::uint64_t n) { return std::min(n, std::clamp(n / 256, kSampleMin, kSampleMax)); }

// How far the bracket's ends lie from r, the k-th key's expected rank in a sample of s keys: four
// standard deviations of that rank, and 16 more.
inline double bracket_margin(double r, double s) { return 4.0 * std::sqrt(r * (1.0 - r / s)) + 16.0; }

// Keys the fast path's pass may gather in all, over n elements, before it gives up.
inline std::size_t gather_room(std::uint64_t n) { return static_cast<std::size_t>(std::max(kGatherMax, n / 64)); }

}  // namespace feddip::topk
