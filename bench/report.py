"""The benchmark's report: per-backend numbers as ratios to `inprocess`, written as Markdown, JSON and a plot."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RATIO_KEYS = ("tokens_per_s", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s")
COLORS = {
    "transformers": "#888",
    "inprocess": "#2a6",
    "grpc": "#36c",
    "dist": "#c63",
    "grpc@2": "#69e",
    "dist@2": "#e96",
}


@dataclass
class BenchReport:
    meta: dict[str, Any]
    workload: dict[str, Any]
    backends: dict[str, dict[str, Any]] = field(default_factory=dict)

    def ratios(self) -> None:
        """Adds `<key>_vs_inprocess` to every backend's summary, when `inprocess` ran."""
        base = self.backends.get("inprocess")
        if not base:
            return
        for b in self.backends.values():
            for k in RATIO_KEYS:
                b[f"{k}_vs_inprocess"] = b[k] / base[k] if base[k] else float("nan")


def render_markdown(report: BenchReport) -> str:
    m, w = report.meta, report.workload
    lines = [
        f"Model `{m['family']}` {m['layers']} layers, hidden {m['hidden']}, {m['experts']} experts top-"
        f"{m['top_k']}, {m['dtype']}; {m['groups']} expert groups. Machine: {m['machine']}, "
        f"{m['cpus']} CPUs, torch {m['torch']}: {m['torch_threads']} threads in process; the cluster's router "
        f"{m.get('router_threads', '?')}, each expert replica {m['expert_threads']}. {m['date']}.",
        f"Workload: {w['requests']} requests, prompts {w['prompt_len'][0]}–{w['prompt_len'][1]}, outputs "
        f"{w['output_len'][0]}–{w['output_len'][1]} tokens, "
        + (f"Poisson {w['rate']} req/s" if w["rate"] else f"{w['concurrency']} concurrent")
        + f", seed {w['seed']}."
        + (
            f" Medians of {m['rounds']} rounds, the backends' order alternating."
            if m.get("rounds", 1) > 1
            else ""
        ),
        "",
        "| backend | output tok/s | × in-process | TTFT p50 / p99 (s) | × | TPOT p50 / p99 (ms) | × "
        "| same tokens |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, b in report.backends.items():
        lines.append(
            f"| {name} | {b['tokens_per_s']:.1f} | {_x(b, 'tokens_per_s')} "
            f"| {b['ttft_p50_s']:.2f} / {b['ttft_p99_s']:.2f} | {_x(b, 'ttft_p50_s')} "
            f"| {b['tpot_p50_s'] * 1e3:.1f} / {b['tpot_p99_s'] * 1e3:.1f} | {_x(b, 'tpot_p50_s')} "
            f"| {b.get('same_tokens_as_inprocess', float('nan')):.0%} |"
        )
    inprocess = report.backends.get("inprocess", {})
    return "\n".join(lines + _roofline_lines(inprocess) + _scaling_lines(inprocess, m["top_k"])) + "\n"


def _roofline_lines(inprocess: dict[str, Any]) -> list[str]:
    roof = inprocess.get("roofline")
    if not roof:
        return []
    return [
        "",
        f"Roofline (in-process): read bandwidth {roof['bandwidth_gb_s']:.1f} GB/s; a full decode step "
        f"(batch {roof['batch']:.0f}) touches {roof['bytes_per_step_median'] / 1e6:.0f} MB: floor "
        f"{roof['floor_ms_median']:.1f} ms, measured {roof['step_ms_median']:.1f} ms (median of "
        f"{roof['decode_steps']} steps) → **{roof['fraction']:.0%} of the roofline**.",
    ]


def _scaling_lines(inprocess: dict[str, Any], top_k: int) -> list[str]:
    sc = inprocess.get("scaling")
    if not sc:
        return []
    pairs = ", ".join(
        f"{e} experts {t:.1f} tok/s" for e, t in zip(sc["experts"], sc["tokens_per_s"], strict=True)
    )
    return ["", f"MoE scaling (in-process, 1 stream, top-{top_k}): {pairs} → drop {sc['drop']:.1%}."]


def _x(b: dict, key: str) -> str:
    v = b.get(f"{key}_vs_inprocess")
    return "–" if v is None else f"{v:.2f}×"


def write_plot(report: BenchReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report.backends)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    specs = [
        ("tokens_per_s", 1.0, "output tokens/s", None),
        ("ttft_p50_s", 1.0, "TTFT (s), p50 bar / p99 tick", "ttft_p99_s"),
        ("tpot_p50_s", 1e3, "TPOT (ms), p50 bar / p99 tick", "tpot_p99_s"),
    ]
    for ax, (key, scale, title, p99) in zip(axes, specs, strict=True):
        vals = [report.backends[n][key] * scale for n in names]
        bars = ax.bar(names, vals, color=[COLORS.get(n, "#cc3") for n in names])
        if p99:
            ax.scatter(names, [report.backends[n][p99] * scale for n in names], marker="_", s=400, c="k")
        for bar, v in zip(bars, vals, strict=True):
            ax.annotate(f"{v:.3g}", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom")
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=20)
    m = report.meta
    fig.suptitle(f"{m['family']} {m['experts']}×top-{m['top_k']} {m['dtype']} on {m['machine']}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_outputs(report: BenchReport, out: Path) -> dict[str, Path]:
    """OUT.md, OUT.json and OUT.png, by suffix."""
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = {"md": out.with_suffix(".md"), "json": out.with_suffix(".json"), "png": out.with_suffix(".png")}
    paths["md"].write_text(render_markdown(report))
    paths["json"].write_text(json.dumps(asdict(report), indent=2, default=float))
    write_plot(report, paths["png"])
    return paths
