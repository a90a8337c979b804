"""``report.html`` and its PNG figures: one page for a radiologist or a governance committee.

Per finding: the ROC curve with the operating point marked, a reliability diagram (observed
frequency against mean score, by quantile bins) of the raw scores and of the scores the node
decides on (or the fitted calibration), and score histograms of positives and negatives with
the threshold. Every string from the data is HTML-escaped.
"""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any

import numpy as np

from triagenode.domain import DEMO_WARNING

__all__ = ["write_report"]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "finding"


def _figures(out_dir: Path, fig: dict[str, Any]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import roc_curve

    y, s, t = fig["labels"], fig["scores"], fig["threshold"]
    slug = f"{_slug(fig['label_set'])}_{_slug(fig['finding'])}"
    names: list[str] = []
    both = 0 < int(y.sum()) < y.size
    figure, axes = plt.subplots(1, 3, figsize=(13, 4), dpi=90)
    roc, reliability, histogram = axes
    if both:
        fpr, tpr, _ = roc_curve(y, s)
        roc.plot(fpr, tpr, color="#1f77b4", label="ROC")
        predicted = s >= t
        sens = float(predicted[y == 1].mean())
        spec = float((~predicted[y == 0]).mean())
        roc.plot([1 - spec], [sens], "o", color="#d62728", label=f"operating point t={t:.3f}")
        roc.legend(loc="lower right")
    else:
        roc.text(0.5, 0.5, "AUC undefined:\nonly one class", ha="center", va="center")
    roc.plot([0, 1], [0, 1], ":", color="grey")
    roc.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC", xlim=(0, 1), ylim=(0, 1))
    reliability.plot([0, 1], [0, 1], ":", color="grey")
    bins = max(2, min(10, y.size // 10))
    curves = [("raw score (uncalibrated)", fig.get("raw_scores"), "#ff7f0e")]
    curves.append((fig.get("calibrated_label", "node scores"), s, "#2ca02c"))
    for label, values, color in curves:
        if values is None or not both:
            continue
        observed, predicted_mean = calibration_curve(y, values, n_bins=bins, strategy="quantile")
        reliability.plot(predicted_mean, observed, "o-", color=color, label=label)
    if both:
        reliability.legend(loc="upper left", fontsize=8)
    reliability.set(
        xlabel="mean score",
        ylabel="observed frequency",
        title="Reliability",
        xlim=(0, 1),
        ylim=(0, 1),
    )
    edges = np.linspace(min(0.0, float(s.min(initial=0))), max(1.0, float(s.max(initial=1))), 31)
    histogram.hist(s[y == 0], bins=edges, alpha=0.6, label=f"negatives ({int((y == 0).sum())})")
    histogram.hist(s[y == 1], bins=edges, alpha=0.6, label=f"positives ({int(y.sum())})")
    histogram.axvline(t, color="#d62728", linestyle="--", label="threshold")
    histogram.legend(fontsize=8)
    histogram.set(xlabel="score", ylabel="studies", title="Scores")
    figure.suptitle(f"{fig['label_set']}: {fig['finding']}")
    figure.tight_layout()
    name = f"{slug}.png"
    figure.savefig(out_dir / name)
    plt.close(figure)
    names.append(name)
    return names


def _interval(item: dict[str, Any]) -> str:
    if item.get("value") is None:
        return "undefined"
    if item.get("low") is None:
        return f"{item['value']:.3f}"
    return f"{item['value']:.3f} <small>({item['low']:.3f}–{item['high']:.3f})</small>"


_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1200px}
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 8px;
text-align:right}th{background:#f0f0f0}td.l{text-align:left}.warn{color:#a00}
img{max-width:100%;border:1px solid #eee;margin:0.5em 0}small{color:#666}
"""


def write_report(out_dir: Path, summary: dict[str, Any], figures: list[dict[str, Any]]) -> Path:
    """Write the figures and ``report.html``; returns the page's path."""
    esc = html.escape
    counts = summary["studies"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        "<title>triagenode validation report</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>Validation report</h1>",
        *(
            [f"<p class=warn><b>{esc(DEMO_WARNING)}</b>: the built-in demo model ran.</p>"]
            if "DEMO" in str(summary["model"].get("name", ""))
            else []
        ),
        f"<p>Model: {esc(str(summary['model'].get('name', 'as stored by the node')))}.</p>",
        "<p>Research use: these figures describe this data set, not a diagnosis. "
        "95 % intervals: stratified bootstrap, "
        f"{summary['bootstrap']['resamples']} resamples, seed {summary['bootstrap']['seed']}.</p>",
        "<p>Studies: "
        + ", ".join(f"{esc(k)} {v}" for k, v in counts.items())
        + f". Model weights sha256: {esc(str(summary['model'].get('weights_sha256')))}.</p>",
        "<table><tr><th>label set</th><th>finding</th><th>n</th><th>positives</th>"
        "<th>AUC</th><th>threshold</th><th>sensitivity</th><th>specificity</th><th>PPV</th>"
        "<th>NPV</th><th>operating point</th></tr>",
    ]
    for f in summary["findings"]:
        parts.append(
            f"<tr><td class=l>{esc(f['label_set'])}</td><td class=l>{esc(f['finding'])}</td>"
            f"<td>{f['n']}</td><td>{f['positives']}</td><td>{_interval(f['auc'])}</td>"
            f"<td>{f['threshold']:.3f}</td><td>{_interval(f['sensitivity'])}</td>"
            f"<td>{_interval(f['specificity'])}</td><td>{_interval(f['ppv'])}</td>"
            f"<td>{_interval(f['npv'])}</td><td class=l>{esc(f['operating_point'])}; "
            f"{esc(f['evaluated_on'])}</td></tr>"
        )
    parts.append("</table>")
    for f in summary["findings"]:
        for note in [*f.get("notes", []), f.get("calibration_not_fitted", "")]:
            if note:
                parts.append(f"<p class=warn>{esc(f['finding'])}: {esc(note)}</p>")
    for key, title in (
        ("failed", "Studies that failed"),
        ("not_applicable", "Studies no label set fits (not classified)"),
        ("ignored", "Studies without classifiable images"),
    ):
        items = summary.get(key) or []
        if items:
            parts.append(f"<h3>{title} ({len(items)})</h3><ul>")
            parts.extend(
                f"<li>{esc(i['study_uid'])} {esc(i.get('folder', ''))}: {esc(i['reason'])}</li>"
                for i in items[:200]
            )
            parts.append("</ul>")
    if summary.get("labels_without_study"):
        missing = summary["labels_without_study"]
        parts.append(f"<h3>Labelled studies not found in the data ({len(missing)})</h3><p>")
        parts.append(esc(", ".join(missing[:200])) + "</p>")
    for fig in figures:
        for name in _figures(out_dir, fig):
            parts.append(f"<h2>{esc(fig['label_set'])}: {esc(fig['finding'])}</h2>")
            parts.append(f"<img src='{esc(name)}' alt='{esc(fig['finding'])}'>")
    parts.append("</body></html>")
    path = out_dir / "report.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
