// Which loop and which stores the error-feedback step uses (StepStores, StepTuning in ef_step.hpp).
#include <algorithm>
#include <atomic>
#include <limits>
#include <map>
#include <mutex>
#include <utility>
#include <vector>

#include "bits.hpp"
#include "ef_step_internal.hpp"

namespace feddip {
namespace {

using step::LoopTrial;

// How pruned copies are written (StepStores). Streaming (non-temporal) stores skip the
// read-for-ownership of the copy's lines and keep it from evicting w, g and the buffer; stores
// through the cache leave the copy in cache for the forward pass that reads it next. Not chosen by
// timing: a cached store's write-back to memory comes after the call, so timing calls would favour
// it wherever the step streams from memory.
std::atomic<int> g_step_stores{static_cast<int>(StepStores::stream)};
std::atomic<bool> g_step_tuning{true};

// Which loop runs a float32 step on an AVX-512 CPU (StepTuning). The AVX-512 loop runs half the
// instructions of the AVX2 one, which wins where the step is bound by them (its arrays in cache)
// and lost a little from memory on one Zen 4 core (benchmarks/RESULTS.md). Which
// holds depends on the machine, the model's size and the thread count, so the first calls of each
// size and thread count time both and the faster is kept. Both give the same bits.
class LoopTuner {
public:
    // Calls of each loop timed before choosing, after one untimed call (its page faults and cold
    // caches would count against whichever loop it ran).
    static constexpr int kTrials = 4;

    LoopTrial plan(std::size_t bytes, int threads) {
        if (!g_step_tuning.load(std::memory_order_relaxed)) return {};
        LoopTrial t;
        t.key = {bytes ? 63 - clz64(bytes) : 0, threads};  // floor(log2(bytes))
        std::lock_guard<std::mutex> lock(mu_);
        Entry& e = table_[t.key];
        if (e.chosen >= 0) {
            t.narrow = e.chosen == 1;
            return t;
        }
        const int call = e.calls++;
        t.narrow = call % 2 == 0 && call > 0;  // the first, untimed call runs the AVX-512 loop
        t.timed = call > 0;
        return t;
    }

    void report(const LoopTrial& t, double seconds) {
        std::lock_guard<std::mutex> lock(mu_);
        Entry& e = table_[t.key];
        const int loop = t.narrow ? 1 : 0;
        e.best[loop] = std::min(e.best[loop], seconds);
        ++e.timed[loop];
        if (e.chosen < 0 && e.timed[0] >= kTrials && e.timed[1] >= kTrials) e.chosen = e.best[1] < e.best[0] ? 1 : 0;
    }

    std::vector<StepTuningChoice> choices() {
        std::lock_guard<std::mutex> lock(mu_);
        std::vector<StepTuningChoice> out;
        for (const auto& [key, e] : table_) {
            const char* chosen = e.chosen < 0 ? "open" : e.chosen == 1 ? "avx2" : "avx512";
            out.push_back({key.first, key.second, chosen, e.best[0], e.best[1]});
        }
        return out;
    }

    void forget() {
        std::lock_guard<std::mutex> lock(mu_);
        table_.clear();
    }

private:
    struct Entry {
        int calls = 0, chosen = -1, timed[2] = {0, 0};  // chosen: 0 AVX-512, 1 AVX2
        double best[2] = {std::numeric_limits<double>::infinity(), std::numeric_limits<double>::infinity()};
    };
    std::mutex mu_;
    std::map<std::pair<int, int>, Entry> table_;
};

LoopTuner& loop_tuner() {
    static LoopTuner tuner;
    return tuner;
}

}  // namespace

LoopTrial step::plan_loop(std::size_t bytes, int threads) { return loop_tuner().plan(bytes, threads); }

void step::report_loop(const LoopTrial& trial, double seconds) { loop_tuner().report(trial, seconds); }

StepStores set_step_stores(StepStores stores) {
    return static_cast<StepStores>(g_step_stores.exchange(static_cast<int>(stores)));
}

StepStores step_stores() { return static_cast<StepStores>(g_step_stores.load()); }

bool set_step_tuning(bool on) { return g_step_tuning.exchange(on); }

bool step_tuning() { return g_step_tuning.load(); }

std::vector<StepTuningChoice> step_tuning_choices() { return loop_tuner().choices(); }

void forget_step_tuning() { loop_tuner().forget(); }

}  // namespace feddip
