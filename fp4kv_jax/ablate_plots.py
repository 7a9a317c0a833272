"""The PNG figures of `fp4kv ablate`, drawn from the results dict alone (results.json).

- cost_vs_bits.png: perplexity change (with its 95% interval) and KL against bits per
  element, one point per row.
- layer_errors.png: relative error of K, V and attention outputs against layer.
- kl_by_position.png: mean KL against position in the window, in buckets.

Rows are compared with the reference, so the reference itself is left out where its
values are zero by construction (KL, errors) and would break a log axis.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI

import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.ticker import MaxNLocator  # noqa: E402

_LAYER_TITLES = {"k": "keys", "v": "values", "attention_output": "attention outputs"}


def _compared_rows(results: dict) -> list[dict]:
    reference = results["config"]["reference"]
    return [row for row in results["results"] if row["name"] != reference]


def _colour(results: dict, row: dict) -> str:
    """The row's colour, the same in every figure."""
    return f"C{results['results'].index(row) % 10}"


def _cost_vs_bits(results: dict, path: Path) -> None:
    rows = results["results"]
    figure, (ppl_axis, kl_axis) = plt.subplots(1, 2, figsize=(11, 4.2))
    for row in rows:
        bits = row["bits_per_element"]
        low, high = row["delta_ppl_ci95"]
        delta = row["delta_ppl_pct"]
        ppl_axis.errorbar(bits, delta, yerr=[[delta - low], [high - delta]], fmt="o", capsize=4,
                          color=_colour(results, row))
        ppl_axis.annotate(row["name"], (bits, delta), textcoords="offset points", xytext=(6, 4))
    ppl_axis.axhline(0, color="grey", linewidth=0.8)
    ppl_axis.set(xlabel="bits per element", ylabel="perplexity change vs reference (%)",
                 title="ΔPPL with 95% block-bootstrap interval")
    for row in _compared_rows(results):
        kl_axis.plot(row["bits_per_element"], row["kl"], "o", color=_colour(results, row))
        kl_axis.annotate(row["name"], (row["bits_per_element"], row["kl"]),
                         textcoords="offset points", xytext=(6, 4))
    kl_axis.set(xlabel="bits per element", ylabel="mean KL(reference || row), nats",
                title="KL of next-token distributions", yscale="log")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _layer_errors(results: dict, path: Path) -> None:
    figure, axes = plt.subplots(1, len(_LAYER_TITLES), figsize=(14, 4.2), sharey=True)
    for axis, (tensor, title) in zip(axes, _LAYER_TITLES.items()):
        for row in _compared_rows(results):
            errors = row["layer_errors"][tensor]
            axis.plot(range(len(errors)), errors, marker=".", label=row["name"],
                      color=_colour(results, row))
        axis.set(xlabel="layer", title=title, yscale="log")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_ylabel("relative error ||x - x_ref|| / ||x_ref||")
    if _compared_rows(results):  # a reference-only run has nothing to label
        _legend_below(figure, axes[-1])
    figure.tight_layout()
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)


def _kl_by_position(results: dict, path: Path) -> None:
    starts = results["config"]["position_bucket_starts"]
    figure, axis = plt.subplots(figsize=(7, 4.2))
    for row in _compared_rows(results):
        axis.plot(starts, row["kl_by_position"], marker="o", label=row["name"],
                  color=_colour(results, row))
    axis.set(xlabel="first position of the bucket in the window",
             ylabel="mean KL(reference || row), nats", title="KL against context position",
             yscale="log")
    if _compared_rows(results):
        _legend_below(figure, axis)
    figure.tight_layout()
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)


def _legend_below(figure, axis) -> None:
    # Below the axes, so that long recipe names hide no curve.
    figure.legend(*axis.get_legend_handles_labels(), loc="upper center", bbox_to_anchor=(0.5, 0.0),
                  ncol=2, fontsize="small", frameon=False)


def write_plots(results: dict, out_dir: Path) -> list[Path]:
    """Writes the three figures into `out_dir`; returns their paths."""
    paths = []
    for name, draw in (
        ("cost_vs_bits.png", _cost_vs_bits),
        ("layer_errors.png", _layer_errors),
        ("kl_by_position.png", _kl_by_position),
    ):
        draw(results, out_dir / name)
        paths.append(out_dir / name)
    return paths
