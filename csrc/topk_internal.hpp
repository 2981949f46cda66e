// What the global top-k's files share (topk.hpp is the interface): topk.cpp is the selection,
// topk_simd.cpp the fast path's pass over a slice (generic, AVX2, AVX-512) and topk_tuning.hpp its
// sizes. Plain C++17, no Python.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <type_traits>

#include "common.hpp"
#include "isa.hpp"
#include "topk_tuning.hpp"

namespace feddip::topk {

// At most kSlice elements of one tensor, at `offset` in segment `segment`: the unit of parallel work.
template <class T>
struct Slice {
    const T* data;
    std::size_t size;
    std::size_t segment;
    std::size_t offset;
};

// What one thread's share of the fast path's pass found.
template <class U>
struct Scan {
    U* out = nullptr;                // gathered keys in [lo, hi]; `cap` of room
    std::uint32_t* pos = nullptr;    // and their indices in their slice, when masks are written
    std::size_t cap = 0;
    std::size_t size = 0;
    std::uint64_t above = 0;         // keys > hi
    bool nan = false;
    bool overflow = false;           // more keys in [lo, hi] than all threads' room: the gather gave up
    std::size_t room = 0;            // all threads' room: more keys than that in all, and the gather fails
    const std::atomic<std::size_t>* gathered = nullptr;  // keys all threads have gathered, slice by slice
    std::unique_ptr<U[]> keys_held;  // what out and pos point into
    std::unique_ptr<std::uint32_t[]> pos_held;

    // Room for `more` keys after those gathered, the buffers grown (to twice their size at least)
    // if need be; false when all threads' keys so far exceed `room`. Threads start with an even
    // share of the room, but the keys inside a bracket can lie in a few tensors and so in a few
    // threads' slices: a fixed share made ResNet-18's masks fall back to the radix passes on 8 and
    // 16 threads.
    bool reserve(std::size_t more, bool with_pos) {
        if (gathered->load(std::memory_order_relaxed) > room) return false;  // counts this thread's keys too
        if (size + more <= cap) return true;
        const std::size_t grown = std::max(size + more, std::min(2 * cap, room + more));
        std::unique_ptr<U[]> keys(new U[grown]);
        std::copy(out, out + size, keys.get());
        if (with_pos) {
            std::unique_ptr<std::uint32_t[]> where(new std::uint32_t[grown]);
            std::copy(pos, pos + size, where.get());
            pos_held = std::move(where);
            pos = pos_held.get();
        }
        keys_held = std::move(keys);
        out = keys_held.get();
        cap = grown;
        return true;
    }
};

// topk_simd.cpp. The pass over one slice with the loop of `isa`: counts keys > hi and appends keys
// in [lo, hi] to `sc`; with `mask` (the slice's part of its tensor's mask), also writes it as
// key > hi and appends the candidates' indices. Instantiated there for float and double.
template <class T>
void scan(const Slice<T>& ch, std::make_signed_t<bits_t<T>> hi, std::make_signed_t<bits_t<T>> lo, Scan<bits_t<T>>& sc,
          Isa isa, std::uint8_t* mask);

}  // namespace feddip::topk
