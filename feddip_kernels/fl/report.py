"""Plots of simulation histories: accuracy and cumulative bytes against rounds."""

from __future__ import annotations

from typing import Mapping, Sequence


def plot_histories(histories: Mapping[str, Sequence[dict]], path: str, title: str = "") -> None:
    """Write a PNG with two panels (test accuracy, cumulative MB sent) for each algorithm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_bytes) = plt.subplots(1, 2, figsize=(11, 4))
    for name, rows in histories.items():
        rounds = [r["round"] for r in rows]
        ax_acc.plot(rounds, [100 * r["accuracy"] for r in rows], label=name)
        ax_bytes.plot(rounds, [r["bytes_total"] / 1e6 for r in rows], label=name)
    ax_acc.set(xlabel="round", ylabel="test accuracy (%)", title="accuracy")
    ax_bytes.set(xlabel="round", ylabel="cumulative MB (up + down)", title="bytes sent", yscale="log")
    for ax in (ax_acc, ax_bytes):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
