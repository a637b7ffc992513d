"""What `train` writes: `iterations.csv` (loss and training error every `log_every` steps),
`epochs.csv` (train / validation loss and error, img/s per epoch) and `curves.png`; for the
degradation demo, `compare.csv` and `compare.png` (the paper's plain-vs-residual figure)."""

from __future__ import annotations

import os

from tqdm import tqdm

from fused_resnet.table import pyplot, write_csv


def epoch_bar(loader, epoch: int, epochs: int, enabled: bool):
    return tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", disable=not enabled, leave=False,
                unit="it")


def write_logs(out: str, state: dict, title: str) -> None:
    """The two CSV logs and the loss / error curves of one run."""
    write_csv(os.path.join(out, "iterations.csv"), state["iterations"])
    write_csv(os.path.join(out, "epochs.csv"), state["epochs"])
    plt = pyplot()
    if plt is None or not (state["iterations"] or state["epochs"]):
        return  # (a run shorter than --log-every still draws its validation points)
    its = state["iterations"]
    fig, (ax_loss, ax_err) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot([r["iteration"] for r in its], [r["loss"] for r in its], label="train")
    ax_err.plot([r["iteration"] for r in its], [r["train_err"] for r in its], label="train")
    epochs = state["epochs"]
    ax_loss.plot([r["iteration"] for r in epochs], [r["val_loss"] for r in epochs], "o--",
                 label="validation")
    ax_err.plot([r["iteration"] for r in epochs], [r["val_err"] for r in epochs], "o--",
                label="validation")
    for ax, label in ((ax_loss, "loss"), (ax_err, "error (%)")):
        ax.set_xlabel("iteration")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curves.png"), dpi=110)
    plt.close(fig)


def write_comparison(out: str, runs: dict[tuple[str, int], dict]) -> None:
    """compare.csv (every run's iteration rows, tagged) and compare.png: one panel per family,
    training error (thin) and validation error (bold, per epoch) against iterations, one
    colour per depth - deeper plain nets train worse, deeper residual nets do not."""
    rows = [{"family": fam, "depth": depth, **r} for (fam, depth), run in runs.items()
            for r in run["iterations"]]
    write_csv(os.path.join(out, "compare.csv"), rows)
    plt = pyplot()
    if plt is None:
        return
    families = list(dict.fromkeys(f for f, _ in runs))
    fig, axes = plt.subplots(1, len(families), figsize=(6 * len(families), 4), sharey=True,
                             squeeze=False)
    for ax, fam in zip(axes[0], families):
        for i, ((f, depth), run) in enumerate(runs.items()):
            if f != fam:
                continue
            color = f"C{i % 10}"
            its = run["iterations"]
            ax.plot([r["iteration"] for r in its], [r["train_err"] for r in its], color=color,
                    linewidth=0.8, label=f"{fam}-{depth} train")
            eps = run["epochs"]
            ax.plot([r["iteration"] for r in eps], [r["val_err"] for r in eps], color=color,
                    linewidth=2.2, label=f"{fam}-{depth} validation")
        ax.set_title(fam)
        ax.set_xlabel("iteration")
        ax.set_ylabel("error (%)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "compare.png"), dpi=110)
    plt.close(fig)
