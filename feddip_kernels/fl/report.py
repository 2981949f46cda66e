"""The plot of a simulation: accuracy against bytes (the trade-off), and accuracy, bytes and
sparsity against rounds, one colour per algorithm, the same in every run."""

from __future__ import annotations

from typing import Mapping, Sequence

# Fixed per algorithm, so that a colour means the same thing from one run to the next; the line
# styles and markers keep curves that lie on one another (FedDIP, FedDP) both visible.
STYLES = {
    "feddip": dict(color="#d62728", linestyle="-", marker="o", zorder=4),
    "feddp": dict(color="#1f77b4", linestyle="--", marker="s", zorder=3),
    "feddip-noef": dict(color="#9467bd", linestyle=":", marker="^", zorder=3),
    "fedavg": dict(color="#2ca02c", linestyle="-", marker="D", zorder=2),
}
_OTHER = dict(color="#7f7f7f", linestyle="-.", marker="x", zorder=1)


def _bytes_key(row: Mapping) -> str:
    return "bytes_cumulative" if "bytes_cumulative" in row else "bytes_total"


def plot_histories(histories: Mapping[str, Sequence[dict]], path: str, title: str = "") -> None:
    """Write a PNG of four panels: test accuracy against cumulative MB sent (log scale), accuracy,
    cumulative MB and the global model's sparsity against rounds (pruning rounds marked). The
    legend gives each algorithm's final accuracy and MB."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    (ax_trade, ax_acc), (ax_bytes, ax_sparse) = axes
    longest = max((len(rows) for rows in histories.values()), default=1)
    every = max(1, longest // 12)  # markers a dozen along a curve, not one a round
    pruned_at: set[int] = set()
    for name, rows in histories.items():
        if not rows:
            continue
        style = dict(STYLES.get(name, _OTHER), markevery=every, markersize=4, linewidth=1.6)
        rounds = [r["round"] for r in rows]
        acc = [100 * r["accuracy"] for r in rows]
        mb = [r[_bytes_key(r)] / 1e6 for r in rows]
        last = rows[-1]
        label = f"{name}: {acc[-1]:.2f}%, {mb[-1]:.2f} MB, sparsity {last['sparsity']:.2f}"
        ax_trade.plot(mb, acc, label=label, **style)
        ax_acc.plot(rounds, acc, label=name, **style)
        ax_bytes.plot(rounds, mb, label=name, **style)
        ax_sparse.plot(rounds, [r["sparsity"] for r in rows], label=name, **style)
        pruned_at.update(r["round"] for r in rows if r.get("sparsity_target") is not None)
    for r in sorted(pruned_at):
        for ax in (ax_acc, ax_sparse):
            ax.axvline(r, color="#bbbbbb", linewidth=0.6, zorder=0)
    ax_trade.set(xlabel="cumulative MB sent (up + down, log scale)", ylabel="test accuracy (%)",
                 title="accuracy against bytes sent", xscale="log")
    ax_trade.legend(title="final accuracy, bytes, sparsity", fontsize=8, title_fontsize=8, loc="lower right")
    ax_acc.set(xlabel="round", ylabel="test accuracy (%)",
               title="accuracy" + (" (grey: rounds that prune)" if pruned_at else ""))
    ax_bytes.set(xlabel="round", ylabel="cumulative MB (up + down)", title="bytes sent", yscale="log")
    ax_sparse.set(xlabel="round", ylabel="sparsity of the pruned tensors", title="sparsity of the global model",
                  ylim=(-0.02, 1.02))
    for ax in (ax_acc, ax_bytes, ax_sparse):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
