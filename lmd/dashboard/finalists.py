"""The search's answer on its page: the finalists and the paper's configuration, re-run on fresh seeds (finalists.json).

A search's own values are one seed each on the items it selected on, so its best trial is
optimistic; the answer is the finalist phase's: each configuration's mean over seeds with its 95%
interval, next to its own references (the no-model fill and projector ceiling for PSNR, the probe on
raw inputs and on random encoders of its geometry for the probe), and its difference to the
paper's configuration with a verdict ("better", "worse", "not separable"). The figure shows the
intervals against the references; the table under it (id 'finalists-table') says the verdicts in
words. Nothing here imports torch.
"""

from __future__ import annotations

import html
import math
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from lmd.dashboard.figures import GREY, LAYOUT, variant_colors
from lmd.dashboard.search_figures import SAMPLED

PANEL_TITLES = {"val_psnr": "held-out PSNR (dB)", "val_probe_acc": "held-out linear-probe accuracy"}
# (references key, metric panel, legend label, dash): each configuration's references, on its metric's panel.
REFERENCES = [("fill_psnr", "val_psnr", "no-model fill {v:.2f} dB", "dash"),
              ("ceiling_psnr", "val_psnr", "projector ceiling {v:.2f} dB", "dot"),
              ("raw_probe_acc", "val_probe_acc", "raw-input probe {v:.3f}", "dash"),
              ("random_probe_acc", "val_probe_acc", "random-encoder probe {v:.3f}", "dot")]
BEATS = {"fill_psnr": "no-model fill", "random_probe_acc": "random encoder", "raw_probe_acc": "raw-input probe"}
VERDICT_COLORS = {"better": "#e3f4e3", "worse": "#fbe3e3", "not separable": "#f0f0f0"}
BAND = "rgba(136,136,136,0.15)"  # GREY, faint: the random-encoder probe's 95% band
HALF_WIDTH = 0.4  # a reference segment spans its configuration's slot, +- this much around it


def _num(value: Any) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def ordered(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The paper's configuration first (what every verdict is against), then the finalists by search rank."""
    rows = record["finalists"]
    paper = [r for r in rows if r["name"] == record["paper"]]
    return paper + sorted((r for r in rows if r["name"] != record["paper"]),
                          key=lambda r: (r["rank"] is None, r["rank"] or 0, r["name"]))


def panel_metrics(record: dict[str, Any]) -> list[str]:
    """The objective's panel first, then the other of PSNR and probe where any configuration has it."""
    metric = record["metric"]
    others = [m for m in PANEL_TITLES if m != metric
              and any(_num((r.get(m) or {}).get("mean")) is not None for r in record["finalists"])]
    return [metric, *others]


def _references(fig: go.Figure, rows: list[dict[str, Any]], metric: str, col: int, span: tuple[float, float]) -> None:
    """Each configuration's references as segments over its own slot, one legend entry per distinct value; the
    random-encoder probe with its 95% band. A ceiling above the intervals and fills by more than their own span is
    listed in the legend as off scale (click to draw): drawn, it would flatten intervals a few tenths of a dB wide."""
    for key, panel, label, dash in REFERENCES:
        if panel != metric:
            continue
        by_value: dict[float, list[int]] = {}
        for i, row in enumerate(rows):
            value = _num((row.get("references") or {}).get(key))
            if value is not None:
                by_value.setdefault(round(value, 6), []).append(i)
        for value, slots in sorted(by_value.items()):
            xs = [x for i in slots for x in (i - HALF_WIDTH, i + HALF_WIDTH, None)]
            low, top = span
            off = key == "ceiling_psnr" and value > top + max(1.0, top - low)
            name = label.format(v=value) + (", off scale" if off else "")
            fig.add_trace(go.Scatter(x=xs, y=[value if x is not None else None for x in xs], mode="lines", name=name,
                                     line={"color": GREY, "dash": dash, "width": 1.8},
                                     visible="legendonly" if off else True, hovertemplate=f"{name}<extra></extra>"),
                          row=1, col=col)
            if key == "random_probe_acc":
                for i in slots:
                    half = _num(rows[i]["references"].get("random_probe_acc_ci95"))
                    if half:  # clipped to [0, 1]: a band over few initialisations can pass both
                        fig.add_shape(type="rect", x0=i - HALF_WIDTH, x1=i + HALF_WIDTH, y0=max(value - half, 0.0),
                                      y1=min(value + half, 1.0), fillcolor=BAND, line={"width": 0},
                                      name="random-encoder probe 95%", row=1, col=col)


def finalists_figure(record: dict[str, Any], label: str) -> go.Figure:
    """Per configuration, the mean over seeds with its 95% interval (and each seed) on the objective and, in a
    smaller panel, on the other metric, beside its references; the verdict against the paper above each finalist."""
    rows, metrics = ordered(record), panel_metrics(record)
    names = [r["name"] for r in rows]
    colors = {**variant_colors([n for n in names if n != record["paper"]]), record["paper"]: "#404040"}
    titles = [f"{label} (the objective)" if m == record["metric"] else PANEL_TITLES[m] for m in metrics]
    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=titles,
                        column_widths=[0.62, 0.38] if len(metrics) == 2 else None)
    for col, metric in enumerate(metrics, start=1):
        stats = [r.get(metric) or {} for r in rows]
        means, halves = [_num(s.get("mean")) for s in stats], [_num(s.get("ci95")) for s in stats]
        fig.add_trace(go.Scatter(
            x=list(range(len(rows))), y=means, mode="markers", name="mean ± 95% CI over seeds", legendgroup="mean",
            showlegend=col == 1, error_y={"type": "data", "array": halves, "thickness": 2, "width": 8},
            marker={"color": [colors[n] for n in names], "size": 13, "symbol": "diamond"},
            hovertext=[f"{n}: {_pm(s, '.4g')} (n={r['n']})" for n, s, r in zip(names, stats, rows, strict=True)],
            hovertemplate="%{hovertext}<extra></extra>"), row=1, col=col)
        seeds = [(i + 0.12 * (k - (len(s.get("values") or []) - 1) / 2), v)
                 for i, s in enumerate(stats) for k, v in enumerate(s.get("values") or [])]
        fig.add_trace(go.Scatter(x=[x for x, _ in seeds], y=[v for _, v in seeds], mode="markers", name="each seed",
                                 legendgroup="seed", showlegend=col == 1, hoverinfo="y",
                                 marker={"color": GREY, "size": 6, "symbol": "circle-open"}), row=1, col=col)
        fills = [_num((r.get("references") or {}).get("fill_psnr")) for r in rows] if metric == "val_psnr" else []
        bounds = [m + sign * (h or 0.0) for m, h in zip(means, halves, strict=True) if m is not None
                  for sign in (-1, 1)]
        bounds += [f for f in fills if f is not None]
        if metric == record["metric"]:
            said = [(i, r["vs_paper"]["verdict"]) for i, r in enumerate(rows)
                    if r.get("vs_paper") and means[i] is not None]
            fig.add_trace(go.Scatter(x=[i for i, _ in said], y=[means[i] + (halves[i] or 0.0) for i, _ in said],
                                     mode="text", text=[f"{v} vs paper" for _, v in said], textposition="top center",
                                     name="verdict against the paper", showlegend=False, hoverinfo="skip"),
                          row=1, col=col)
        _references(fig, rows, metric, col, (min(bounds, default=0.0), max(bounds, default=0.0)))
        fig.update_xaxes(tickvals=list(range(len(rows))), range=[-0.6, len(rows) - 0.4], row=1, col=col,
                         ticktext=[f"{n}<br>(paper)" if n == record["paper"] else n for n in names])
        fig.update_yaxes(title_text=PANEL_TITLES[metric].removeprefix("held-out "), row=1, col=col)
    fig.update_layout(**{**LAYOUT, "height": 520})
    return fig


def _pm(stats: dict[str, Any] | None, fmt: str) -> str:
    mean, half = _num((stats or {}).get("mean")), _num((stats or {}).get("ci95"))
    if mean is None:
        return "—"
    return f"{mean:{fmt}}" + (f" ± {half:{fmt}}" if half is not None else " (one seed: no interval)")


def _params(params: dict[str, Any]) -> str:
    """The sampled values in the search's order (the file's keys are sorted by name)."""
    order = [k for k in SAMPLED if k in params] + sorted(k for k in params if k not in SAMPLED)
    return ", ".join(f"{k} {params[k]:.3g}" if isinstance(params[k], float) else f"{k} {params[k]}" for k in order)


def _versus(row: dict[str, Any], fmt: str, unit: str) -> tuple[str, str]:
    """(text, verdict) of a configuration against the paper's."""
    vs = row.get("vs_paper")
    if vs is None:
        return "(the reference)", ""
    diff, lo, hi = _num(vs["diff"]), _num(vs["lo"]), _num(vs["hi"])
    text = "—" if diff is None else f"{diff:+{fmt}}{unit}"
    if lo is not None and hi is not None:
        text += f" [{lo:+{fmt}}, {hi:+{fmt}}]"
    return f"{text}: {vs['verdict']}", vs["verdict"]


def finalists_table_html(record: dict[str, Any], label: str) -> str:
    """The finalists in words: sampled values, seeds, the objective and the other metric with intervals, the
    compute, which references each beats, and the verdict against the paper's configuration."""
    metric = record["metric"]
    fmt, unit = (".2f", " dB") if metric == "val_psnr" else (".3f", "")
    others = [m for m in panel_metrics(record) if m != metric]
    head = ["configuration", "sampled values", "search value", "seeds", f"{label} (95% CI)",
            *(f"{PANEL_TITLES[m]} (95% CI)" for m in others), "train TFLOP", "encoder GFLOP / image", "beats",
            f"vs {record['paper']} on {metric} (95% CI)"]
    lines = ["<table class='finalists' id='finalists-table'>",
             "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for row in ordered(record):
        search = _num(row.get("search_value"))
        beats = "; ".join(f"{BEATS.get(k, k)}: {v}" for k, v in (row.get("beats") or {}).items()) or "—"
        versus, verdict = _versus(row, fmt, unit)
        cells = [row["name"] + (" (the paper's)" if row["name"] == record["paper"] else ""), _params(row["params"]),
                 "—" if search is None else format(search, fmt), str(row["n"]), _pm(row.get(metric), fmt),
                 *(_pm(row.get(m), ".2f" if m == "val_psnr" else ".3f") for m in others),
                 *("—" if _num(row.get(k)) is None else format(row[k], f) for k, f in
                   (("train_tflops", ".3g"), ("encoder_gflops", ".4g"))), beats]
        shade = f" style='background:{VERDICT_COLORS[verdict]}'" if verdict in VERDICT_COLORS else ""
        lines.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells)
                     + f"<td class='verdict'{shade}>{html.escape(versus)}</td></tr>")
    lines.append("</table>")
    return "\n".join(lines)


def finalists_caption(record: dict[str, Any], label: str) -> str:
    """What the finalists are, what they were given, and how a verdict is reached (HTML-escaped)."""
    seeds, budget = record["seeds"], record.get("budget") or {}
    given = (f" at the search's budget ({budget['budget']:g} {budget.get('unit', '')} per trial, --budget-by "
             f"{budget['budget_by']})" if budget else "")
    heldout = f" on the held-out split '{record['heldout']}'" if record.get("heldout") else ""
    text = (f"The search's best configurations and the paper's ({record['paper']}) re-run with {len(seeds)} fresh "
            f"seeds ({', '.join(map(str, seeds))}){given}, scored{heldout}. Diamonds: mean over seeds with its 95% "
            f"t-interval (none below two seeds); circles: each seed. Grey lines, over each configuration's own slot: "
            "its references (dashed: no-model fill; dotted: projector ceiling, listed in the legend as off scale when "
            "drawing it would flatten the intervals; on the probe panel, dashed: the probe on raw inputs, dotted: a "
            "random encoder of its geometry with its 95% band). Against the paper: the "
            f"difference in {label} with its 95% interval, 'better' or 'worse' only when that interval excludes "
            "zero, else 'not separable'.")
    return html.escape(text)
