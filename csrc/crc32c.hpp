// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), as in iSCSI, ext4 and RFC 3720.
#pragma once

#include <cstddef>
#include <cstdint>

namespace feddip {

// CRC of `size` bytes continuing from `crc` (0 to start). Uses the SSE4.2 instruction, three
// streams side by side, where the CPU has it, else slicing-by-8 tables; from 256 KiB, a piece a
// thread (set_num_threads), joined exactly.
std::uint32_t crc32c(const std::uint8_t* data, std::size_t size, std::uint32_t crc = 0);

}  // namespace feddip
