// What the error-feedback step's three files share (ef_step.hpp is the interface): ef_step.cpp is
// the algorithm (norms, the regulariser, one parallel pass over all layers' blocks),
// ef_step_simd.cpp the step's loops over a block (generic, AVX2, AVX-512) and ef_step_tuning.cpp
// the choice of loop and of stores. Plain C++17, no Python.
#pragma once

#include <cstddef>
#include <cstdint>
#include <utility>

#include "ef_step.hpp"
#include "isa.hpp"

namespace feddip::step {

// 1 for a non-zero mask byte, else 0, with integer arithmetic only (no compare), so it vectorises.
template <class T>
inline T mask_value(std::uint8_t byte) {
    const std::uint32_t x = byte;
    return static_cast<T>(static_cast<std::int32_t>((x | (0u - x)) >> 31));
}

// A mask is absent (all kept), one byte an element (non-zero = kept), or packed bits (element i
// is bit i % 8 of byte i / 8). Blocks and tiles start at multiples of 8 elements, so a packed mask
// can be offset by whole bytes.
enum class Layout { none, bytes, bits };

template <Layout L, class T>
inline T mask_at(const std::uint8_t* mask, std::size_t i) {
    if constexpr (L == Layout::none)
        return T(1);
    else if constexpr (L == Layout::bytes)
        return mask_value<T>(mask[i]);
    else
        return static_cast<T>((mask[i >> 3] >> (i & 7)) & 1);
}

template <Layout L>
inline const std::uint8_t* mask_from(const std::uint8_t* mask, std::size_t first) {
    if constexpr (L == Layout::none)
        return nullptr;
    else if constexpr (L == Layout::bytes)
        return mask + first;
    else
        return mask + first / 8;
}

// ef_step_simd.cpp. The step on elements [0, n) of a layer (a block) with the loops of `isa`;
// returns the block's norm terms (squares or |v| of the pruned values, summed in double). Every
// loop and store path gives the same bits. stream: the pruned copy goes out with streaming stores
// (StepStores). Instantiated there for every mask layout, momentum, copy and p of both types.
template <class T, Layout Mask, bool Mom, bool Pruned, int P>
double step_block(T* w, const T* g, const std::uint8_t* mask, T* buf, T* pruned, std::size_t n, T lr, T wd, T reg,
                  T scale, T mom, Isa isa, bool stream);

// ef_step_tuning.cpp. One float32 step on an AVX-512 CPU, planned by the loop timing (StepTuning):
// which loop it runs and whether its time is reported back.
struct LoopTrial {
    bool narrow = false;  // the AVX2 loop
    bool timed = false;
    std::pair<int, int> key{};  // size class, threads
};

// The plan for a step that reads and writes `bytes` on `threads` threads (a default plan, the
// widest loop and untimed, while step_tuning() is off).
LoopTrial plan_loop(std::size_t bytes, int threads);
// The planned step took `seconds`; with enough of them for both loops, the faster is kept.
void report_loop(const LoopTrial& trial, double seconds);

}  // namespace feddip::step
