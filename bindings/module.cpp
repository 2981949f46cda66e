// Thin pybind11 bindings over the C++ core. Validation of Python-level arguments happens in
// feddip_kernels; here we only check what the C++ core needs to stay memory safe. The functions
// and their signatures are the kernel contract (feddip_kernels/_contract.py), which the Numba
// module and the NumPy reference meet too; _core.pyi states it for type checkers.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "ans.hpp"
#include "bitpack.hpp"
#include "common.hpp"
#include "crc32c.hpp"
#include "ef_step.hpp"
#include "golomb.hpp"
#include "isa.hpp"
#include "sparse.hpp"
#include "topk.hpp"

namespace py = pybind11;
using namespace feddip;

namespace {

// f(T{}) with T the element type of a float array: double for float64, else float (data_of then
// checks that it is float32). The one place where a kernel picks its precision.
template <class F>
decltype(auto) with_float_type(const py::array& a, F&& f) {
    if (py::isinstance<py::array_t<double>>(a)) return f(double{});
    return f(float{});
}

template <class F>
decltype(auto) with_float_type(const std::vector<py::array>& tensors, F&& f) {
    if (!tensors.empty() && py::isinstance<py::array_t<double>>(tensors[0])) return f(double{});
    return f(float{});
}

template <class T>
const T* data_of(const py::array& a, const char* what) {
    if (!py::isinstance<py::array_t<T>>(a) || !(a.flags() & py::array::c_style))
        throw std::invalid_argument(std::string(what) + ": expected a C-contiguous array of " +
                                    (sizeof(T) == 4 ? "float32" : "float64"));
    if (a.size() > 0 && reinterpret_cast<std::uintptr_t>(a.data()) % alignof(T) != 0)
        throw std::invalid_argument(std::string(what) + ": array is not aligned for its dtype");
    return static_cast<const T*>(a.data());
}

template <class T>
T* mutable_data_of(py::array& a, const char* what) {
    data_of<T>(a, what);
    if (!a.writeable()) throw std::invalid_argument(std::string(what) + ": array is read-only");
    return static_cast<T*>(a.mutable_data());
}

std::uint8_t* mask_data(py::array& a, const char* what) {
    if (a.itemsize() != 1 || !(a.flags() & py::array::c_style) || !a.writeable())
        throw std::invalid_argument(std::string(what) + ": expected a writeable C-contiguous bool array");
    return static_cast<std::uint8_t*>(a.mutable_data());
}

template <class T>
std::vector<Segment<T>> segments_of(const std::vector<py::array>& tensors) {
    std::vector<Segment<T>> segs;
    segs.reserve(tensors.size());
    for (const auto& t : tensors) segs.push_back({data_of<T>(t, "tensor"), static_cast<std::size_t>(t.size())});
    return segs;
}

template <class T>
double threshold_impl(const std::vector<py::array>& tensors, std::uint64_t k, int n_threads) {
    const auto segs = segments_of<T>(tensors);
    py::gil_scoped_release release;
    return static_cast<double>(global_magnitude_threshold(segs, k, n_threads).value);
}

template <class T>
void masks_impl(const std::vector<py::array>& tensors, std::vector<py::array>& masks, std::uint64_t k, int n_threads) {
    const auto segs = segments_of<T>(tensors);
    if (masks.size() != segs.size()) throw std::invalid_argument("need one mask per tensor");
    std::vector<std::uint8_t*> outs;
    for (std::size_t i = 0; i < masks.size(); ++i) {
        if (static_cast<std::size_t>(masks[i].size()) != segs[i].size)
            throw std::invalid_argument("mask " + std::to_string(i) + " has the wrong size");
        outs.push_back(mask_data(masks[i], "mask"));
    }
    py::gil_scoped_release release;
    global_topk_masks(segs, outs, k, n_threads);
}

const std::uint8_t* optional_mask(const py::object& mask, std::size_t n) {
    if (mask.is_none()) return nullptr;
    if (!py::isinstance<py::array>(mask)) throw std::invalid_argument("mask: expected a NumPy array");
    auto a = mask.cast<py::array>();
    if (a.itemsize() != 1 || !(a.flags() & py::array::c_style))
        throw std::invalid_argument("mask: expected a C-contiguous bool array");
    if (static_cast<std::size_t>(a.size()) != n) throw std::invalid_argument("mask: size differs from w");
    return static_cast<const std::uint8_t*>(a.data());
}

// A layer's mask from Python: None (all kept), a bool array of n elements, or (packed) (n + 7) / 8
// bytes of bits.
MaskRef mask_ref(const py::object& mask, std::size_t n, bool packed) {
    if (!packed || mask.is_none()) return {optional_mask(mask, n), false};
    auto a = mask.cast<py::array>();
    if (a.itemsize() != 1 || !(a.flags() & py::array::c_style))
        throw std::invalid_argument("mask_bits: expected a C-contiguous uint8 array");
    if (static_cast<std::size_t>(a.size()) != (n + 7) / 8)
        throw std::invalid_argument("mask_bits: expected (n + 7) / 8 bytes for n elements");
    return {static_cast<const std::uint8_t*>(a.data()), true};
}

template <class T>
T* optional_out(const py::object& obj, std::size_t n, const char* what) {
    if (obj.is_none()) return nullptr;
    if (!py::isinstance<py::array>(obj)) throw std::invalid_argument(std::string(what) + ": expected a NumPy array");
    auto a = obj.cast<py::array>();
    T* p = mutable_data_of<T>(a, what);
    if (static_cast<std::size_t>(a.size()) != n)
        throw std::invalid_argument(std::string(what) + ": size differs from w");
    return p;
}

// One layer of a step from Python, checked as the C++ core needs it: sizes agree, the arrays
// written are writeable, every array is C-contiguous and aligned.
template <class T>
LayerStep<T> layer_of(py::array& w, const py::array& g, const py::object& mask, bool packed, const py::object& buf,
                      const py::object& pruned, double norm) {
    const std::size_t n = static_cast<std::size_t>(w.size());
    T* pw = mutable_data_of<T>(w, "w");
    const T* pg = data_of<T>(g, "g");
    if (static_cast<std::size_t>(g.size()) != n) throw std::invalid_argument("g: size differs from w");
    const MaskRef m = mask_ref(mask, n, packed);  // checked in this order: the first bad argument is reported
    T* pb = optional_out<T>(buf, n, "momentum_buffer");
    T* pp = optional_out<T>(pruned, n, "pruned_out");
    return {pw, pg, m, pb, pp, n, norm};
}

template <class T>
double ef_step_impl(py::array& w, const py::array& g, const py::object& mask, bool packed, const py::object& buf,
                    const py::object& pruned, const EFStepParams& prm, double norm, int n_threads) {
    const LayerStep<T> L = layer_of<T>(w, g, mask, packed, buf, pruned, norm);
    py::gil_scoped_release release;
    return masked_ef_step(L.w, L.g, L.mask, L.buf, L.pruned, L.n, prm, L.norm, n_threads);
}

// The layers of masked_ef_step_many, of either float type (each layer's arrays of one): each
// checked as one layer is, and no two arrays of any layers overlapping (the threads would race on
// the shared bytes), all before any layer is stepped. float32 and float64 layers step in one
// parallel pass each; the norms come back in the layers' order.
std::vector<double> ef_step_many_impl(std::vector<py::array>& ws, const std::vector<py::array>& gs,
                                      const std::vector<py::object>& masks, bool packed,
                                      const std::vector<py::object>& bufs, const std::vector<py::object>& pruned,
                                      const std::vector<std::optional<double>>& norms, const EFStepParams& prm,
                                      int n_threads) {
    const std::size_t n_layers = ws.size();
    if (gs.size() != n_layers || masks.size() != n_layers || bufs.size() != n_layers || pruned.size() != n_layers ||
        norms.size() != n_layers)
        throw std::invalid_argument("ws, gs, masks, momentum_buffers, pruned_outs and norms need one entry per layer");
    std::vector<LayerStep<float>> f32;
    std::vector<LayerStep<double>> f64;
    std::vector<std::size_t> f32_at, f64_at;  // each group's layers' places in the call
    std::vector<std::pair<std::uintptr_t, std::uintptr_t>> spans;
    const auto span = [&](const void* p, std::size_t bytes) {
        if (p && bytes)
            spans.emplace_back(reinterpret_cast<std::uintptr_t>(p), reinterpret_cast<std::uintptr_t>(p) + bytes);
    };
    const auto add = [&](auto& layers, auto& at, std::size_t l) {
        using T = std::remove_pointer_t<decltype(layers[0].w)>;
        const LayerStep<T> L =
            layer_of<T>(ws[l], gs[l], masks[l], packed, bufs[l], pruned[l], norms[l] ? *norms[l] : -1.0);
        layers.push_back(L);
        at.push_back(l);
        span(L.w, L.n * sizeof(T));
        span(L.g, L.n * sizeof(T));
        span(L.mask.data, L.mask.packed ? (L.n + 7) / 8 : L.n);
        span(L.buf, L.n * sizeof(T));
        span(L.pruned, L.n * sizeof(T));
    };
    for (std::size_t l = 0; l < n_layers; ++l) {
        if (py::isinstance<py::array_t<double>>(ws[l]))
            add(f64, f64_at, l);
        else
            add(f32, f32_at, l);
    }
    std::sort(spans.begin(), spans.end());
    for (std::size_t i = 1; i < spans.size(); ++i)  // sorted by start: an overlap shows between neighbours
        if (spans[i].first < spans[i - 1].second)
            throw std::invalid_argument("arrays of the layers share memory; pass separate arrays");
    std::vector<double> out(n_layers);
    py::gil_scoped_release release;
    if (!f32.empty()) {
        const std::vector<double> got = masked_ef_step_many(f32, prm, n_threads);
        for (std::size_t i = 0; i < got.size(); ++i) out[f32_at[i]] = got[i];
    }
    if (!f64.empty()) {
        const std::vector<double> got = masked_ef_step_many(f64, prm, n_threads);
        for (std::size_t i = 0; i < got.size(); ++i) out[f64_at[i]] = got[i];
    }
    return out;
}

using Bits = py::array_t<std::uint8_t, py::array::c_style>;

// The bytes of a buffer-protocol object, which must be C-contiguous: a strided view (reversed,
// sliced with a step) has its elements elsewhere than ptr .. ptr + size.
struct ByteSpan {
    const std::uint8_t* data;
    std::size_t size;
};

ByteSpan contiguous_bytes(const py::buffer_info& info, const char* what) {
    py::ssize_t stride = info.itemsize;
    for (py::ssize_t d = info.ndim - 1; d >= 0; --d) {
        if (info.shape[d] > 1 && info.strides[d] != stride)
            throw std::invalid_argument(std::string(what) + ": expected a C-contiguous buffer");
        stride *= info.shape[d];
    }
    return {static_cast<const std::uint8_t*>(info.ptr), static_cast<std::size_t>(info.size * info.itemsize)};
}

void check_bits(const Bits& bits, std::size_t n) {
    if (static_cast<std::size_t>(bits.size()) < (n + 7) / 8)
        throw std::invalid_argument("packed positions hold " + std::to_string(bits.size()) + " bytes, " +
                                    std::to_string((n + 7) / 8) + " needed");
}

template <class T>
py::tuple sparsify_impl(const py::array& x, const py::object& mask, bool negative_zeros) {
    const std::size_t n = static_cast<std::size_t>(x.size());
    const T* px = data_of<T>(x, "x");
    const std::uint8_t* pm = optional_mask(mask, n);
    Bits bits((n + 7) / 8);
    std::uint8_t* pb = bits.mutable_data();
    std::uint64_t nnz;
    bool some_negative = pm != nullptr;  // without a mask, found while packing the positions
    {
        py::gil_scoped_release release;
        pack_positions(px, pm, n, pb, negative_zeros ? &some_negative : nullptr);
        nnz = count_bits(pb, n);
    }
    py::array_t<T> values(static_cast<py::ssize_t>(nnz));
    T* pv = values.mutable_data();
    {
        py::gil_scoped_release release;
        gather(px, pb, n, pv);
    }
    if (!negative_zeros) return py::make_tuple(bits, values);
    py::object negative = py::none();
    if (some_negative) {  // a second pass only where there are some (or, with a mask, may be)
        Bits nb((n + 7) / 8);
        bool any;
        {
            py::gil_scoped_release release;
            any = pack_negative_zeros(px, n, nb.mutable_data());
        }
        if (any) negative = nb;
    }
    return py::make_tuple(bits, values, negative);
}

template <class T>
py::array densify_impl(const Bits& bits, std::size_t n, const py::array& values, const py::object& out) {
    check_bits(bits, n);
    const T* pv = data_of<T>(values, "values");
    if (count_bits(bits.data(), n) != static_cast<std::uint64_t>(values.size()))
        throw std::invalid_argument("number of values differs from the number of positions");
    py::array result = out.is_none() ? py::array(py::array_t<T>(static_cast<py::ssize_t>(n))) : out.cast<py::array>();
    T* po = optional_out<T>(result, n, "out");
    const std::uint8_t* pb = bits.data();
    py::gil_scoped_release release;
    scatter(pb, n, pv, po);
    return result;
}

// Entropy-coded values: words are C-contiguous unsigned integer arrays; a model is the tuple
// (word_bits, shift, base, freqs, prob_bits, lanes) of _contract.AnsModel, its freqs a uint32 array
// (kept alive by the tuple while the GIL is released).
using Model = std::tuple<unsigned, unsigned, std::uint64_t, py::array, unsigned, unsigned>;

unsigned word_bytes(const py::array& words) {
    if (words.dtype().kind() != 'u' || !(words.flags() & py::array::c_style))
        throw std::invalid_argument("words: expected a C-contiguous unsigned integer array");
    if (words.size() > 0 && reinterpret_cast<std::uintptr_t>(words.data()) % words.itemsize() != 0)
        throw std::invalid_argument("words: array is not aligned for its dtype");
    return static_cast<unsigned>(words.itemsize());
}

unsigned bytes_for(unsigned word_bits) { return word_bits <= 8 ? 1 : word_bits <= 16 ? 2 : word_bits <= 32 ? 4 : 8; }

AnsModel model_of(const Model& t) {
    const auto& [word_bits, shift, base, freqs, prob_bits, lanes] = t;
    if (freqs.dtype().kind() != 'u' || freqs.itemsize() != 4 || !(freqs.flags() & py::array::c_style))
        throw std::invalid_argument("freqs: expected a C-contiguous uint32 array");
    return {word_bits, shift, base, static_cast<const std::uint32_t*>(freqs.data()),
            static_cast<std::size_t>(freqs.size()), prob_bits, lanes};
}

py::array new_words(unsigned elem_bytes, std::size_t n) {
    switch (elem_bytes) {
        case 1: return py::array_t<std::uint8_t>(static_cast<py::ssize_t>(n));
        case 2: return py::array_t<std::uint16_t>(static_cast<py::ssize_t>(n));
        case 4: return py::array_t<std::uint32_t>(static_cast<py::ssize_t>(n));
        default: return py::array_t<std::uint64_t>(static_cast<py::ssize_t>(n));
    }
}

py::bytes bytes_of(const std::vector<std::uint8_t>& v) {
    return py::bytes(reinterpret_cast<const char*>(v.data()), v.size());
}

}  // namespace

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "feddip-kernels' codecs assume a little-endian host"
#endif

PYBIND11_MODULE(_core, m) {
    m.doc() = "feddip-kernels native core";
#ifdef _OPENMP
    m.attr("openmp") = true;
#else
    m.attr("openmp") = false;
#endif

    m.def(
        "set_num_threads", [](int n) { default_threads().store(n > 0 ? n : 0); }, py::arg("n"),
        "Threads of every parallel kernel from now on (0: OpenMP's default).");
    m.def("get_num_threads", []() { return max_threads(0); }, "Threads a parallel kernel uses now.");

    m.def(
        "magnitude_threshold",
        [](const std::vector<py::array>& tensors, std::uint64_t k, int n_threads) {
            return with_float_type(tensors, [&](auto t) { return threshold_impl<decltype(t)>(tensors, k, n_threads); });
        },
        py::arg("tensors"), py::arg("k"), py::kw_only(), py::arg("n_threads") = 0,
        "The k-th largest |x| over a list of same-dtype arrays (+inf for k = 0).");

    m.def(
        "_isa",
        [](std::optional<std::string> limit) {
            static const char* const names[] = {"generic", "avx2", "avx512"};
            if (limit) {
                int i = 0;
                while (i < 3 && *limit != names[i]) ++i;
                if (i == 3) throw std::invalid_argument("ISA must be generic, avx2 or avx512, got " + *limit);
                limit_isa(static_cast<Isa>(i));
            }
            return std::string(names[static_cast<int>(isa())]);
        },
        py::arg("limit") = py::none(),
        "The vector code of the hand-vectorised loops: 'avx512', 'avx2' or 'generic' (top-k's pass and the "
        "float32 error-feedback step have all three; the float64 step, sparsify's packing of positions and "
        "densify's float32 scatter AVX2 and generic; CRC-32C takes SSE4.2's crc32 instruction above generic). "
        "`limit` caps it (tests run every path on a wide machine).");

    m.def(
        "_step_stores",
        [](std::optional<std::string> stores) {
            static const char* const names[] = {"stream", "cache"};
            if (!stores) return std::string(names[static_cast<int>(step_stores())]);
            int i = 0;
            while (i < 2 && *stores != names[i]) ++i;
            if (i == 2) throw std::invalid_argument("step stores must be stream or cache, got " + *stores);
            return std::string(names[static_cast<int>(set_step_stores(static_cast<StepStores>(i)))]);
        },
        py::arg("stores") = py::none(),
        "How the error-feedback step writes pruned copies: 'stream' (non-temporal stores, the default) or "
        "'cache'. The same bits either way. Returns the setting before (the one in use, without an argument).");

    m.def(
        "_step_tuning", [](std::optional<bool> on) { return on ? set_step_tuning(*on) : step_tuning(); },
        py::arg("on") = py::none(),
        "Whether a float32 step on an AVX-512 CPU times its AVX-512 and AVX2 loops on its first calls of each "
        "size and thread count and keeps the faster (the default), or runs the widest loop _isa allows. The "
        "same bits either way. Returns the setting before (the one in use, without an argument).");

    m.def(
        "_step_tuning_choices",
        [](bool forget) {
            py::list out;
            for (const StepTuningChoice& c : step_tuning_choices())
                out.append(py::make_tuple(c.size_class, c.threads, c.chosen, c.avx512_s, c.avx2_s));
            if (forget) forget_step_tuning();
            return out;
        },
        py::arg("forget") = false,
        "What the loop timing has learnt: (log2 of a step's bytes, threads, 'avx512', 'avx2' or 'open' while "
        "timing, fastest AVX-512 call in s, fastest AVX2 call in s) for each size and thread count seen. "
        "forget: then start afresh.");

    m.def(
        "_contention",
        [](std::optional<bool> adapt) {
            Contention& c = contention();
            if (adapt) c.enabled.store(*adapt, std::memory_order_relaxed);
            const std::int64_t last = c.last_late.load(std::memory_order_relaxed);
            return py::make_tuple(c.enabled.load(std::memory_order_relaxed), c.serial(),
                                  c.late_regions.load(std::memory_order_relaxed),
                                  last ? (steady_ns() - last) * 1e-9 : -1.0, c.regions.load(std::memory_order_relaxed));
        },
        py::arg("adapt") = py::none(),
        "(adapting, on one thread now, late regions so far, seconds since the last or -1, regions timed so far): "
        "with the default "
        "thread count, parallel regions "
        "whose threads start over 1 ms late (another process on the cores) put the kernels on one thread for "
        "0.1 s, doubling up to 2 s while they stay late. `adapt` turns that on or off.");

    m.def(
        "_probe_contention",
        []() {
            py::gil_scoped_release release;
            return static_cast<double>(probe_contention()) * 1e-9;
        },
        "Time an empty parallel region's start on OpenMP's default thread count, as every region's is "
        "(_contention counts it); seconds.");

    m.def("_sample_fallbacks", &sample_fallbacks,
          "How many top-k selections so far fell back from the one-pass fast path to radix passes.");

    m.def(
        "max_magnitude",
        [](const std::vector<py::array>& tensors, int n_threads) {
            return with_float_type(tensors, [&](auto t) {
                const auto segs = segments_of<decltype(t)>(tensors);
                py::gil_scoped_release release;
                return static_cast<double>(max_magnitude(segs, n_threads));
            });
        },
        py::arg("tensors"), py::kw_only(), py::arg("n_threads") = 0,
        "The largest |x| over a list of same-dtype arrays (0.0 for no elements), in one streaming read.");

    m.def(
        "topk_masks",
        [](const std::vector<py::array>& tensors, std::vector<py::array> masks, std::uint64_t k, int n_threads) {
            with_float_type(tensors, [&](auto t) { masks_impl<decltype(t)>(tensors, masks, k, n_threads); });
        },
        py::arg("tensors"), py::arg("masks"), py::arg("k"), py::kw_only(), py::arg("n_threads") = 0,
        "Fill bool masks (one per tensor, same sizes) with the global top-k by |x|.");

    m.def(
        "masked_ef_step",
        [](py::array w, const py::array& g, const py::object& mask, const py::object& buf, const py::object& pruned,
           double lr, double weight_decay, double lam, double momentum, int p, std::optional<double> norm,
           bool mask_packed, int n_threads) {
            const EFStepParams prm{lr, weight_decay, lam, momentum, p};
            const double prev = norm ? *norm : -1.0;  // the core's "not known": compute it
            return with_float_type(w, [&](auto t) {
                return ef_step_impl<decltype(t)>(w, g, mask, mask_packed, buf, pruned, prm, prev, n_threads);
            });
        },
        py::arg("w"), py::arg("g"), py::arg("mask"), py::kw_only(), py::arg("momentum_buffer"), py::arg("pruned_out"),
        py::arg("lr"), py::arg("weight_decay"), py::arg("lam"), py::arg("momentum"), py::arg("p"), py::arg("norm"),
        py::arg("mask_packed") = false, py::arg("n_threads") = 0,
        "Fused masked error-feedback SGD step in place; returns ||w*m||_p after the step.");

    m.def(
        "masked_ef_step_many",
        [](std::vector<py::array> ws, const std::vector<py::array>& gs, const std::vector<py::object>& masks,
           const std::vector<py::object>& bufs, const std::vector<py::object>& pruned, double lr, double weight_decay,
           double lam, double momentum, int p, const std::vector<std::optional<double>>& norms, bool mask_packed,
           int n_threads) {
            const EFStepParams prm{lr, weight_decay, lam, momentum, p};
            return ef_step_many_impl(ws, gs, masks, mask_packed, bufs, pruned, norms, prm, n_threads);
        },
        py::arg("ws"), py::arg("gs"), py::arg("masks"), py::kw_only(), py::arg("momentum_buffers"),
        py::arg("pruned_outs"), py::arg("lr"), py::arg("weight_decay"), py::arg("lam"), py::arg("momentum"),
        py::arg("p"), py::arg("norms"), py::arg("mask_packed") = false, py::arg("n_threads") = 0,
        "masked_ef_step on every layer in one parallel pass; returns each layer's ||w*m||_p after the step.");

    m.def(
        "masked_norm",
        [](const py::array& w, const py::object& mask, int p, bool mask_packed, int n_threads) {
            const MaskRef pm = mask_ref(mask, static_cast<std::size_t>(w.size()), mask_packed);
            return with_float_type(w, [&](auto t) {
                const auto* pw = data_of<decltype(t)>(w, "w");
                py::gil_scoped_release release;
                return masked_norm(pw, pm, static_cast<std::size_t>(w.size()), p, n_threads);
            });
        },
        py::arg("w"), py::arg("mask"), py::kw_only(), py::arg("p"), py::arg("mask_packed") = false,
        py::arg("n_threads") = 0, "||w*m||_p accumulated in double.");

    m.def(
        "sparsify",
        [](const py::array& x, const py::object& mask, bool negative_zeros) {
            return with_float_type(x, [&](auto t) { return sparsify_impl<decltype(t)>(x, mask, negative_zeros); });
        },
        py::arg("x"), py::arg("mask"), py::kw_only(), py::arg("negative_zeros") = false,
        "(packed positions, values): positions = mask, or x != 0 without a mask; with negative_zeros, "
        "also the packed positions of x's -0.0 elements, or None when it has none.");

    m.def(
        "densify",
        [](const Bits& bits, std::size_t n, const py::array& values, const py::object& out) {
            return with_float_type(values, [&](auto t) { return densify_impl<decltype(t)>(bits, n, values, out); });
        },
        py::arg("bits"), py::arg("n"), py::arg("values"), py::arg("out") = py::none(),
        "Dense array with the values at the set positions, zeros elsewhere; into `out` when given.");

    m.def("golomb_parameter", &golomb_parameter, py::arg("nnz"), py::arg("n"),
          "Golomb parameter for positions of density nnz / n (docs/wire-format.md).");

    m.def(
        "golomb_encode",
        [](const Bits& bits, std::size_t n, std::uint32_t m) {
            check_bits(bits, n);
            std::vector<std::uint8_t> out;
            {
                py::gil_scoped_release release;
                out = golomb_encode(bits.data(), n, m);
            }
            return py::bytes(reinterpret_cast<const char*>(out.data()), out.size());
        },
        py::arg("bits"), py::arg("n"), py::arg("m"));

    m.def(
        "golomb_decode",
        [](const py::buffer& data, std::size_t n, std::uint64_t nnz, std::uint32_t m) {
            const py::buffer_info info = data.request();
            const ByteSpan src = contiguous_bytes(info, "data");
            Bits bits((n + 7) / 8);
            std::uint8_t* pb = bits.mutable_data();
            py::gil_scoped_release release;
            golomb_decode(src.data, src.size, n, nnz, m, pb);
            return bits;
        },
        py::arg("data"), py::arg("n"), py::arg("nnz"), py::arg("m"),
        "Decode nnz Golomb-coded positions; the caller bounds n before calling (allocates n / 8 bytes).");

    m.def(
        "golomb_encode_many",
        [](const std::vector<std::tuple<Bits, std::size_t, std::uint32_t>>& items) {
            std::vector<GolombInput> inputs;
            for (const auto& [bits, n, m] : items) {
                check_bits(bits, n);
                inputs.push_back({bits.data(), n, m});
            }
            std::vector<std::vector<std::uint8_t>> streams;
            {
                py::gil_scoped_release release;
                streams = golomb_encode_many(inputs, 0);
            }
            py::list out;
            for (const auto& s : streams) out.append(py::bytes(reinterpret_cast<const char*>(s.data()), s.size()));
            return out;
        },
        py::arg("items"), "golomb_encode on (bits, n, m) items, in parallel: a list of bytes.");

    m.def(
        "golomb_decode_many",
        [](const std::vector<std::tuple<py::buffer, std::size_t, std::uint64_t, std::uint32_t>>& items) {
            std::vector<py::buffer_info> infos;
            std::vector<GolombStream> streams;
            py::list out;
            for (const auto& [data, n, nnz, m] : items) {
                infos.push_back(data.request());
                const ByteSpan src = contiguous_bytes(infos.back(), "data");
                Bits bits((n + 7) / 8);
                streams.push_back({src.data, src.size, n, nnz, m, bits.mutable_data()});
                out.append(bits);
            }
            std::string error;
            long long failed;
            {
                py::gil_scoped_release release;
                failed = golomb_decode_many(streams, 0, error);
            }
            return py::make_tuple(out, failed, error);
        },
        py::arg("items"),
        "golomb_decode on (data, n, nnz, m) items in parallel: (bits list, index of the first failure or -1, its "
        "message).");

    m.def(
        "ans_histogram",
        [](const py::array& words, unsigned word_bits, std::size_t max_symbols) {
            const unsigned eb = word_bytes(words);
            unsigned shift;
            std::uint64_t base;
            std::vector<std::uint64_t> counts;
            {
                py::gil_scoped_release release;
                ans_histogram(words.data(), static_cast<std::size_t>(words.size()), eb, word_bits, max_symbols, shift,
                              base, counts);
            }
            py::array_t<std::uint64_t> c(static_cast<py::ssize_t>(counts.size()));
            std::copy(counts.begin(), counts.end(), c.mutable_data());
            return py::make_tuple(shift, base, c);
        },
        py::arg("words"), py::kw_only(), py::arg("word_bits"), py::arg("max_symbols"),
        "(shift, base, counts) of the words' magnitudes, at most max_symbols symbols.");

    m.def(
        "ans_encode",
        [](const py::array& words, unsigned word_bits, unsigned shift, std::uint64_t base, const py::array& freqs,
           unsigned prob_bits, unsigned lanes) {
            const unsigned eb = word_bytes(words);
            const AnsModel model = model_of({word_bits, shift, base, freqs, prob_bits, lanes});
            if (word_bits > 8 * eb) throw std::invalid_argument("words: narrower than word_bits");
            AnsCoded coded;
            {
                py::gil_scoped_release release;
                coded = ans_encode(words.data(), static_cast<std::size_t>(words.size()), eb, model);
            }
            return py::make_tuple(bytes_of(coded.stream), bytes_of(coded.raw));
        },
        py::arg("words"), py::kw_only(), py::arg("word_bits"), py::arg("shift"), py::arg("base"), py::arg("freqs"),
        py::arg("prob_bits"), py::arg("lanes"), "(rANS stream, raw bits) of the words under the model.");

    m.def(
        "ans_decode",
        [](const py::buffer& stream, const py::buffer& raw, std::size_t n, unsigned word_bits, unsigned shift,
           std::uint64_t base, const py::array& freqs, unsigned prob_bits, unsigned lanes) {
            const py::buffer_info si = stream.request(), ri = raw.request();
            const ByteSpan s = contiguous_bytes(si, "stream"), r = contiguous_bytes(ri, "raw");
            const AnsModel model = model_of({word_bits, shift, base, freqs, prob_bits, lanes});
            const unsigned eb = bytes_for(word_bits);
            py::array out = new_words(eb, n);
            void* po = out.mutable_data();
            py::gil_scoped_release release;
            ans_decode(s.data, s.size, r.data, r.size, n, eb, model, po);
            return out;
        },
        py::arg("stream"), py::arg("raw"), py::arg("n"), py::kw_only(), py::arg("word_bits"), py::arg("shift"),
        py::arg("base"), py::arg("freqs"), py::arg("prob_bits"), py::arg("lanes"),
        "The n words of an rANS stream and its raw bits; the caller bounds n before calling.");

    m.def(
        "ans_encode_many",
        [](const std::vector<std::tuple<py::array, Model>>& items) {
            std::vector<AnsInput> inputs;
            for (const auto& [words, model] : items) {
                const unsigned eb = word_bytes(words);
                if (std::get<0>(model) > 8 * eb) throw std::invalid_argument("words: narrower than word_bits");
                inputs.push_back({words.data(), static_cast<std::size_t>(words.size()), eb, model_of(model)});
            }
            std::vector<AnsCoded> coded;
            {
                py::gil_scoped_release release;
                coded = ans_encode_many(inputs, 0);
            }
            py::list out;
            for (const auto& c : coded) out.append(py::make_tuple(bytes_of(c.stream), bytes_of(c.raw)));
            return out;
        },
        py::arg("items"), "ans_encode on (words, model) items, in parallel: a list of (stream, raw).");

    m.def(
        "ans_decode_many",
        [](const std::vector<std::tuple<py::buffer, py::buffer, std::size_t, Model>>& items) {
            std::vector<py::buffer_info> infos;
            infos.reserve(2 * items.size());
            std::vector<AnsStream> streams;
            py::list out;
            for (const auto& [stream, raw, n, model] : items) {
                infos.push_back(stream.request());
                const ByteSpan s = contiguous_bytes(infos.back(), "stream");
                infos.push_back(raw.request());
                const ByteSpan r = contiguous_bytes(infos.back(), "raw");
                const unsigned eb = bytes_for(std::get<0>(model));
                py::array words = new_words(eb, n);
                streams.push_back({s.data, s.size, r.data, r.size, n, eb, model_of(model), words.mutable_data()});
                out.append(words);
            }
            std::string error;
            long long failed;
            {
                py::gil_scoped_release release;
                failed = ans_decode_many(streams, 0, error);
            }
            return py::make_tuple(out, failed, error);
        },
        py::arg("items"),
        "ans_decode on (stream, raw, n, model) items in parallel: (words list, index of the first failure or -1, "
        "its message).");

    m.def(
        "crc32c",
        [](const py::buffer& data, std::uint32_t crc) {
            const py::buffer_info info = data.request();
            const ByteSpan src = contiguous_bytes(info, "data");
            py::gil_scoped_release release;
            return crc32c(src.data, src.size, crc);
        },
        py::arg("data"), py::arg("crc") = 0);

    m.def(
        "join_crc32c",
        [](const std::vector<py::buffer>& parts) {
            std::vector<py::buffer_info> infos;  // holds the buffers' exports while they are read
            std::vector<ByteRun> runs;
            std::size_t total = 0;
            for (const py::buffer& part : parts) {
                infos.push_back(part.request());
                const ByteSpan span = contiguous_bytes(infos.back(), "part");
                runs.push_back({span.data, span.size});
                total += span.size;
            }
            // A new bytes object is filled before anyone else can see it, as CPython's own
            // constructors do; then it is immutable.
            PyObject* raw = PyBytes_FromStringAndSize(nullptr, static_cast<py::ssize_t>(total + 4));
            if (!raw) throw py::error_already_set();
            py::bytes out = py::reinterpret_steal<py::bytes>(raw);
            auto* dst = reinterpret_cast<std::uint8_t*>(PyBytes_AS_STRING(raw));
            std::uint32_t crc;
            {
                py::gil_scoped_release release;
                crc = copy_crc32c(runs, dst);
            }
            for (int i = 0; i < 4; ++i) dst[total + i] = static_cast<std::uint8_t>(crc >> (8 * i));
            return out;
        },
        py::arg("parts"), "The parts joined, then their CRC-32C (4 bytes, little-endian): one parallel pass.");

    m.def(
        "pack_bits",
        [](py::array mask) {
            if (mask.itemsize() != 1 || !(mask.flags() & py::array::c_style))
                throw std::invalid_argument("mask: expected a C-contiguous bool array");
            const auto n = static_cast<std::size_t>(mask.size());
            py::array_t<std::uint8_t> out((n + 7) / 8);
            const auto* src = static_cast<const std::uint8_t*>(mask.data());
            auto* dst = out.mutable_data();
            py::gil_scoped_release release;
            pack_bits(src, n, dst);
            return out;
        },
        py::arg("mask"));

    m.def(
        "unpack_bits",
        [](const py::array_t<std::uint8_t, py::array::c_style>& bits, std::size_t n) {
            if (static_cast<std::size_t>(bits.size()) < (n + 7) / 8)
                throw std::invalid_argument("packed mask holds " + std::to_string(bits.size()) + " bytes, " +
                                            std::to_string((n + 7) / 8) + " needed");
            py::array_t<bool> out(static_cast<py::ssize_t>(n));
            auto* dst = reinterpret_cast<std::uint8_t*>(out.mutable_data());
            const auto* src = bits.data();
            py::gil_scoped_release release;
            unpack_bits(src, n, dst);
            return out;
        },
        py::arg("bits"), py::arg("n"));

    m.def(
        "select_bits",
        [](const Bits& bits, const Bits& ref, std::size_t n) {
            check_bits(bits, n);
            check_bits(ref, n);
            const std::uint64_t d = count_bits(ref.data(), n);
            Bits out(static_cast<py::ssize_t>((d + 7) / 8));
            std::uint8_t* po = out.mutable_data();
            py::gil_scoped_release release;
            select_bits(bits.data(), ref.data(), n, po);
            return out;
        },
        py::arg("bits"), py::arg("ref"), py::arg("n"),
        "The bits of `bits` at ref's set positions, packed in order (a mask delta's positions).");

    m.def(
        "deposit_bits",
        [](const Bits& sub, const Bits& ref, std::size_t n) {
            check_bits(ref, n);
            const std::uint64_t d = count_bits(ref.data(), n);
            if (static_cast<std::uint64_t>(sub.size()) < (d + 7) / 8)
                throw std::invalid_argument("sub holds fewer bits than ref has set positions");
            Bits out(static_cast<py::ssize_t>((n + 7) / 8));
            std::uint8_t* po = out.mutable_data();
            py::gil_scoped_release release;
            deposit_bits(sub.data(), ref.data(), n, po);
            return out;
        },
        py::arg("sub"), py::arg("ref"), py::arg("n"), "Inverse of select_bits: sub's bits at ref's set positions.");

    m.def(
        "count_bits",
        [](const py::array_t<std::uint8_t, py::array::c_style>& bits, std::size_t n) {
            if (static_cast<std::size_t>(bits.size()) < (n + 7) / 8)
                throw std::invalid_argument("packed mask too short");
            return count_bits(bits.data(), n);
        },
        py::arg("bits"), py::arg("n"));
}
