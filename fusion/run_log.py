"""What a training run records: metrics as JSON lines, and a PNG plot of loss and accuracy."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

from .checkpoint import write_text_atomically


class MetricsLog:
    """Appends one JSON object per line to `path`. On resume, entries after the resumed step are dropped,
    so a run that was killed and resumed has the same log as one that was not (a line the kill tore in
    half goes with them); the shortened log replaces the old one in a single rename."""

    def __init__(self, path, resume_from_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_from_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [e for e in read_metrics(self.path) if e.get("step", 0) <= resume_from_step]
            write_text_atomically(self.path, "".join(json.dumps(e) + "\n" for e in kept))

    def write(self, **entry):
        """Append one entry. A log line that cannot be written (a full disk, a quota) is a warning, not the end
        of a long run: the checkpoints, which say so loudly when they fail, are what a run is resumed from."""
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(entry) + "\n")
        except OSError as err:
            warnings.warn(f"could not append to the metrics log {self.path} ({err}); training goes on without "
                          f"this entry: {json.dumps(entry)[:200]}", RuntimeWarning, stacklevel=2)

    def read(self) -> list[dict]:
        return read_metrics(self.path)


def read_metrics(path) -> list[dict]:
    """The log's entries; a line that is not JSON (torn by a kill or a full disk mid-write) is left out."""
    path = Path(path)
    if not path.exists():
        return []
    entries = []
    for line in path.read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return entries


def plot_metrics(metrics_path, out_png) -> Path:
    """Training and validation loss, task accuracy and (for a model with MoE layers) the router load against
    the optimizer step, as a PNG (`metrics_figure`)."""
    out_png = Path(out_png)
    metrics_figure(read_metrics(metrics_path)).savefig(out_png, dpi=100)
    return out_png


def metrics_figure(entries: list[dict]):
    """The figure of a metrics log's entries: training and validation loss (left), task accuracy (middle) and,
    where the log has it, each expert's share of the routed image and of the routed text tokens, averaged over
    the MoE layers (right)."""
    # A Figure of its own (not pyplot): the global backend, e.g. a notebook's inline plots, stays as it is.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train = [e for e in entries if e.get("kind") == "train"]
    evals = [e for e in entries if e.get("kind") == "eval"]
    routed = [e for e in train if e.get("router_load")]
    fig = Figure(figsize=(16.5 if routed else 11, 4))
    FigureCanvasAgg(fig)
    ax_loss, ax_acc, *ax_router = fig.subplots(1, 3 if routed else 2)
    if train:
        loss = [float("nan") if e["loss"] is None else e["loss"] for e in train]  # None: a window that did not train
        ax_loss.plot([e["step"] for e in train], loss, label="train loss", lw=1)
    with_val = [e for e in evals if e.get("val_loss") is not None]
    if with_val:
        ax_loss.plot([e["step"] for e in with_val], [e["val_loss"] for e in with_val], "o-", label="validation loss")
    for stage_start in _stage_starts(train):
        ax_loss.axvline(stage_start["step"], color="grey", ls=":", lw=1)
        ax_loss.text(stage_start["step"], ax_loss.get_ylim()[1] if train else 1, f" {stage_start['stage']}",
                     va="top", fontsize=8, color="grey")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    positive = [e for e in train if (e["loss"] or 0) > 0] + [e for e in with_val if e["val_loss"] > 0]
    if positive:  # a log scale needs a positive value (every step of a run may have been skipped)
        ax_loss.set_yscale("log")
    ax_loss.legend()
    metrics = sorted({k for e in evals for k in e.get("accuracy", {}) if k.endswith("/accuracy")})  # per task
    for name in metrics:
        points = [(e["step"], e["accuracy"][name]) for e in evals if name in e.get("accuracy", {})]
        ax_acc.plot([p[0] for p in points], [p[1] for p in points], "o-", label=name)
    ax_acc.set_xlabel("step")
    ax_acc.set_ylabel("accuracy per task (by type: metrics.jsonl)")
    ax_acc.set_ylim(0, 1.02)
    if metrics:
        ax_acc.legend(fontsize=8)
    if routed:
        _plot_router_load(ax_router[0], routed)
    fig.tight_layout()
    return fig


def _plot_router_load(ax, routed: list[dict]) -> None:
    """Each expert's share of the image tokens (solid) and of the text tokens (dashed), mean over MoE layers."""
    steps = [e["step"] for e in routed]
    for kind, style in (("image", "-"), ("text", "--")):
        shares = [[sum(layer[expert] for layer in e["router_load"][kind]) / len(e["router_load"][kind])
                   for e in routed] for expert in range(len(routed[0]["router_load"][kind][0]))]
        for expert, share in enumerate(shares):
            ax.plot(steps, share, style, color=f"C{expert}", lw=1, label=f"expert {expert}, {kind}")
    ax.set_xlabel("step")
    ax.set_ylabel("share of routed tokens (mean over MoE layers)")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7, ncol=2)


def _stage_starts(train: list[dict]) -> list[dict]:
    starts, last = [], None
    for e in train:
        if e.get("stage") != last:
            starts.append(e)
            last = e.get("stage")
    return starts
