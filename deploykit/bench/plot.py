"""``results.png``: throughput and latency against concurrency (matplotlib, the ``bench`` extra;
``deploykit bench`` checks that it is there before measuring anything)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from deploykit.bench.results import BenchResult
from deploykit.errors import UsageError

INSTALL_HINT = "install the plotting extra: pip install 'deploykit[bench]' (make setup does it)"


def require_matplotlib() -> None:
    """Refuse before measuring when the picture could not be drawn afterwards."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError(
            "deploykit bench draws results.png with matplotlib, which is missing", INSTALL_HINT
        ) from None


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _axes_concurrency(ax: Any, concurrency: Sequence[int]) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    if not concurrency:
        ax.text(0.5, 0.5, "nothing measured", ha="center", va="center", transform=ax.transAxes)
        return
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(concurrency))
    ax.set_xticklabels([str(c) for c in concurrency])
    ax.set_xlabel("concurrent requests")
    ax.grid(True, which="major", alpha=0.3)


_STYLE = {"mqtt": ("MQTT", "tab:blue", "o"), "direct": ("direct HTTP", "tab:orange", "s")}


def bench_png(r: BenchResult, out: Path) -> Path:
    """Two panels against concurrency: output tokens/s; latency p50, p95 and TTFT p50."""
    plt = _pyplot()
    fig, (tput, lat) = plt.subplots(1, 2, figsize=(11, 4.2))
    cs = r.concurrencies
    for path, (name, color, marker) in _STYLE.items():
        runs = [x for c in cs if (x := r.run(path, c)) is not None]
        if not runs:
            continue
        xs = [x.concurrency for x in runs]
        tput.plot(xs, [x.run.tps for x in runs], marker=marker, color=color, label=name)
        for q, style, what in ((50, "-", "p50"), (95, "--", "p95")):
            ys = [x.run.latency(q) for x in runs]
            pts = [(c, y) for c, y in zip(xs, ys, strict=True) if y is not None]
            if pts:
                lat.plot(
                    *zip(*pts, strict=True),
                    style,
                    marker=marker,
                    color=color,
                    label=f"{name} latency {what}",
                )
        ttft = [(x.concurrency, x.run.ttft(50)) for x in runs if x.run.ttft(50) is not None]
        if ttft:
            lat.plot(
                *zip(*ttft, strict=True), ":", marker=marker, color=color, label=f"{name} TTFT p50"
            )
    tput.set_ylabel("output tokens/s")
    tput.set_title("throughput")
    lat.set_ylabel("seconds")
    lat.set_title("latency")
    for ax in (tput, lat):
        _axes_concurrency(ax, cs)
    tput.set_ylim(bottom=0)
    lat.set_ylim(bottom=0)
    s = r.stack
    fig.suptitle(
        f"deploykit bench: {s['name']} ({s['quant']} on {s['gpu_class']}, model {s['model']}), "
        f"{r.settings['max_tokens']} output tokens, streamed"
        + (" (interrupted)" if r.interrupted else ""),
        fontsize=10,
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def methods_png(results: dict[str, BenchResult], out: Path) -> Path:
    """One line per method (the MQTT path): output tokens/s and p50 latency against concurrency."""
    plt = _pyplot()
    fig, (tput, lat) = plt.subplots(1, 2, figsize=(11, 4.2))
    cs = sorted({c for r in results.values() for c in r.concurrencies})
    for method, r in results.items():
        runs = [x for c in r.concurrencies if (x := r.run("mqtt", c)) is not None]
        if not runs:
            continue
        xs = [x.concurrency for x in runs]
        tput.plot(xs, [x.run.tps for x in runs], marker="o", label=method)
        pts = [(x.concurrency, x.run.latency(50)) for x in runs if x.run.latency(50) is not None]
        if pts:
            lat.plot(*zip(*pts, strict=True), marker="o", label=method)
    tput.set_ylabel("output tokens/s (MQTT)")
    tput.set_title("throughput by method")
    lat.set_ylabel("p50 latency, s (MQTT)")
    lat.set_title("latency by method")
    for ax in (tput, lat):
        _axes_concurrency(ax, cs)
        ax.set_ylim(bottom=0)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
