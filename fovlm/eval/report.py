"""Multiple-choice results per benchmark, mode and category: accumulation, JSON, a table, TensorBoard.

Accuracy is counted with torchmetrics (``MulticlassAccuracy`` over option indices, micro-averaged, i.e. the
share of questions whose lowest-NLL option is the answer). The JSON layout follows the fVLM original's
results file: ``{benchmark: {mode: {accuracy, correct, total, per_category: {cat: {accuracy, correct, total}}}}}``;
validation losses per mode and source sit under the reserved key ``"val_loss"`` when present. Benchmarks
whose questions say where the answer is shown also get ``attention_share`` (the mean share of the mode's
query attention inside that region, :mod:`fovlm.eval.looking`) next to each accuracy.
"""

from __future__ import annotations

import io
import json
import math
from collections import defaultdict
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torchmetrics.classification import MulticlassAccuracy

# Options are labelled A, B, C, ...: 26 is the most a question can have.
MAX_OPTIONS = 26
MODES = ("coarse_only", "coarse_fine", "autoregressive")


class MultipleChoiceReport:
    """Accumulates per-question predictions and per-source losses; computes and renders the results.

    Args:
        num_classes: largest number of options a question may have.
    """

    def __init__(self, num_classes: int = MAX_OPTIONS) -> None:
        self.num_classes = num_classes
        self._metrics: dict[tuple[str, str, str | None], MulticlassAccuracy] = {}
        self._counts: dict[tuple[str, str, str | None], list[int]] = defaultdict(lambda: [0, 0])
        self._loss: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0])
        self._shares: dict[tuple[str, str, str | None], list[float]] = defaultdict(lambda: [0.0, 0.0])

    def _metric(self, key: tuple[str, str, str | None]) -> MulticlassAccuracy:
        if key not in self._metrics:
            self._metrics[key] = MulticlassAccuracy(num_classes=self.num_classes, average="micro")
        return self._metrics[key]

    def update(self, benchmark: str, mode: str, category: str | None, prediction: int, answer: int) -> None:
        """Record one scored question (``prediction`` and ``answer`` are option indices)."""
        if not 0 <= answer < self.num_classes or not 0 <= prediction < self.num_classes:
            raise ValueError(f"option index out of range 0..{self.num_classes - 1}: {prediction=}, {answer=}")
        pred, target = torch.tensor([prediction]), torch.tensor([answer])
        for key in ((benchmark, mode, None), (benchmark, mode, category or "all")):
            self._metric(key).update(pred, target)
            self._counts[key][0] += int(prediction == answer)
            self._counts[key][1] += 1

    def update_share(self, benchmark: str, mode: str, category: str | None, share: float) -> None:
        """Record one question's attention share inside its answer region (a nan share is left out)."""
        if math.isnan(share):
            return
        for key in ((benchmark, mode, None), (benchmark, mode, category or "all")):
            self._shares[key][0] += float(share)
            self._shares[key][1] += 1

    def update_loss(self, mode: str, source: str, nll_sum: float, tokens: float) -> None:
        """Add a summed token NLL over ``tokens`` scored tokens of one source in one mode."""
        entry = self._loss[(mode, source)]
        entry[0] += float(nll_sum)
        entry[1] += float(tokens)

    def compute(self) -> dict:
        """The nested results dict (see the module docstring)."""
        results: dict = {}
        for (benchmark, mode, category), metric in sorted(self._metrics.items(), key=lambda kv: str(kv[0])):
            correct, total = self._counts[(benchmark, mode, category)]
            entry = {"accuracy": float(metric.compute()), "correct": correct, "total": total}
            share_sum, shares = self._shares.get((benchmark, mode, category), (0.0, 0))
            if shares:
                entry["attention_share"] = share_sum / shares
            node = results.setdefault(benchmark, {}).setdefault(mode, {"per_category": {}})
            if category is None:
                node.update(entry)
            else:
                node["per_category"][category] = entry
        if self._loss:
            val = results.setdefault("val_loss", {})
            for (mode, source), (nll, tokens) in sorted(self._loss.items()):
                val.setdefault(mode, {})[source] = nll / tokens if tokens else float("nan")
        return results

    def write_json(self, path: str | Path) -> Path:
        """Write :meth:`compute` as indented JSON (parent folders created); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.compute(), indent=2) + "\n")
        return path

    def log_to(self, writer, step: int = 0) -> None:
        """Log accuracies (``eval/<benchmark>/<mode>/accuracy`` and per category) and losses to TensorBoard.

        Args:
            writer: a ``torch.utils.tensorboard.SummaryWriter`` (Lightning's ``TensorBoardLogger.experiment``).
            step: global step for the scalars.
        """
        for benchmark, modes in self.compute().items():
            if benchmark == "val_loss":
                for mode, sources in modes.items():
                    for source, loss in sources.items():
                        writer.add_scalar(f"val/loss/{mode}/{source}", loss, step)
                continue
            for mode, entry in modes.items():
                writer.add_scalar(f"eval/{benchmark}/{mode}/accuracy", entry["accuracy"], step)
                if "attention_share" in entry:
                    writer.add_scalar(f"eval/{benchmark}/{mode}/attention_share", entry["attention_share"], step)
                for category, cat_entry in entry["per_category"].items():
                    writer.add_scalar(f"eval/{benchmark}/{mode}/{category}", cat_entry["accuracy"], step)
                    if "attention_share" in cat_entry:
                        writer.add_scalar(f"eval/{benchmark}/{mode}/{category}/attention_share",
                                          cat_entry["attention_share"], step)

    def table(self, per_category: bool = False) -> str:
        """Accuracy (%) per benchmark (rows) and mode (columns), optionally one row per category, as text."""
        results = self.compute()
        modes = [m for m in MODES if any(m in v for b, v in results.items() if b != "val_loss")]
        modes += sorted({m for b, v in results.items() if b != "val_loss" for m in v} - set(modes))
        table = Table(title="multiple-choice accuracy (%); attention share: % of the queries' attention in the "
                            "answer's region")
        table.add_column("benchmark")
        for mode in modes:
            table.add_column(mode, justify="right")
        table.add_column("questions", justify="right")
        for benchmark, by_mode in results.items():
            if benchmark == "val_loss":
                continue
            rows = [(benchmark, None)]
            if per_category:
                cats = sorted({c for e in by_mode.values() for c in e["per_category"]})
                rows += [(f"  {c}", c) for c in cats]
            for label, category in rows:
                entries = [_entry(by_mode, mode, category) for mode in modes]
                cells = ["-" if e is None else f"{100 * e['accuracy']:.1f}" for e in entries]
                table.add_row(label, *cells, str(max((e["total"] for e in entries if e is not None), default=0)))
                if any(e is not None and "attention_share" in e for e in entries):
                    shares = ["-" if e is None or "attention_share" not in e else f"{100 * e['attention_share']:.1f}"
                              for e in entries]
                    table.add_row(f"{label} attention share", *shares, "")
        if "val_loss" in results:
            for source in sorted({s for v in results["val_loss"].values() for s in v}):
                cells = [
                    "-" if source not in results["val_loss"].get(m, {}) else f"{results['val_loss'][m][source]:.4f}"
                    for m in modes
                ]
                table.add_row(f"val loss {source}", *cells, "")
        console = Console(width=160, record=True, file=io.StringIO())
        console.print(table)
        return console.export_text()


def _entry(by_mode: dict, mode: str, category: str | None) -> dict | None:
    entry = by_mode.get(mode)
    if entry is not None and category is not None:
        entry = entry["per_category"].get(category)
    return entry


def markdown_table(results: dict) -> str:
    """A GitHub-markdown accuracy table (benchmarks x modes) from :meth:`MultipleChoiceReport.compute` output."""
    benchmarks = [b for b in results if b != "val_loss"]
    modes = [m for m in MODES if any(m in results[b] for b in benchmarks)]
    lines = ["| benchmark | " + " | ".join(modes) + " | questions |", "|---" * (len(modes) + 2) + "|"]
    for benchmark in benchmarks:
        cells = [
            f"{100 * results[benchmark][m]['accuracy']:.1f}" if m in results[benchmark] else "-" for m in modes
        ]
        total = max(e["total"] for e in results[benchmark].values())
        lines.append(f"| {benchmark} | " + " | ".join(cells) + f" | {total} |")
        if any("attention_share" in e for e in results[benchmark].values()):
            shares = [f"{100 * results[benchmark][m]['attention_share']:.1f}"
                      if "attention_share" in results[benchmark].get(m, {}) else "-" for m in modes]
            lines.append(f"| {benchmark}: attention share in the answer region (%) | " + " | ".join(shares) + " | |")
    return "\n".join(lines) + "\n"
