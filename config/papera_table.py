"""
Paper A's comparison table from bench.py's JSON, beside Paper A's own numbers: for every decoding
method of the teacher and of every converted model, k, problems, tokens per forward, accuracy with
its 95% Wilson interval, speedup, exact match against plain ar, and the relative accuracy drop
against the teacher and against the model's own ar. Reads FOLDER/bench_teacher.json and every
FOLDER/bench_MODEL[.PART].json (one bench process each; a model's parts are merged); writes
FOLDER/papera_table.md and, where matplotlib exists, FOLDER/papera_sweep.png (accuracy against
tokens per forward: one line per model, and the k_max sweep apart).

    python config/papera_table.py results/papera
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # run from anywhere

from cli import fail
from decode import Method
from report import fmt, interval

# Paper A (../shared/PAPERS.md), GSM8K accuracy @ Eff. k, Llama-3.1-8B / Qwen3-4B, ConfAdapt at
# k_max 16; "ar" of a converted model is their trained model's k=1, the teacher's their original
PAPER_A = {"teacher ar": "69.5 / 75.4", "ar": "66.0 / 89.1", "confadapt@0.9": "64.1@3.3 / 83.6@3.1",
           "confadapt@0.9:16": "64.1@3.3 / 83.6@3.1", "confadapt@0.6": "46.6@6.1 / -"}
MODELS = ("teacher", "gated", "full", "ablation")   # table order: by name prefix
KINDS = ("ar", "static", "verified", "confadapt")    # method order within a model


def read(path):
    try:
        res = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        fail(f"{path}: not a bench.py JSON result ({e})")
    if not isinstance(res, dict) or not isinstance(res.get("methods"), dict):
        fail(f'{path}: not a bench.py JSON result (no "methods")')
    return res


def models(folder):
    """{model: {method: result}}, parts merged; ar is in every part (its speedup reference): the
    first part's is kept."""
    out = {}
    for path in sorted(folder.glob("bench_*.json")):
        methods = out.setdefault(path.stem.removeprefix("bench_").split(".")[0], {})
        for m, r in read(path)["methods"].items():
            methods.setdefault(m, r)
    order = lambda name: (next((i for i, p in enumerate(MODELS) if name.startswith(p)), 9), name)
    return {name: dict(sorted(out[name].items(), key=lambda mr: method_order(mr[0])))
            for name in sorted(out, key=order)}


def method_order(method):
    p = Method.parse(method)
    return KINDS.index(p.kind) if p.kind in KINDS else 9, p.k is not None, p.k or 0, -(p.tau or 0)


def k_of(method, r):
    """Tokens one forward may emit: 1 for ar, K for static/verified, "<=k_max" for ConfAdapt."""
    p = Method.parse(method)
    return "1" if p.kind == "ar" else f"<={r['k_max']}" if p.kind == "confadapt" else str(p.k)


def drop(acc, ref):
    return f"{100 * (1 - acc / ref):+.1f}%" if acc is not None and ref else "-"


def rows(name, methods, teacher_acc):
    own = methods.get("ar", {}).get("accuracy")
    out = []
    for m, r in methods.items():
        acc = r["accuracy"]
        paper = "" if name.startswith("ablation") else PAPER_A.get(f"{name} {m}", PAPER_A.get(m))
        out.append(f"| {name} | {m}{' (LOSSY)' if r['lossy'] else ''} | {k_of(m, r)} | "
                   f"{r.get('scored', '-')} | {r['tokens_per_forward']:.2f} | {fmt(acc, '.3f')} | "
                   f"{interval(r)} | {fmt(r['speedup'], '.2f')}x | {r['exact_match']:.2f} | "
                   f"{drop(acc, teacher_acc)} | {drop(acc, own)} | {paper or ''} |")
    return out


def plot(runs, teacher, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax, kx) = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    for i, (name, methods) in enumerate(runs.items()):
        lines, ar = {}, methods.get("ar")   # ConfAdapt points per k_max (None: the model's)
        for m, r in methods.items():
            p = Method.parse(m)
            if r["accuracy"] is None:
                continue
            if p.kind in ("static", "verified"):   # no tau: points of their own, off the lines
                ax.plot(r["tokens_per_forward"], r["accuracy"], "s" if p.kind == "static" else "^",
                        color=f"C{i}", markersize=5)
            elif p.kind == "confadapt":
                lines.setdefault(p.k, []).append(r)
        for j, (k, points) in enumerate(lines.items()):
            points = sorted(points + ([ar] if ar and ar["accuracy"] is not None else []),
                            key=lambda r: r["tokens_per_forward"])
            x, y = [r["tokens_per_forward"] for r in points], [r["accuracy"] for r in points]
            err = [[r["accuracy"] - r["accuracy_ci95"][0] for r in points],
                   [r["accuracy_ci95"][1] - r["accuracy"] for r in points]]
            target, label, c = (ax, name, f"C{i}") if k is None else (kx, f"{name}, k_max {k}",
                                                                     f"C{j}")
            target.errorbar(x, y, yerr=err, fmt="o-", capsize=2, markersize=3, label=label, color=c)
    for a, title in ((ax, "ar + ConfAdapt tau sweep per model (squares static, triangles "
                      "verified)"), (kx, "k_max sweep (fewer problems)")):
        if teacher is not None:
            a.axhline(teacher, color="grey", linestyle="--", linewidth=1, label="teacher ar")
            a.axhline(0.95 * teacher, color="grey", linestyle=":", linewidth=1, label="teacher -5%")
        a.set_xlabel("tokens per forward")
        a.set_title(title, fontsize=9)
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    ax.set_ylabel("accuracy (95% interval)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        fail("usage: python config/papera_table.py FOLDER (holding bench_teacher.json and "
             "bench_*.json)")
    folder = Path(argv[0])
    if not (folder / "bench_teacher.json").is_file():
        fail(f"{folder}: no bench_teacher.json")
    runs = models(folder)
    teacher = runs["teacher"].get("ar")
    if teacher is None:
        fail(f"{folder / 'bench_teacher.json'}: holds no ar result")
    device = read(folder / "bench_teacher.json").get("device", "one device")
    md = [f"Teacher (ar): accuracy {fmt(teacher['accuracy'], '.3f')} (95% {interval(teacher)}), "
          f"{teacher.get('scored', 0)} problems. Speedup: tokens/s over the ar of the same bench "
          f"process; the benches ran side by side on {device}, so speedups are under shared load "
          "(accuracy and tokens/forward are not affected). Drops are relative. Paper A: GSM8K "
          "accuracy @ Eff. k, Llama-3.1-8B / Qwen3-4B, k_max 16 (ours 8 unless :K); their "
          "ablations (soft, ground-truth targets) did worse than hard teacher targets.", "",
          "| model | method | k | problems | tokens/forward | accuracy | acc 95% | speedup | "
          "exact vs own ar | drop vs teacher | drop vs own ar | Paper A |",
          "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, methods in runs.items():
        md += rows(name, methods, teacher["accuracy"])
    (folder / "papera_table.md").write_text("\n".join(md) + "\n")
    drawn = plot({n: m for n, m in runs.items() if n != "teacher"}, teacher["accuracy"],
                 folder / "papera_sweep.png")
    print(f"wrote {folder / 'papera_table.md'}" + (f" and {folder / 'papera_sweep.png'}" if drawn
                                                      else " (no matplotlib: no plot)"))


if __name__ == "__main__":
    main()
