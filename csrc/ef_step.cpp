// FedDIP's local step (ef_step.hpp): the norms, the regulariser and one parallel pass over all
// layers' blocks. The loops over a block are in ef_step_simd.cpp, the choice of loop and stores in
// ef_step_tuning.cpp.
#include "ef_step.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <type_traits>
#include <utility>
#include <vector>

#include "common.hpp"
#include "ef_step_internal.hpp"
#include "isa.hpp"

namespace feddip {
namespace {

using step::Layout;
using step::mask_at;
using step::mask_from;

// Block: the unit of parallel work. Norm terms (squares or |v|) are summed in double throughout:
// in float, a block of weights of 3e19 would overflow (3e19^2 > FLT_MAX) where the norm is finite.
constexpr std::size_t kBlock = 4096;
// Below this, threads cost more than they save.
constexpr std::size_t kParallelMin = std::size_t(1) << 16;

inline int threads_for(int requested, std::size_t n) { return n < kParallelMin ? 1 : max_threads(requested); }

// Sum of block(b, m) over the blocks [b, b + m) of n elements, in parallel, added in block order
// whatever the thread count: results are the same bits with 1, 2 or 16 threads.
template <class F>
double sum_over_blocks(std::size_t n, int nt, F&& block) {
    const long long n_blocks = static_cast<long long>((n + kBlock - 1) / kBlock);
    if (n_blocks <= 1) return n_blocks ? block(std::size_t(0), n) : 0.0;
    std::vector<double> part(static_cast<std::size_t>(n_blocks));
    parallel_for(nt, n_blocks, [&](long long c) {
        const std::size_t b = static_cast<std::size_t>(c) * kBlock;
        part[static_cast<std::size_t>(c)] = block(b, std::min(kBlock, n - b));
    });
    double total = 0.0;
    for (const double x : part) total += x;
    return total;
}

template <class T, Layout Mask, int P>
FEDDIP_VECTOR_CLONES double norm_block(const T* w, const std::uint8_t* mask, std::size_t n) {
    double acc = 0;
#pragma omp simd reduction(+ : acc)
    for (std::size_t i = 0; i < n; ++i) {
        const double v = static_cast<double>(w[i] * mask_at<Mask, T>(mask, i));
        acc += P == 2 ? v * v : std::abs(v);
    }
    return acc;
}

// The largest |w*m|, NaN skipped (0 for none). On the bit patterns of |w*m| (magnitude_key), whose
// order is the numeric order: Clang vectorises a max of integers, not one of floats that skips
// NaN (it needs -ffast-math for that). Keys have the top bit clear, so signed lanes hold them.
template <class T, Layout Mask>
FEDDIP_VECTOR_CLONES T max_abs_block(const T* w, const std::uint8_t* mask, std::size_t n) {
    using S = std::make_signed_t<bits_t<T>>;
    constexpr S kInf = static_cast<S>(inf_key<T>());
    S acc = 0;
#pragma omp simd reduction(max : acc)
    for (std::size_t i = 0; i < n; ++i) {
        const S key = static_cast<S>(magnitude_key(w[i] * mask_at<Mask, T>(mask, i)));
        const S kept = key > kInf ? S(0) : key;  // a NaN's key is above +inf's
        acc = kept > acc ? kept : acc;
    }
    return key_to_value<T>(static_cast<bits_t<T>>(acc));
}

template <class T, Layout Mask>
FEDDIP_VECTOR_CLONES double scaled_sq_block(const T* w, const std::uint8_t* mask, std::size_t n, double s) {
    double acc = 0;
#pragma omp simd reduction(+ : acc)
    for (std::size_t i = 0; i < n; ++i) {
        const double v = static_cast<double>(w[i] * mask_at<Mask, T>(mask, i)) * s;
        acc += v * v;
    }
    return acc;
}

// The double sum of squares is exact enough unless squares fall below double's smallest normal
// (float64 weights under ~1e-146) or overflow it (float64 weights over ~1e154; float32 squares
// always fit). Then the 2-norm is recomputed from values scaled by a power of two (exact) so that
// the largest is near 1: two more read passes, taken only for such layers. NaN is kept as it is.
inline bool sum_sq_unreliable(double sum_sq, std::size_t n) {
    using L = std::numeric_limits<double>;
    return sum_sq < static_cast<double>(n) * (L::min() / L::epsilon()) || sum_sq == L::infinity();
}

template <class T, Layout Mask>
double norm2_scaled(const T* w, const std::uint8_t* mask, std::size_t n, int nt) {
    const long long n_blocks = static_cast<long long>((n + kBlock - 1) / kBlock);
    T mx = 0;
    RegionProbe probe(nt);
#pragma omp parallel num_threads(nt)
    {
        probe.enter();
#pragma omp for schedule(static) reduction(max : mx)
        for (long long c = 0; c < n_blocks; ++c) {
            const std::size_t b = static_cast<std::size_t>(c) * kBlock, m = std::min(kBlock, n - b);
            const T v = max_abs_block<T, Mask>(w + b, mask_from<Mask>(mask, b), m);
            mx = v > mx ? v : mx;
        }
    }
    if (!(mx > 0)) return 0.0;
    using D = std::numeric_limits<double>;
    const int e = std::min(std::max(std::ilogb(static_cast<double>(mx)), 2 - D::max_exponent), -D::min_exponent);
    const double s = std::ldexp(1.0, -e);
    const double total = sum_over_blocks(n, nt, [&](std::size_t b, std::size_t m) {
        return scaled_sq_block<T, Mask>(w + b, mask_from<Mask>(mask, b), m, s);
    });
    return std::ldexp(std::sqrt(total), e);
}

// ||w*m||_p from a sum of |v| (P = 1) or of squares (P = 2) over the same n elements.
template <class T, Layout Mask, int P>
double finish_norm(double total, const T* w, const std::uint8_t* mask, std::size_t n, int nt) {
    if (P == 1) return total;
    // float32 squares always lie in double's normal range (1.4e-45^2 = 2e-90, 3.4e38^2 = 1.2e77):
    // the sum is exact enough as it is. Checking it anyway sent every layer whose kept weights are
    // all zero (common at high sparsity) through two more read passes.
    if constexpr (std::is_same_v<T, float>) return std::sqrt(total);
    return sum_sq_unreliable(total, n) ? norm2_scaled<T, Mask>(w, mask, n, nt) : std::sqrt(total);
}

template <class T, Layout Mask, int P>
double norm_impl(const T* w, const std::uint8_t* mask, std::size_t n, int nt) {
    const double total = sum_over_blocks(n, nt, [&](std::size_t b, std::size_t m) {
        return norm_block<T, Mask, P>(w + b, mask_from<Mask>(mask, b), m);
    });
    return finish_norm<T, Mask, P>(total, w, mask, n, nt);
}

// The regulariser's factors for a layer whose ||w*m||_p before the step is `norm`: reg * scale =
// lam / norm for p = 2, reg = lam for p = 1. lam / norm can overflow T for a tiny norm although
// each term lam * w_i / norm is at most lam: w_i is scaled by a power of two (exact, kept within T's
// normal range) and lam divided by the norm scaled alike. A zero or non-finite norm, or lam == 0,
// gives no regulariser term.
template <class T>
std::pair<double, double> regulariser(double lam, int p, double norm) {
    if (p == 1) return {lam, 1.0};
    if (lam == 0 || !(norm > 0) || !std::isfinite(norm)) return {0.0, 1.0};
    using L = std::numeric_limits<T>;
    const int e = std::min(std::max(-std::ilogb(norm), L::min_exponent), L::max_exponent - 2);
    const double scale = std::ldexp(1.0, e);
    return {lam / (norm * scale), scale};
}

// One layer of a step, bound to the kernel instantiation its mask layout, momentum, pruned copy
// and p select: block(b, m) steps elements [b, b + m) and returns their norm terms; finish turns
// the layer's summed terms into ||w*m||_p.
template <class T>
struct BoundLayer {
    const LayerStep<T>* layer;
    T lr, wd, reg, scale, mom;
    double (*block)(const BoundLayer&, std::size_t b, std::size_t m, Isa isa, bool stream);
    double (*finish)(const BoundLayer&, double total, int nt);
    double (*norm)(const LayerStep<T>&, int nt);
};

template <class T, Layout Mask, bool Mom, bool Pruned, int P>
struct Kernel {
    static double block(const BoundLayer<T>& s, std::size_t b, std::size_t m, Isa isa, bool stream) {
        const LayerStep<T>& L = *s.layer;
        return step::step_block<T, Mask, Mom, Pruned, P>(L.w + b, L.g + b, mask_from<Mask>(L.mask.data, b),
                                                         Mom ? L.buf + b : nullptr, Pruned ? L.pruned + b : nullptr, m,
                                                         s.lr, s.wd, s.reg, s.scale, s.mom, isa, stream);
    }
    static double finish(const BoundLayer<T>& s, double total, int nt) {
        return finish_norm<T, Mask, P>(total, s.layer->w, s.layer->mask.data, s.layer->n, nt);
    }
    static double norm(const LayerStep<T>& L, int nt) { return norm_impl<T, Mask, P>(L.w, L.mask.data, L.n, nt); }
};

template <class T, Layout Mask, bool Mom, bool Pruned>
BoundLayer<T> bind_p(int p) {
    BoundLayer<T> s{};
    if (p == 1) {
        s.block = &Kernel<T, Mask, Mom, Pruned, 1>::block;
        s.finish = &Kernel<T, Mask, Mom, Pruned, 1>::finish;
        s.norm = &Kernel<T, Mask, Mom, Pruned, 1>::norm;
    } else {
        s.block = &Kernel<T, Mask, Mom, Pruned, 2>::block;
        s.finish = &Kernel<T, Mask, Mom, Pruned, 2>::finish;
        s.norm = &Kernel<T, Mask, Mom, Pruned, 2>::norm;
    }
    return s;
}

template <class T, Layout Mask, bool Mom>
BoundLayer<T> bind_pruned(bool pruned, int p) {
    return pruned ? bind_p<T, Mask, Mom, true>(p) : bind_p<T, Mask, Mom, false>(p);
}

template <class T, Layout Mask>
BoundLayer<T> bind_mom(bool mom, bool pruned, int p) {
    return mom ? bind_pruned<T, Mask, true>(pruned, p) : bind_pruned<T, Mask, false>(pruned, p);
}

template <class T>
BoundLayer<T> bind(const LayerStep<T>& L, int p) {
    const bool mom = L.buf != nullptr, pruned = L.pruned != nullptr;
    if (!L.mask.data) return bind_mom<T, Layout::none>(mom, pruned, p);
    return L.mask.packed ? bind_mom<T, Layout::bits>(mom, pruned, p) : bind_mom<T, Layout::bytes>(mom, pruned, p);
}

}  // namespace

template <class T>
std::vector<double> masked_ef_step_many(const std::vector<LayerStep<T>>& layers, const EFStepParams& prm,
                                        int n_threads) {
    if (prm.p != 1 && prm.p != 2) throw std::invalid_argument("p must be 1 or 2");
    std::size_t total = 0;
    for (const LayerStep<T>& L : layers) total += L.n;
    const int nt = threads_for(n_threads, total);
    // Bind each layer, with its norm before the step (an extra read pass where not given).
    std::vector<BoundLayer<T>> bound;
    bound.reserve(layers.size());
    for (const LayerStep<T>& L : layers) {
        BoundLayer<T> s = bind(L, prm.p);
        const double norm = L.norm < 0 ? s.norm(L, threads_for(n_threads, L.n)) : L.norm;
        const auto [reg, scale] = regulariser<T>(prm.lam, prm.p, norm);
        s.layer = &L;
        s.lr = T(prm.lr), s.wd = T(prm.weight_decay), s.reg = T(reg), s.scale = T(scale), s.mom = T(prm.momentum);
        bound.push_back(s);
    }
    // Every layer's blocks in one parallel loop: one fork and join for the whole model, and small
    // layers share the threads. Each layer's terms are added in block order, so the norms are the
    // same bits whatever the thread count and whether layers are stepped together or alone.
    struct Piece {
        std::size_t layer, begin, size;
    };
    std::vector<Piece> pieces;
    pieces.reserve(total / kBlock + layers.size());
    for (std::size_t l = 0; l < layers.size(); ++l)
        for (std::size_t b = 0; b < layers[l].n; b += kBlock)
            pieces.push_back({l, b, std::min(kBlock, layers[l].n - b)});
    std::vector<double> part(pieces.size());
    const long long n_pieces = static_cast<long long>(pieces.size());
    // The loop (StepTuning), by the size of what the step reads and writes (w, g and the buffer, the
    // copies, the masks): timed while the loops are tried out.
    step::LoopTrial trial;
    if (std::is_same_v<T, float> && isa() == Isa::avx512) {
        std::size_t bytes = 0;
        for (const LayerStep<T>& L : layers) {
            const std::size_t arrays = 3 + (L.buf ? 2 : 0) + (L.pruned ? 1 : 0);
            bytes += L.n * sizeof(T) * arrays + (L.mask.data ? (L.mask.packed ? (L.n + 7) / 8 : L.n) : 0);
        }
        trial = step::plan_loop(bytes, nt);
    }
    const Isa loop = trial.narrow ? Isa::avx2 : isa();
    const bool stream = step_stores() == StepStores::stream;
    const auto t0 = std::chrono::steady_clock::now();
    parallel_for(nt, n_pieces, [&](long long c) {
        const Piece& pc = pieces[static_cast<std::size_t>(c)];
        const BoundLayer<T>& s = bound[pc.layer];
        part[static_cast<std::size_t>(c)] = s.block(s, pc.begin, pc.size, loop, stream);
    });
    if (trial.timed)
        step::report_loop(trial, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    std::vector<double> norms(layers.size(), 0.0);
    for (std::size_t c = 0; c < pieces.size(); ++c) norms[pieces[c].layer] += part[c];
    for (std::size_t l = 0; l < layers.size(); ++l)
        norms[l] = bound[l].finish(bound[l], norms[l], threads_for(n_threads, layers[l].n));
    return norms;
}

template <class T>
double masked_ef_step(T* w, const T* g, MaskRef mask, T* buf, T* pruned, std::size_t n, const EFStepParams& params,
                      double norm, int n_threads) {
    const std::vector<LayerStep<T>> one{{w, g, mask, buf, pruned, n, norm}};
    return masked_ef_step_many(one, params, n_threads)[0];
}

template <class T>
double masked_norm(const T* w, MaskRef mask, std::size_t n, int p, int n_threads) {
    if (p != 1 && p != 2) throw std::invalid_argument("p must be 1 or 2");
    const int nt = threads_for(n_threads, n);
    const std::uint8_t* m = mask.data;
    if (!m) return p == 1 ? norm_impl<T, Layout::none, 1>(w, m, n, nt) : norm_impl<T, Layout::none, 2>(w, m, n, nt);
    if (mask.packed)
        return p == 1 ? norm_impl<T, Layout::bits, 1>(w, m, n, nt) : norm_impl<T, Layout::bits, 2>(w, m, n, nt);
    return p == 1 ? norm_impl<T, Layout::bytes, 1>(w, m, n, nt) : norm_impl<T, Layout::bytes, 2>(w, m, n, nt);
}

template std::vector<double> masked_ef_step_many(const std::vector<LayerStep<float>>&, const EFStepParams&, int);
template std::vector<double> masked_ef_step_many(const std::vector<LayerStep<double>>&, const EFStepParams&, int);
template double masked_ef_step(float*, const float*, MaskRef, float*, float*, std::size_t, const EFStepParams&, double,
                               int);
template double masked_ef_step(double*, const double*, MaskRef, double*, double*, std::size_t, const EFStepParams&,
                               double, int);
template double masked_norm(const float*, MaskRef, std::size_t, int, int);
template double masked_norm(const double*, MaskRef, std::size_t, int, int);

}  // namespace feddip
