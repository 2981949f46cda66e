#include "crc32c.hpp"

#include <algorithm>
#include <array>
#include <cstring>
#include <vector>

#include "common.hpp"
#include "isa.hpp"

namespace feddip {
namespace {

struct Tables {
    std::uint32_t t[8][256];
    Tables() {
        for (std::uint32_t i = 0; i < 256; ++i) {
            std::uint32_t c = i;
            for (int k = 0; k < 8; ++k) c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1u)));
            t[0][i] = c;
        }
        for (std::uint32_t i = 0; i < 256; ++i)
            for (int s = 1; s < 8; ++s) t[s][i] = (t[s - 1][i] >> 8) ^ t[0][t[s - 1][i] & 0xff];
    }
};

std::uint32_t crc_software(const std::uint8_t* p, std::size_t n, std::uint32_t c) {
    static const Tables tables;
    const auto& t = tables.t;
    while (n >= 8) {
        std::uint32_t lo, hi;
        std::memcpy(&lo, p, 4);
        std::memcpy(&hi, p + 4, 4);
        lo ^= c;
        c = t[7][lo & 0xff] ^ t[6][(lo >> 8) & 0xff] ^ t[5][(lo >> 16) & 0xff] ^ t[4][lo >> 24] ^ t[3][hi & 0xff] ^
            t[2][(hi >> 8) & 0xff] ^ t[1][(hi >> 16) & 0xff] ^ t[0][hi >> 24];
        p += 8;
        n -= 8;
    }
    while (n--) c = (c >> 8) ^ t[0][(c ^ *p++) & 0xff];
    return c;
}

// The CRC register is linear over GF(2): running it over B from register r gives the register run
// over B from 0, xor r carried past |B| zero bytes. Carrying past zeros is a 32x32 bit matrix
// (column i: where bit i goes), squared to double the distance, so any distance costs O(log n).
using Matrix = std::array<std::uint32_t, 32>;

std::uint32_t apply(const Matrix& m, std::uint32_t v) {
    std::uint32_t r = 0;
    for (int i = 0; v; ++i, v >>= 1)
        if (v & 1) r ^= m[i];
    return r;
}

Matrix square(const Matrix& m) {
    Matrix s;
    for (int i = 0; i < 32; ++i) s[i] = apply(m, m[i]);
    return s;
}

// The register carried past one zero byte: one zero bit (a right shift, the polynomial folded in
// where bit 0 drops out), squared three times.
Matrix one_zero_byte() {
    Matrix bit;
    bit[0] = 0x82F63B78u;
    for (int i = 1; i < 32; ++i) bit[i] = std::uint32_t(1) << (i - 1);
    return square(square(square(bit)));
}

// The maps past 2^k zero bytes, k = 0 .. 63, squared once and kept.
struct PowersOfTwo {
    Matrix past[64];
    PowersOfTwo() {
        past[0] = one_zero_byte();
        for (int k = 1; k < 64; ++k) past[k] = square(past[k - 1]);
    }
};

// The register r carried past n zero bytes: a matrix a set bit of n.
std::uint32_t past_zeros(std::uint32_t r, std::uint64_t n) {
    static const PowersOfTwo powers;
    for (int k = 0; n; ++k, n >>= 1)
        if (n & 1) r = apply(powers.past[k], r);
    return r;
}

#ifdef FEDDIP_X86
// Three lanes of kLane bytes are run side by side: the crc32 instruction has a latency of three
// cycles and a throughput of one, so one chain of them uses a third of the unit. Carrying a lane's
// register past the next lane (kLane zero bytes) is a fixed map, kept as four byte tables.
constexpr std::size_t kLane = 4096;

struct PastLane {
    std::uint32_t t[4][256];
    PastLane() {
        for (int k = 0; k < 4; ++k)
            for (std::uint32_t b = 0; b < 256; ++b) t[k][b] = past_zeros(b << (8 * k), kLane);
    }
    std::uint32_t operator()(std::uint32_t r) const {
        return t[0][r & 0xff] ^ t[1][(r >> 8) & 0xff] ^ t[2][(r >> 16) & 0xff] ^ t[3][r >> 24];
    }
};

__attribute__((target("sse4.2"))) std::uint32_t crc_hardware(const std::uint8_t* p, std::size_t n, std::uint32_t c) {
    static const PastLane past_lane;
    std::uint64_t c64 = c;
    for (; n >= 3 * kLane; p += 3 * kLane, n -= 3 * kLane) {
        std::uint64_t a = c64, b = 0, d = 0;
        for (std::size_t i = 0; i < kLane; i += 8) {
            std::uint64_t va, vb, vd;
            std::memcpy(&va, p + i, 8);
            std::memcpy(&vb, p + kLane + i, 8);
            std::memcpy(&vd, p + 2 * kLane + i, 8);
            a = __builtin_ia32_crc32di(a, va);
            b = __builtin_ia32_crc32di(b, vb);
            d = __builtin_ia32_crc32di(d, vd);
        }
        c64 = past_lane(past_lane(static_cast<std::uint32_t>(a)) ^ static_cast<std::uint32_t>(b)) ^
              static_cast<std::uint32_t>(d);
    }
    while (n >= 8) {
        std::uint64_t v;
        std::memcpy(&v, p, 8);
        c64 = __builtin_ia32_crc32di(c64, v);
        p += 8;
        n -= 8;
    }
    c = static_cast<std::uint32_t>(c64);
    while (n--) c = __builtin_ia32_crc32qi(c, *p++);
    return c;
}
#endif

// The register run over n bytes from register c, on one thread; `hardware`: crc32_instruction(),
// asked once a call.
std::uint32_t crc_run(const std::uint8_t* data, std::size_t size, std::uint32_t c, bool hardware) {
#ifdef FEDDIP_X86
    if (hardware) return crc_hardware(data, size, c);
#else
    (void)hardware;
#endif
    return crc_software(data, size, c);
}

}  // namespace

namespace {

// A piece of at most kPiece bytes: checksummed where it lies, or first copied to `dst` and
// checksummed from the copy while it is in cache.
constexpr std::size_t kPiece = std::size_t(1) << 18;

struct Piece {
    const std::uint8_t* src;
    std::uint8_t* dst;  // null: no copy
    std::size_t size;
};

// The CRC of the pieces' bytes in order, continuing from `crc`: the pieces in parallel, each
// register from 0, then joined by carrying the register so far past each next piece.
std::uint32_t crc_of_pieces(const std::vector<Piece>& pieces, std::size_t total, std::uint32_t crc) {
    const int nt = total < kPiece ? 1 : max_threads(0);
    std::vector<std::uint32_t> reg(pieces.size(), 0);
    const bool hardware = crc32_instruction();
    const long long n_pieces = static_cast<long long>(pieces.size());
    RegionProbe probe(nt);
#pragma omp parallel num_threads(nt)
    {
        probe.enter();
#pragma omp for schedule(dynamic, 4)
        for (long long i = 0; i < n_pieces; ++i) {
            const Piece& pc = pieces[static_cast<std::size_t>(i)];
            if (pc.dst) std::memcpy(pc.dst, pc.src, pc.size);
            reg[static_cast<std::size_t>(i)] = crc_run(pc.dst ? pc.dst : pc.src, pc.size, 0, hardware);
        }
    }
    std::uint32_t r = ~crc;
    for (std::size_t i = 0; i < pieces.size(); ++i) r = past_zeros(r, pieces[i].size) ^ reg[i];
    return ~r;
}

void add_pieces(const std::uint8_t* src, std::uint8_t* dst, std::size_t size, std::vector<Piece>& pieces) {
    for (std::size_t off = 0; off < size; off += kPiece)
        pieces.push_back({src + off, dst ? dst + off : nullptr, std::min(kPiece, size - off)});
}

}  // namespace

std::uint32_t crc32c(const std::uint8_t* data, std::size_t size, std::uint32_t crc) {
    if (size < kPiece || max_threads(0) <= 1) return ~crc_run(data, size, ~crc, crc32_instruction());
    std::vector<Piece> pieces;
    add_pieces(data, nullptr, size, pieces);
    return crc_of_pieces(pieces, size, crc);
}

std::uint32_t copy_crc32c(const std::vector<ByteRun>& runs, std::uint8_t* dst, std::uint32_t crc) {
    std::vector<Piece> pieces;
    std::size_t total = 0;
    for (const ByteRun& run : runs) {
        add_pieces(run.data, dst + total, run.size, pieces);
        total += run.size;
    }
    return crc_of_pieces(pieces, total, crc);
}

}  // namespace feddip
