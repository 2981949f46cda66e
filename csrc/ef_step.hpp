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
double masked_ef_step(T* w, const T* g, MaskRef mask, T* buf, T* pruned, std::size_t n, const EFStepParams& params,
                      double norm, int n_threads = 0);

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
// layers' blocks. Returns each layer's ||w*m||_p after the step: the same values as stepping the
// layers one at a time. No two arrays of any layers may overlap.
template <class T>
std::vector<double> masked_ef_step_many(const std::vector<LayerStep<T>>& layers, const EFStepParams& params,
                                        int n_threads = 0);

// How masked_ef_step(_many) writes pruned copies: streaming (non-temporal) stores, the default, or
// stores through the cache. Both write the same bits. Returns the setting before.
enum class StepStores : int { stream = 0, cache = 1 };
StepStores set_step_stores(StepStores stores);
StepStores step_stores();

// Whether a float32 step on an AVX-512 CPU picks its loop by timing (the default): the first calls
// of each size (log2 of the bytes a step reads and writes) and thread count run the AVX-512 and the
// AVX2 loop by turns and the faster is kept from then on. Off, the widest loop isa() allows runs.
// Both give the same bits. Returns the setting before.
bool set_step_tuning(bool on);
bool step_tuning();

// What the timing has learnt for one size class and thread count.
struct StepTuningChoice {
    int size_class;      // floor(log2(bytes a step reads and writes))
    int threads;
    const char* chosen;  // "avx512", "avx2", or "open" while still timing
    double avx512_s, avx2_s;  // each loop's fastest call in seconds (infinity: not yet timed)
};
std::vector<StepTuningChoice> step_tuning_choices();
// Forgets them: the next calls time both loops again.
void forget_step_tuning();

// ||w * m||_p (p = 1 or 2) with a double accumulator; mask may be null. For p = 2, a sum of squares
// small enough to have lost underflowed terms is recomputed from rescaled values.
template <class T>
double masked_norm(const T* w, MaskRef mask, std::size_t n, int p, int n_threads = 0);

}  // namespace feddip
