#include "isa.hpp"

#include <algorithm>
#include <atomic>

namespace feddip {
namespace {

Isa detected() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                      __builtin_cpu_supports("popcnt");
    if (avx2 && __builtin_cpu_supports("avx512f")) return Isa::avx512;
    if (avx2) return Isa::avx2;
#endif
    return Isa::generic;
}

std::atomic<int>& cap() {
    static std::atomic<int> limit{static_cast<int>(Isa::avx512)};
    return limit;
}

}  // namespace

Isa isa() {
    static const Isa best = detected();
    return std::min(best, static_cast<Isa>(cap().load(std::memory_order_relaxed)));
}

Isa limit_isa(Isa limit) {
    cap().store(static_cast<int>(limit), std::memory_order_relaxed);
    return isa();
}

}  // namespace feddip
