"""The run's report (Markdown + plots) and a model card beside every artifact, from the stages' eval records.

Nothing here computes a number: every figure comes from ``eval/*.json`` and ``state.json``, so the report of a
resumed run is the same as that of an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..fileio import atomic_path

if TYPE_CHECKING:
    from .run import Pipeline
    from .state import PipelineState

MB = 1024 * 1024


@dataclass
class Row:
    """One artifact as one customer uses it."""

    customer: str
    name: str  # "merged" or the target's name
    describe: str
    size_bytes: int
    shared_note: str  # e.g. "shared base 98.1 MB + adapter 3.2 MB"
    heldout: dict[str, dict]  # customer set -> score dict
    text: dict
    reference: str
    engine: str
    path: str

    @property
    def own_loss(self) -> float:
        return self.heldout[self.customer]["nll"]


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def collect(pipeline: "Pipeline") -> tuple[dict | None, list[Row]]:
    """The base's record and one :class:`Row` per (customer, artifact) that has been evaluated."""
    cfg = pipeline.config
    base = _load(pipeline.eval_path("eval/base"))
    rows: list[Row] = []
    for c in cfg.customers:
        merged = _load(pipeline.eval_path(f"eval/{c.name}/merged"))
        if merged:
            rows.append(Row(c.name, "merged", f"float merged ({cfg.merged_dtype})", merged["size_bytes"], "",
                            merged["heldout"], merged["text"], "base", "torch", merged["path"]))
        for t in cfg.targets:
            if not t.per_customer:
                continue
            rec = _load(pipeline.eval_path(f"eval/{c.name}/{t.name}"))
            if rec:
                rows.append(Row(c.name, t.name, rec["describe"], rec["size_bytes"], "", rec["heldout"], rec["text"],
                                rec["reference"], rec["engine"], rec["path"]))
    for t in cfg.targets:
        if t.per_customer:
            continue
        rec = _load(pipeline.eval_path(f"eval/{t.name}"))
        if not rec:
            continue
        for name in [c.name for c in cfg.customers if c.name in rec["per_customer"]]:
            part = rec["per_customer"][name]
            size = rec["base_bytes"] + part["adapter_bytes"]
            note = f"shared base {rec['base_bytes'] / MB:.1f} MB + adapter {part['adapter_bytes'] / MB:.1f} MB"
            rows.append(Row(name, t.name, rec["describe"], size, note, part["heldout"], part["text"],
                            f"{name} merged", rec["engine"], rec["path"]))
    return base, rows


def write_report(pipeline: "Pipeline", state: "PipelineState", order: list[str]) -> Path:
    """Write report.md, its plots and the model cards; ``order``: the stage ids in plan order."""
    out = pipeline.out / "report"
    out.mkdir(parents=True, exist_ok=True)
    base, rows = collect(pipeline)
    plots = _plots(pipeline, base, rows, out)
    text = _markdown(pipeline, state, base, rows, plots, order)
    path = out / "report.md"
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    _model_cards(pipeline, base, rows)
    return path


# --- checks ------------------------------------------------------------------------------------------
def specialisation(base: dict | None, rows: list[Row], customers: list[str]) -> list[dict]:
    """Per customer set: how much each customer's merged adapter lowered that set's held-out loss vs the base;
    ``ok`` when the set's own customer's adapter lowered it most."""
    merged = {r.customer: r for r in rows if r.name == "merged"}
    if base is None or any(c not in merged for c in customers):
        return []
    checks = []
    for c in customers:
        before = base["heldout"][c]["nll"]
        gains = {m: before - merged[m].heldout[c]["nll"] for m in customers}
        best_other = max((g for m, g in gains.items() if m != c), default=float("-inf"))
        checks.append({"set": c, "base": before, "own_gain": gains[c], "best_other_gain": best_other,
                       "ok": gains[c] > best_other})
    return checks


# --- markdown ------------------------------------------------------------------------------------------
def _markdown(pipeline: "Pipeline", state: "PipelineState", base: dict | None, rows: list[Row], plots: dict,
              order: list[str]) -> str:
    cfg = pipeline.config
    ft = cfg.finetune
    customers = [c.name for c in cfg.customers]
    lines = [
        "# holdall pipeline report",
        "",
        f"- **base**: `{cfg.base}` ({pipeline.source.kind})",
        f"- **fine-tune**: {ft.method}, r={ft.r}, alpha={ft.alpha}, "
        f"{f'{ft.max_steps} steps' if ft.max_steps else f'{ft.epochs} epoch(s)'}, lr {ft.lr}, max_len {ft.max_len}"
        f"{', packed' if ft.packing else ''}; {ft.eval_fraction:.0%} of each customer's records held out (seed {ft.seed})",
        "- **customers**: " + ", ".join(f"{c.name} (`{Path(c.data).name}`)" for c in cfg.customers),
        "- **targets**: " + (", ".join(f"{t.name} ({t.describe()})" for t in cfg.targets) or "none (merged models only)"),
        f"- **general text**: {cfg.eval.max_windows} x {cfg.eval.seq_len}-token windows of `{Path(cfg.eval.text_path()).name}`",
        f"- **machine**: {platform.machine()}, {os.cpu_count()} CPUs, {platform.python_implementation()} "
        f"{platform.python_version()}, {_torch_version()}; report written {time.strftime('%Y-%m-%d %H:%M %Z')}",
        "",
    ]
    if pipeline.source.kind == "gguf":
        lines += ["> The base was loaded from a GGUF file. If that file is itself quantized (SmolLM2's ships as "
                  "Q4_1), its dequantized weights are the \"float\" base here: every artifact is quantized once "
                  "from them.", ""]
    if pipeline.source.kind == "holdall":
        lines += ["> **force**: the base was already holdall-quantized; it was dequantized once and every artifact "
                  "below is rounded a second time.", ""]
    lines += _heldout_section(base, rows, customers, plots)
    lines += _artifact_section(base, rows, plots)
    lines += _usage_section(pipeline, rows)
    lines += _timing_section(state, order)
    return "\n".join(lines) + "\n"


def _heldout_section(base, rows, customers, plots) -> list[str]:
    merged = {r.customer: r for r in rows if r.name == "merged"}
    lines = ["## Held-out loss per customer", "",
             "Mean loss (nats/token) on each customer's held-out records, response tokens only. Rows: the base and "
             "each customer's merged model; bold: a customer's own records.", "",
             "| model | " + " | ".join(customers) + " |", "|---|" + "---|" * len(customers)]
    if base:
        lines.append("| base | " + " | ".join(f"{base['heldout'][c]['nll']:.4f}" for c in customers) + " |")
    for m in customers:
        if m in merged:
            cells = [f"**{merged[m].heldout[c]['nll']:.4f}**" if c == m else f"{merged[m].heldout[c]['nll']:.4f}"
                     for c in customers]
            lines.append(f"| {m} adapter (merged) | " + " | ".join(cells) + " |")
    lines.append("")
    checks = specialisation(base, rows, customers)
    if checks:
        for ch in checks:
            mark = "yes" if ch["ok"] else "**no**"
            lines.append(f"- {ch['set']}'s records: its own adapter lowers the loss by {ch['own_gain']:.4f} "
                         f"(best other adapter: {ch['best_other_gain']:.4f}) — own adapter best: {mark}")
        lines.append("")
    if "matrix" in plots:
        lines += [f"![held-out loss matrix]({plots['matrix']})", ""]
    return lines


def _artifact_section(base, rows, plots) -> list[str]:
    base_ppl = f"{base['text']['ppl']:.3f}" if base else "n/a"
    lines = ["## Artifacts", "",
             f"Own held-out loss, perplexity on general text (the base: {base_ppl}) and KL divergence to the reference "
             "on the same text (merged models: vs the base, i.e. what the adapter changed; quantized artifacts: vs "
             "the customer's float merged model, i.e. what quantization cost).", "",
             "| customer | artifact | what | size MB | own held-out loss | vs merged | PPL | KLD | KLD vs | scored by |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    merged = {r.customer: r for r in rows if r.name == "merged"}
    for r in rows:
        delta = ""
        if r.name != "merged" and r.customer in merged:
            delta = f"{(r.own_loss / merged[r.customer].own_loss - 1) * 100:+.2f}%"
        kld = r.text.get("kld_mean")
        size = f"{r.size_bytes / MB:.1f}" + (f" ({r.shared_note})" if r.shared_note else "")
        lines.append(f"| {r.customer} | {r.name} | {r.describe} | {size} | {r.own_loss:.4f} | {delta} | "
                     f"{r.text['ppl']:.3f} | {'' if kld is None else f'{kld:.4f}'} | {r.reference} | {r.engine} |")
    lines.append("")
    if "quality" in plots:
        lines += [f"![quality vs size]({plots['quality']})", ""]
    return lines


def _usage_section(pipeline: "Pipeline", rows: list[Row]) -> list[str]:
    lines = ["## Using the artifacts", ""]
    for t in pipeline.config.targets:
        if t.kind == "gguf":
            example = next((r for r in rows if r.name == t.name), None)
            if example:
                lines.append(f"- **{t.name}**: `llama-cli -m {example.path} -cnv` (llama.cpp, Ollama and LM Studio load "
                             "the file as is); `holdall eval FILE.gguf` scores it again")
        elif t.kind == "quantize":
            lines.append(f"- **{t.name}**: `holdall.load_model(\"{pipeline.artifact_dir(t, '<customer>')}\")`, or "
                         f"`holdall serve {pipeline.artifact_dir(t, '<customer>')}`")
        else:
            d = pipeline.artifact_dir(t)
            adapters = " ".join(f"--adapter {c.name}={d / 'adapters' / c.name}" for c in pipeline.config.customers)
            lines.append(f"- **{t.name}**: one server for every customer — `holdall serve {d / 'base'} {adapters}` "
                         "(the request's `model` field picks the customer)")
    lines.append("")
    return lines


def _timing_section(state: "PipelineState", order: list[str]) -> list[str]:
    lines = ["## Wall time per stage", "", "(of the run that did the stage; a resumed run keeps the earlier times)", "",
             "| stage | seconds | finished |", "|---|---|---|"]
    total = 0.0
    for stage_id in order:
        record = state.stages.get(stage_id)
        if record is None:
            continue
        lines.append(f"| {stage_id} | {record.seconds:.1f} | {record.finished} |")
        total += record.seconds
    lines += [f"| **total** | **{total:.1f}** | |", ""]
    return lines


def _torch_version() -> str:
    import torch

    return f"torch {torch.__version__}"


# --- plots -------------------------------------------------------------------------------------------
def _figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def _plots(pipeline: "Pipeline", base: dict | None, rows: list[Row], out: Path) -> dict[str, str]:
    plots = {}
    if rows:
        _quality_plot(pipeline, base, rows, out / "quality_vs_size.png")
        plots["quality"] = "quality_vs_size.png"
    customers = [c.name for c in pipeline.config.customers]
    merged = {r.customer: r for r in rows if r.name == "merged"}
    if base and all(c in merged for c in customers):
        _matrix_plot(base, merged, customers, out / "heldout_matrix.png")
        plots["matrix"] = "heldout_matrix.png"
    return plots


def _quality_plot(pipeline: "Pipeline", base: dict | None, rows: list[Row], path: Path) -> None:
    fig = _figure(11, 4.2)
    ax_loss, ax_ppl = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    names = list(dict.fromkeys(r.name for r in rows))
    markers = dict(zip(names, "osD^v<>p*hX"))
    customers = [c.name for c in pipeline.config.customers]
    colors = {c: f"C{i}" for i, c in enumerate(customers)}
    for r in rows:
        kw = dict(marker=markers.get(r.name, "o"), color=colors[r.customer], s=40)
        ax_loss.scatter(r.size_bytes / MB, r.own_loss, **kw)
        ax_ppl.scatter(r.size_bytes / MB, r.text["ppl"], **kw)
    if base:
        ax_ppl.axhline(base["text"]["ppl"], color="gray", linestyle="--", linewidth=1, label="base")
        for c in customers:
            ax_loss.axhline(base["heldout"][c]["nll"], color=colors[c], linestyle=":", linewidth=1)
    for ax, label in ((ax_loss, "own held-out loss (nats/token)"), (ax_ppl, "perplexity on general text")):
        ax.set_xscale("log")
        ax.set_xlabel("size on disk (MB, log scale)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    handles = [ax_loss.scatter([], [], marker=markers[n], color="black", label=n) for n in names]
    handles += [ax_loss.scatter([], [], marker="s", color=colors[c], label=c) for c in customers]
    ax_loss.legend(handles=handles, fontsize=7, loc="best")
    ax_loss.set_title("customer quality vs size (dotted: base)", fontsize=9)
    ax_ppl.set_title("general text vs size", fontsize=9)
    _save(fig, path)


def _matrix_plot(base: dict, merged: dict[str, Row], customers: list[str], path: Path) -> None:
    fig = _figure(1.6 + 1.3 * len(customers), 1.2 + 0.8 * (len(customers) + 1))
    ax = fig.add_subplot(1, 1, 1)
    labels = ["base"] + [f"{m} adapter" for m in customers]
    values = [[base["heldout"][c]["nll"] for c in customers]]
    values += [[merged[m].heldout[c]["nll"] for c in customers] for m in customers]
    image = ax.imshow(values, cmap="viridis_r", aspect="auto")
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white" if v > sum(map(sum, values)) / sum(map(len, values)) else "black", fontsize=8)
    ax.set_xticks(range(len(customers)), [f"{c} records" for c in customers], fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    fig.colorbar(image, ax=ax, label="held-out loss")
    _save(fig, path)


# --- model cards -------------------------------------------------------------------------------------
def _model_cards(pipeline: "Pipeline", base: dict | None, rows: list[Row]) -> None:
    by_dir: dict[Path, list[Row]] = {}
    for r in rows:
        path = Path(r.path)
        folder = path.parent if path.is_file() else path
        by_dir.setdefault(folder, []).append(r)
    for folder, group in by_dir.items():
        if folder.is_dir():
            with atomic_path(folder / "README.md") as tmp:
                tmp.write_text(_card(pipeline, base, group), encoding="utf-8")


def _card(pipeline: "Pipeline", base: dict | None, rows: list[Row]) -> str:
    cfg = pipeline.config
    ft = cfg.finetune
    first = rows[0]
    tags = ["holdall", ft.method, "lora"]
    target = next((t for t in cfg.targets if t.name == first.name), None)
    if target is not None:
        tags += [target.kind] + ([target.type] if target.type else [])
    customers = ", ".join(sorted({r.customer for r in rows}))
    if target is not None and target.kind == "adapters":
        how = (f"{ft.method.upper()} adapters (r={ft.r}, alpha={ft.alpha}), one per customer ({customers}), kept "
               f"unmerged beside one {target.base} copy of the base `{cfg.base}`: `holdall serve` hosts them all, "
               "and a request's `model` field picks the customer.")
    else:
        how = (f"a {ft.method.upper()} adapter (r={ft.r}, alpha={ft.alpha}) trained on {customers}'s data, merged "
               f"into the float base `{cfg.base}` at full precision" + ("" if target is None else ", then quantized once")
               + ".")
    lines = ["---", f"base_model: {cfg.base}", "library_name: " + ("gguf" if "gguf" in tags else "holdall"),
             "pipeline_tag: text-generation", "tags:"] + [f"- {t}" for t in tags] + ["---", "",
             f"# {first.describe} — {customers}", "",
             f"Made by `holdall pipeline`: {how}", "",
             "## Evaluation", "",
             "| customer | own held-out loss | base on the same records | perplexity (general text) | KLD | vs | size MB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        before = f"{base['heldout'][r.customer]['nll']:.4f}" if base else "n/a"
        kld = r.text.get("kld_mean")
        lines.append(f"| {r.customer} | {r.own_loss:.4f} | {before} | {r.text['ppl']:.3f} | "
                     f"{'' if kld is None else f'{kld:.4f}'} | {r.reference} | {r.size_bytes / MB:.1f} |")
    data = {c.name: Path(c.data).name for c in cfg.customers}
    lines += ["", "## Training", "",
              "- data: " + ", ".join(f"`{data[r.customer]}`" for r in rows if r.customer in data) +
              f" ({ft.eval_fraction:.0%} held out, seed {ft.seed})",
              f"- {ft.method}, {ft.max_steps or ft.epochs} {'steps' if ft.max_steps else 'epoch(s)'}, lr {ft.lr}, "
              f"max_len {ft.max_len}, optimizer {ft.optimizer}",
              "", "Scores come from the run's report (`report/report.md`); held-out loss is on response tokens only.", ""]
    return "\n".join(lines)
