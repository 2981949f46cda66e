// Which vector instruction set the loops with hand-written vector code use (top-k's pass and the
// float32 error-feedback step: AVX-512, AVX2 or generic; the float64 step and sparsify's packing of
// positions: AVX2 or generic). Plain C++17, no Python.
#pragma once

namespace feddip {

// Narrowest first. avx2 includes FMA and POPCNT; avx512 is AVX-512F on top of them.
enum class Isa : int { generic = 0, avx2 = 1, avx512 = 2 };

// The widest the CPU has, capped by limit_isa.
Isa isa();

// Caps isa() (tests run every path on a wide machine) and returns the one now in use. Top-k's
// results never depend on it; the step's norm may differ in its last bits between ISAs (its
// terms are added in lanes of the vector width).
Isa limit_isa(Isa limit);

}  // namespace feddip
