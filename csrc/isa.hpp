// The one switch for vector code and CPU features. Every CPU check of the core is made in isa.cpp,
// under the one cap that tests set (limit_isa), so a capped run reaches every generic loop:
//   top-k's pass, the float32 error-feedback step   AVX-512, AVX2 or generic
//   the float64 step, sparsify's packing of positions, densify's float32 scatter   AVX2 or generic
//   CRC-32C   SSE4.2's crc32 instruction above generic, else slicing-by-8 tables
//   the entropy decoder (32 lanes, raw fields)   AVX-512 (words of 8, 16, 32 bits), AVX2 (32 bits)
//                                                 or generic
// Plain C++17, no Python.
#pragma once

// x86-64 built by GCC or Clang: the only target with hand-written vector loops (intrinsics in
// functions compiled for a wider ISA through target attributes) and with the CPU checks that pick
// them at run time. Elsewhere (MSVC, ARM) every kernel runs its generic loop.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FEDDIP_X86 1
#endif

namespace feddip {

// Narrowest first. avx2 includes FMA and POPCNT; avx512 is AVX-512F on top of them.
enum class Isa : int { generic = 0, avx2 = 1, avx512 = 2 };

// The widest the CPU has, capped by limit_isa.
Isa isa();

// Caps isa() (tests run every path on a wide machine) and returns the one now in use. Top-k's
// results never depend on it; the step's norm may differ in its last bits between ISAs (its
// terms are added in lanes of the vector width).
Isa limit_isa(Isa limit);

// Whether CRC-32C may use SSE4.2's crc32 instruction: the CPU has it and limit_isa has not capped
// at generic. Not isa() >= avx2: CPUs with SSE4.2 but no AVX2 keep the instruction.
bool crc32_instruction();

}  // namespace feddip
