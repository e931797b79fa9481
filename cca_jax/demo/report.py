"""The demo's outputs: the table (stdout + ``results.md`` + ``results.json``), TensorBoard
scalars, ``tradeoff.png``, and a plain-words summary computed from the numbers (never edited by
hand: if guidance does not improve the marginal FID on digits, the summary says so).

Row keys (per family): ``kind`` (base | cfg | cca), ``mode``, ``value`` (CFG scale or λ),
``fid``, ``cfid``, ``accuracy``, ``inception_score``, ``precision``, ``recall``,
``sec_per_image``, ``compile_s``.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
from etils import epath

COLUMNS = ("family", "mode", "guidance", "FID", "per-class FID", "accuracy", "IS", "precision",
           "recall", "ms/img", "time vs base")

CFG_NAME = {"llamagen": "CFG scale s (logits u + s(c - u); 1 = none)",
            "var": "VAR cfg t (ramp (1 + t·r)c - t·r·u, r = scale/(S-1); 0 = none)"}


def _guidance(fam: str, row: dict) -> str:
    if row["kind"] == "base":
        return "none"
    if row["kind"] == "cfg":
        return f"CFG {row['value']:g}"
    return f"none (CCA λ={row['value']:g})"


def table_rows(results: dict) -> list[list[str]]:
    out = []
    for fam, rows in results["families"].items():
        base_t = next(r["sec_per_image"] for r in rows if r["kind"] == "base")
        for r in rows:
            out.append([fam, r["mode"], _guidance(fam, r), f"{r['fid']:.3f}", f"{r['cfid']:.3f}",
                        f"{r['accuracy']:.3f}", f"{r.get('inception_score', float('nan')):.2f}",
                        f"{r.get('precision', float('nan')):.3f}", f"{r.get('recall', float('nan')):.3f}",
                        f"{1000 * r['sec_per_image']:.3f}", f"{r['sec_per_image'] / base_t:.2f}x"])
    f = results.get("data_floor")
    if f:
        out.append(["real digits", f"{f['num_samples']} held in", "-", f"{f['fid']:.3f}",
                    f"{f['cfid']:.3f}", f"{f['accuracy']:.3f}", f"{f.get('inception_score', float('nan')):.2f}",
                    f"{f.get('precision', float('nan')):.3f}", f"{f.get('recall', float('nan')):.3f}", "-", "-"])
    return out


def markdown_table(results: dict) -> str:
    rows = table_rows(results)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def text_table(results: dict) -> str:
    rows = [list(COLUMNS)] + table_rows(results)
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    fmt = lambda r: "  ".join(c.rjust(w) if i >= 3 else c.ljust(w)  # noqa: E731
                              for i, (c, w) in enumerate(zip(r, widths)))
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(rows[0]), sep] + [fmt(r) for r in rows[1:]])


def _nearest_by_accuracy(cfg_rows, acc):
    return min(cfg_rows, key=lambda r: abs(r["accuracy"] - acc)) if cfg_rows else None


def summary_lines(results: dict) -> list[str]:
    """Statements computed from the numbers (what the demo is meant to show, checked honestly)."""
    lines = []
    for fam, rows in results["families"].items():
        base = next(r for r in rows if r["kind"] == "base")
        cfg = [r for r in rows if r["kind"] == "cfg"]
        cca = [r for r in rows if r["kind"] == "cca"]
        if not cfg or not cca:
            continue
        best_cfg_acc = max(cfg, key=lambda r: r["accuracy"])
        best_cca_acc = max(cca, key=lambda r: r["accuracy"])
        lines.append(
            f"{fam}: guidance-free base accuracy {base['accuracy']:.3f}; CFG raises it to "
            f"{best_cfg_acc['accuracy']:.3f} ({best_cfg_acc['mode']}), CCA without guidance to "
            f"{best_cca_acc['accuracy']:.3f} ({best_cca_acc['mode']}).")
        for r in cca:
            near = _nearest_by_accuracy(cfg, r["accuracy"])
            lines.append(
                f"  {r['mode']}: acc {r['accuracy']:.3f}, FID {r['fid']:.3f}, per-class FID "
                f"{r['cfid']:.3f}, {1000 * r['sec_per_image']:.3f} ms/img | nearest-accuracy CFG "
                f"({near['mode']}): acc {near['accuracy']:.3f}, FID {near['fid']:.3f}, per-class "
                f"FID {near['cfid']:.3f}, {1000 * near['sec_per_image']:.3f} ms/img -> CCA samples "
                f"in {r['sec_per_image'] / near['sec_per_image']:.2f}x CFG's time.")
        best_cfg_fid = min(cfg, key=lambda r: r["fid"])
        if best_cfg_fid["fid"] < base["fid"]:
            lines.append(f"  CFG improves the marginal FID on digits: {base['fid']:.3f} -> "
                         f"{best_cfg_fid['fid']:.3f} ({best_cfg_fid['mode']}).")
        else:
            lines.append(f"  CFG does NOT improve the marginal FID on digits (base {base['fid']:.3f}, "
                         f"best CFG {best_cfg_fid['fid']:.3f}); it trades FID for accuracy here.")
        best_cca_fid = min(cca, key=lambda r: r["fid"])
        verdict = "improves" if best_cca_fid["fid"] < base["fid"] else "does NOT improve"
        lines.append(f"  CCA {verdict} the marginal FID: base {base['fid']:.3f}, best CCA "
                     f"{best_cca_fid['fid']:.3f} ({best_cca_fid['mode']}).")
        best_cfg_cfid = min(cfg, key=lambda r: r["cfid"])
        best_cca_cfid = min(cca, key=lambda r: r["cfid"])
        lines.append(f"  per-class FID: base {base['cfid']:.3f}, best CFG {best_cfg_cfid['cfid']:.3f} "
                     f"({best_cfg_cfid['mode']}), best CCA {best_cca_cfid['cfid']:.3f} "
                     f"({best_cca_cfid['mode']}).")
    return lines


def plot(results: dict, path: epath.Path) -> None:
    """Per family: FID / accuracy against the CFG scale, against λ, and FID against accuracy."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = list(results["families"])
    fig, axes = plt.subplots(len(fams), 3, figsize=(14, 4 * len(fams)), squeeze=False)
    for i, fam in enumerate(fams):
        rows = results["families"][fam]
        base = next(r for r in rows if r["kind"] == "base")
        cfg = sorted([r for r in rows if r["kind"] == "cfg"], key=lambda r: r["value"])
        cca = sorted([r for r in rows if r["kind"] == "cca"], key=lambda r: r["value"])
        free = 1.0 if fam == "llamagen" else 0.0
        for ax, sweep, xlabel, xs, log in (
                (axes[i, 0], [base] + cfg, CFG_NAME[fam], [free] + [r["value"] for r in cfg], False),
                (axes[i, 1], cca, "CCA λ (guidance-free sampling)", [r["value"] for r in cca], True)):
            ax.plot(xs, [r["fid"] for r in sweep], "o-", color="tab:blue", label="FID")
            ax.plot(xs, [r["cfid"] for r in sweep], "s--", color="tab:cyan", label="per-class FID")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("FID (classifier features)")
            if log and min(xs) > 0:
                ax.set_xscale("log")
            ax2 = ax.twinx()
            ax2.plot(xs, [r["accuracy"] for r in sweep], "^-", color="tab:red", label="accuracy")
            ax2.set_ylabel("accuracy", color="tab:red")
            ax.set_title(f"{fam}: " + ("base model + CFG" if sweep is not cca else "CCA, no guidance"))
            h1, l1 = ax.get_legend_handles_labels()
            h2, l2 = ax2.get_legend_handles_labels()
            ax.legend(h1 + h2, l1 + l2, fontsize=8)
        ax = axes[i, 2]
        ax.plot([r["accuracy"] for r in [base] + cfg], [r["fid"] for r in [base] + cfg], "o-",
                label="base + CFG sweep")
        ax.plot([r["accuracy"] for r in cca], [r["fid"] for r in cca], "s-", label="CCA λ sweep (no guidance)")
        ax.plot([base["accuracy"]], [base["fid"]], "k*", ms=12, label="base, no guidance")
        for r in [base] + cfg + cca:
            ax.annotate(r["mode"].replace("base_", ""), (r["accuracy"], r["fid"]), fontsize=7)
        ax.set_xlabel("accuracy (share classified as their label)")
        ax.set_ylabel("FID")
        ax.set_title(f"{fam}: FID / accuracy trade-off")
        ax.legend(fontsize=8)
    fig.tight_layout()
    with path.open("wb") as f:
        fig.savefig(f, format="png", dpi=90)
    plt.close(fig)


def write_scalars(results: dict, writer) -> None:
    """TensorBoard: per mode at step 0 (``demo/<family>/<mode>/<metric>``), and the two sweeps
    as curves (``sweep_cfg`` at step round(100·scale), ``sweep_cca`` at step λ)."""
    keys = ("fid", "cfid", "accuracy", "inception_score", "precision", "recall", "sec_per_image")
    for fam, rows in results["families"].items():
        for r in rows:
            writer.write_scalars(0, {f"demo/{fam}/{r['mode']}/{k}": float(r[k]) for k in keys if k in r})
            if r["kind"] in ("cfg", "cca"):
                step = int(round(100 * r["value"])) if r["kind"] == "cfg" else int(round(r["value"]))
                writer.write_scalars(step, {f"demo/{fam}/sweep_{r['kind']}/{k}": float(r[k])
                                            for k in keys if k in r})


def write_all(results: dict, wd: epath.Path, writer) -> None:
    text = text_table(results)
    lines = summary_lines(results)
    results["summary"] = lines
    md = ["# CCA demo on scikit-learn digits", "",
          "FID / per-class FID in the digits classifier's feature space (lower is better); "
          "accuracy = share of samples the classifier assigns to their conditioning label; "
          "ms/img = sampling time per image: the fastest 500-image batch of the mode / 500, "
          "compilation excluded; time vs base = ratio to the base model's guidance-free ms/img.", "",
          markdown_table(results), "", *[f"- {l}" if not l.startswith("  ") else f"  - {l.strip()}"
                                         for l in lines], "",
          "Stage times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in
                                          sorted(results.get("stage_seconds", {}).items())),
          f"Total: {results.get('total_seconds', float('nan')):.1f} s"]
    (wd / "results.md").write_text("\n".join(md) + "\n")
    tmp = wd / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1, sort_keys=True, default=_json_default))
    tmp.replace(wd / "results.json")
    plot(results, wd / "tradeoff.png")
    write_scalars(results, writer)
    print("\n" + text + "\n", flush=True)
    for l in lines:
        print(l, flush=True)
    print(f"\nresults: {wd / 'results.md'}, {wd / 'results.json'}, plot {wd / 'tradeoff.png'}, "
          f"samples {wd / 'samples'}, TensorBoard {wd / 'tensorboard'}", flush=True)
    print(f"total {results.get('total_seconds', float('nan')):.1f} s", flush=True)


def _json_default(x: Any):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, tuple):
        return list(x)
    if isinstance(x, float) and math.isnan(x):
        return None
    return str(x)
