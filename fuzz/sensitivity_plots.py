"""PNG plots of a sensitivity sweep (``python -m fuzz sensitivity``); matplotlib is the optional extra
``plot`` (``pip install 'jaxkv[plot]'``), imported lazily: :func:`plot_all` raises ImportError with
that hint when it is missing.

Input: the result rows (``jaxkv.sensitivity.summarize``) and channel records
(``jaxkv.sensitivity.rank_channels``) as written to results.json / channels.json.
"""

from __future__ import annotations

import math
import pathlib

import numpy as np

__all__ = ["plot_all", "plot_error_vs_window", "plot_heatmap", "plot_channels"]


def _plt():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("matplotlib is not installed (pip install 'jaxkv[plot]')") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _pairs(rows):
    return list(dict.fromkeys((r["k_format"], r["v_format"]) for r in rows))


def _label(k, v):
    return k if k == v else f"K {k} / V {v}"


def plot_error_vs_window(rows, path) -> pathlib.Path:
    """Mean NMSE (95% CI bars) vs hot window W, one line per format pair; panels: dist (rows) x
    (head_dim, kv_len) (columns). Exact zeros (W >= L) are drawn as open triangles on the bottom axis."""
    plt = _plt()
    dists = list(dict.fromkeys(r["dist"] for r in rows))
    cols = sorted({(r["head_dim"], r["kv_len"]) for r in rows})
    pairs = _pairs(rows)
    fig, axes = plt.subplots(len(dists), len(cols), figsize=(3.6 * len(cols), 3.0 * len(dists) + 0.8),
                             squeeze=False, sharey=True)
    pos = [r["nmse_ci_lo"] for r in rows if r["nmse_mean"] > 0 and r["nmse_ci_lo"] > 0]
    floor = min(pos) / 10 if pos else 1e-12
    top = max([r["nmse_ci_hi"] for r in rows] + [floor * 100]) * 2
    wins = sorted({r["hot_window"] for r in rows})
    lin = min([w for w in wins if w > 0] or [1])
    cmap = plt.get_cmap("tab10")
    for i, dist in enumerate(dists):
        for j, (d, n) in enumerate(cols):
            ax = axes[i][j]
            for c, (k, v) in enumerate(pairs):
                sel = sorted((r for r in rows if r["dist"] == dist and r["head_dim"] == d and r["kv_len"] == n
                              and r["k_format"] == k and r["v_format"] == v), key=lambda r: r["hot_window"])
                if not sel:
                    continue
                xs = [max(r["hot_window"], 0) for r in sel]
                ys = [r["nmse_mean"] for r in sel]
                nz = [(x, y, r) for x, y, r in zip(xs, ys, sel) if y > 0]
                if nz:
                    ax.errorbar([t[0] for t in nz], [t[1] for t in nz],
                                yerr=[[t[1] - t[2]["nmse_ci_lo"] for t in nz],
                                      [t[2]["nmse_ci_hi"] - t[1] for t in nz]],
                                marker="o", ms=3, lw=1.2, capsize=2, color=cmap(c % 10), label=_label(k, v))
                zx = [x for x, y in zip(xs, ys) if y == 0]
                if zx:
                    ax.plot(zx, [floor] * len(zx), marker="v", ls="none", mfc="none", color=cmap(c % 10))
            ax.set_xscale("symlog", linthresh=lin, linscale=0.5)
            ax.set_yscale("log")
            ax.set_ylim(floor / 2, top)
            ax.set_xticks(wins, [str(w) for w in wins])
            ax.minorticks_off()
            if n <= max(wins):
                ax.axvline(n, color="0.6", lw=0.8, ls=":")
            ax.set_title(f"{dist}, D={d}, L={n}", fontsize=9)
            ax.grid(True, which="major", alpha=0.3)
            ax.tick_params(labelsize=7)
            if i == len(dists) - 1:
                ax.set_xlabel("hot window W (F16 tokens)", fontsize=8)
            if j == 0:
                ax.set_ylabel("output NMSE (mean, 95% CI)", fontsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes.ravel():
        h, l_ = ax.get_legend_handles_labels()
        for hh, ll in zip(h, l_):
            if ll not in labels:
                handles.append(hh)
                labels.append(ll)
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8, frameon=False)
    fig.suptitle("Attention output error vs F16 hot window (dotted: W = L; open triangle: exactly 0)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return pathlib.Path(path)


def plot_heatmap(rows, path, hot_window=None) -> pathlib.Path:
    """log10 mean NMSE, format pair (rows) x kv_len (columns), at ``hot_window`` (default: the smallest
    in the rows); one panel per (dist, head_dim); cells annotated with the mean NMSE."""
    plt = _plt()

    w0 = min(r["hot_window"] for r in rows) if hot_window is None else hot_window
    rows = [r for r in rows if r["hot_window"] == w0]
    panels = sorted({(r["dist"], r["head_dim"]) for r in rows})
    pairs = _pairs(rows)
    lens = sorted({r["kv_len"] for r in rows})
    by = {(r["dist"], r["head_dim"], r["k_format"], r["v_format"], r["kv_len"]): r["nmse_mean"] for r in rows}
    vals = [v for v in by.values() if v > 0]
    vmin, vmax = (math.log10(min(vals)), math.log10(max(vals))) if vals else (-12, 0)
    fig, axes = plt.subplots(1, len(panels), figsize=(1.2 + 1.1 * len(lens) * len(panels) + 1.0 * len(panels),
                                                      0.9 + 0.38 * len(pairs)), squeeze=False)
    im = None
    for p, (dist, d) in enumerate(panels):
        ax = axes[0][p]
        m = np.full((len(pairs), len(lens)), np.nan)
        for a, (k, v) in enumerate(pairs):
            for b, n in enumerate(lens):
                x = by.get((dist, d, k, v, n))
                if x is not None and x > 0:
                    m[a, b] = math.log10(x)
        im = ax.imshow(m, cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
        for a in range(len(pairs)):
            for b, n in enumerate(lens):
                x = by.get((dist, d, pairs[a][0], pairs[a][1], n))
                txt = "-" if x is None else ("0" if x == 0 else f"{x:.1e}")
                light = not np.isnan(m[a, b]) and m[a, b] < (vmin + vmax) / 2
                ax.text(b, a, txt, ha="center", va="center", fontsize=7, color="white" if light else "black")
        ax.set_xticks(range(len(lens)), [f"L={n}" for n in lens], fontsize=8)
        ax.set_yticks(range(len(pairs)), [_label(k, v) for k, v in pairs] if p == 0 else [""] * len(pairs),
                      fontsize=8)
        ax.set_title(f"{dist}, D={d}", fontsize=9)
    if im is not None:
        cb = fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.9)
        cb.set_label("log10 mean NMSE", fontsize=8)
        cb.ax.tick_params(labelsize=7)
    fig.suptitle(f"Attention output NMSE (mean) at hot window W={w0}", fontsize=10, y=1.0 + 0.25 / fig.get_figheight())
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return pathlib.Path(path)


def plot_channels(channels, path, kv_len=None, head_dim=None, max_pairs=6) -> pathlib.Path:
    """Per-channel first-order error shares (K up, V down) for the largest (or given) kv_len and head_dim;
    panels: dist (rows) x format pair (columns, at most ``max_pairs``). Outlier K channels are marked with
    red triangles and the 32-channel blocks that hold them are shaded."""
    plt = _plt()
    d = max(c["head_dim"] for c in channels) if head_dim is None else head_dim
    sel = [c for c in channels if c["head_dim"] == d]
    n = max(c["kv_len"] for c in sel) if kv_len is None else kv_len
    sel = [c for c in sel if c["kv_len"] == n]
    dists = list(dict.fromkeys(c["dist"] for c in sel))
    pairs = list(dict.fromkeys((c["k_format"], c["v_format"]) for c in sel))[:max_pairs]
    fig, axes = plt.subplots(len(dists), len(pairs), figsize=(3.3 * len(pairs) + 0.6, 2.6 * len(dists) + 0.7),
                             squeeze=False, sharex=True)
    for i, dist in enumerate(dists):
        for j, (k, v) in enumerate(pairs):
            ax = axes[i][j]
            rec = next((c for c in sel if c["dist"] == dist and c["k_format"] == k and c["v_format"] == v), None)
            if rec is None:
                ax.set_visible(False)
                continue
            ks = [100 * x for x in rec["k_share"]]
            vs = [-100 * x for x in rec["v_share"]]
            for o in rec["outlier_channels"]:
                b0 = (o // 32) * 32
                ax.axvspan(b0 - 0.5, b0 + 31.5, color="0.92", zorder=0)
            ax.bar(range(len(ks)), ks, width=1.0, color="tab:blue", label="K channel")
            ax.bar(range(len(vs)), vs, width=1.0, color="tab:orange", label="V channel")
            top = max(ks + [1e-9])
            if rec["outlier_channels"]:
                ax.plot(rec["outlier_channels"], [top * 1.08] * len(rec["outlier_channels"]), "v",
                        color="tab:red", ms=4, label="outlier K channel")
            ax.axhline(0, color="k", lw=0.5)
            ax.set_title(f"{_label(k, v)}, {dist}", fontsize=9)
            ax.tick_params(labelsize=7)
            if j == 0:
                ax.set_ylabel("% of 1st-order error\n(K up, V down)", fontsize=8)
            if i == len(dists) - 1:
                ax.set_xlabel("head-dim channel", fontsize=8)
    handles, labels = [], []
    for ax in axes.ravel():
        for hh, ll in zip(*ax.get_legend_handles_labels()):
            if ll not in labels:
                handles.append(hh)
                labels.append(ll)
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    w0 = sel[0]["hot_window"] if sel else 0
    fig.suptitle(f"Per-channel sensitivity, D={d}, L={n}, W={w0} (shaded: 32-blocks holding an outlier)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return pathlib.Path(path)


def plot_all(rows, channels, out_dir) -> list[pathlib.Path]:
    """Writes error_vs_window.png, heatmap.png and (with channel records) channels.png under out_dir."""
    out_dir = pathlib.Path(out_dir)
    _plt()
    paths = [plot_error_vs_window(rows, out_dir / "error_vs_window.png"),
             plot_heatmap(rows, out_dir / "heatmap.png")]
    if channels:
        paths.append(plot_channels(channels, out_dir / "channels.png"))
    return paths
