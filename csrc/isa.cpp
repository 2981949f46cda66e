#include "isa.hpp"

#include <algorithm>
#include <atomic>

namespace feddip {
namespace {

struct Cpu {
    Isa widest = Isa::generic;
    bool crc32 = false;  // SSE4.2
};

Cpu detect() {
    Cpu cpu;
#ifdef FEDDIP_X86
    __builtin_cpu_init();
    cpu.crc32 = __builtin_cpu_supports("sse4.2");
    const bool avx2 =
        __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("popcnt");
    if (avx2) cpu.widest = __builtin_cpu_supports("avx512f") ? Isa::avx512 : Isa::avx2;
#endif
    return cpu;
}

const Cpu& cpu() {
    static const Cpu detected = detect();
    return detected;
}

std::atomic<int>& cap() {
    static std::atomic<int> limit{static_cast<int>(Isa::avx512)};
    return limit;
}

}  // namespace

Isa isa() { return std::min(cpu().widest, static_cast<Isa>(cap().load(std::memory_order_relaxed))); }

Isa limit_isa(Isa limit) {
    cap().store(static_cast<int>(limit), std::memory_order_relaxed);
    return isa();
}

bool crc32_instruction() {
    return cpu().crc32 && cap().load(std::memory_order_relaxed) != static_cast<int>(Isa::generic);
}

}  // namespace feddip
