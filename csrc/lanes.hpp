// Lane tables for 8-lane compress and expand with one permute (AVX2 has no instruction for either).
// Plain constexpr C++: the kernels that use them hold the intrinsics.
#pragma once

#include <cstdint>

namespace feddip {

// entry[mask], one byte a lane: for a compress, the source lane of each output lane (the set lanes
// of the 8-bit mask moved to the front, in order); for an expand, the value each set lane takes
// (the next in order). Unused lanes get 0 and are masked off by the caller.
struct LaneTable {
    std::uint64_t entry[256];
    constexpr explicit LaneTable(bool expand) : entry() {
        for (int mask = 0; mask < 256; ++mask) {
            std::uint64_t e = 0;
            int j = 0;
            for (int lane = 0; lane < 8; ++lane) {
                if (!(mask >> lane & 1)) continue;
                e |= expand ? std::uint64_t(j) << (8 * lane) : std::uint64_t(lane) << (8 * j);
                ++j;
            }
            entry[mask] = e;
        }
    }
};

inline constexpr LaneTable kCompressLanes{false};
inline constexpr LaneTable kExpandLanes{true};

// entry[mask]: the 8 bits of the mask as 8 bytes of 0 or 1, bit j to byte j (a bool mask's bytes).
struct ByteTable {
    std::uint64_t entry[256];
    constexpr ByteTable() : entry() {
        for (int mask = 0; mask < 256; ++mask)
            for (int j = 0; j < 8; ++j) entry[mask] |= std::uint64_t(mask >> j & 1) << (8 * j);
    }
};

inline constexpr ByteTable kMaskBytes{};

}  // namespace feddip
