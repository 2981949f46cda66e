// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), as in iSCSI, ext4 and RFC 3720.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace feddip {

// CRC of `size` bytes continuing from `crc` (0 to start). Uses the SSE4.2 instruction, three
// streams side by side, where crc32_instruction() allows (isa.hpp), else slicing-by-8 tables; from
// 256 KiB, a piece a thread (set_num_threads), joined exactly.
std::uint32_t crc32c(const std::uint8_t* data, std::size_t size, std::uint32_t crc = 0);

// Copies the runs one after another into dst (which holds their total size) and returns the
// CRC-32C of all their bytes, continuing from `crc`: a message's join and checksum in one
// parallel pass (set_num_threads), each byte read once from where it was.
struct ByteRun {
    const std::uint8_t* data;
    std::size_t size;
};
std::uint32_t copy_crc32c(const std::vector<ByteRun>& runs, std::uint8_t* dst, std::uint32_t crc = 0);

}  // namespace feddip
