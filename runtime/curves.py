"""OUT/curves.png from OUT/metrics.jsonl (train.py draws it at each validation): training loss
per source (smoothed) with the hard, in-batch (and distillation) terms, validation loss (the
run's own and the recipe's, which compares across variants), learning rate. Importing this
file does nothing; matplotlib is imported when a figure is drawn.
"""
import json
import os


def smooth(xs: list[float], beta: float = 0.9) -> list[float]:
    """Exponential moving average, bias-corrected."""
    out, m = [], 0.0
    for i, x in enumerate(xs, start=1):
        m = beta * m + (1 - beta) * x
        out.append(m / (1 - beta ** i))
    return out


def plot_curves(metrics_path: str, png: str) -> None:
    """metrics.jsonl -> png, written to a temporary name, then moved."""
    with open(metrics_path) as f:
        records = [json.loads(line) for line in f]
    fig = curves_figure(records)
    fig.savefig(png + ".tmp.png")
    os.replace(png + ".tmp.png", png)


def curves_figure(records: list[dict]):
    """metrics.jsonl's records -> a matplotlib Figure of three panels."""
    from matplotlib.figure import Figure  # Agg, no display, no pyplot state
    fig = Figure(figsize=(15, 4), layout="constrained")
    loss_ax, val_ax, lr_ax = fig.subplots(1, 3)
    for source in sorted({r["source"] for r in records}):
        rows = [r for r in records if r["source"] == source]
        loss_ax.plot([r["step"] for r in rows], smooth([r["loss"] for r in rows]), label=source)
    steps = [r["step"] for r in records]
    loss_ax.plot(steps, smooth([r["hard"] for r in records]), "k--", lw=1, label="hard term (all)")
    loss_ax.plot(steps, smooth([r["in_batch"] for r in records]), "k:", lw=1,
                 label="in-batch term (all)")
    if "kd" in records[-1]:
        loss_ax.plot(steps, smooth([r.get("kd", 0.0) for r in records]), "k-.", lw=1,
                     label="distillation term (all)")
    loss_ax.set(title="training loss (smoothed)", xlabel="step")
    loss_ax.legend(fontsize=7)
    val = [r for r in records if "val_loss" in r]
    val_ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-",
                label="this run's loss")
    # the preset's formula on the same held-out reps: the line two variants' figures share
    recipe = [r for r in val if "val_recipe_loss" in r]  # absent in runs of older versions
    if recipe:
        val_ax.plot([r["step"] for r in recipe], [r["val_recipe_loss"] for r in recipe], "x--",
                    label="the recipe's loss (compares across variants)")
        val_ax.legend(fontsize=7)
    val_ax.set(title="validation loss", xlabel="step")
    lr_ax.plot(steps, [r["lr"] for r in records])
    lr_ax.set(title="learning rate", xlabel="step")
    return fig
