// FedDIP's local step: masked error-feedback SGD with the incremental p-norm regulariser, fused.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace feddip {

// A layer's mask: null (all kept), one byte an element (non-zero = kept), or packed bits (element
// i is bit i % 8 of byte i / 8, as pack_bits writes them; (n + 7) / 8 bytes).
struct MaskRef {
    const std::uint8_t* data = nullptr;
    bool packed = false;
};

struct EFStepParams {
    double lr = 0.0;
    double weight_decay = 0.0;
    double lam = 0.0;       // regularisation strength lambda_t
    double momentum = 0.0;  // used only when a momentum buffer is given
    int p = 2;              // 1 or 2: lam * ||w * m||_p, not squared
};

// One step on one layer, in place, one pass over memory:
//   d   = g + weight_decay * w + lam * d||w*m||_p/dw
//   buf = momentum * buf + d; d = buf           (when buf is given; zero-initialise it)
//   w  -= lr * d
//   pruned = w * m                               (when pruned is given)
// g is the gradient taken at the pruned point w*m and is applied to the dense w (error feedback).
// For p = 2 the regulariser gradient is m*w / ||w*m||_2 (zero when the norm is zero or not finite;
// formed without overflow for subnormal norms); for p = 1 it
// is m*sign(w). `mask` may be absent (all ones). `norm` is ||w*m||_p before the step; pass a
// negative value to have it computed by an extra read pass. Returns ||w*m||_p after the step,
// which the caller can feed to the next step to keep it one pass.
template <class T>
double masked_ef_step(T* w, const T* g, MaskRef mask, T* buf, T* pruned, std::size_t n,
                      const EFStepParams& params, double norm, int n_threads = 0);

// One layer of a multi-layer step: the arguments of masked_ef_step.
template <class T>
struct LayerStep {
    T* w;
    const T* g;
    MaskRef mask;
    T* buf;      // momentum buffer or null
    T* pruned;   // pruned copy or null
    std::size_t n;
    double norm;  // ||w*m||_p before the step; negative: not known, computed first
};

// masked_ef_step on every layer, with one set of hyperparameters, in one parallel pass over all
// layers' chunks. Returns each layer's ||w*m||_p after the step: the same values as stepping the
// layers one at a time. No two arrays of any layers may overlap.
template <class T>
std::vector<double> masked_ef_step_many(const std::vector<LayerStep<T>>& layers, const EFStepParams& params,
                                        int n_threads = 0);

// ||w * m||_p (p = 1 or 2) with a double accumulator; mask may be null. For p = 2, a sum of squares
// small enough to have lost underflowed terms is recomputed from rescaled values.
template <class T>
double masked_norm(const T* w, MaskRef mask, std::size_t n, int p, int n_threads = 0);

}  // namespace feddip
