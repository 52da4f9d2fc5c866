"""
Paper A's comparison table from bench.py's JSON: for every decoding method of every converted model, k, tokens per
forward, accuracy with its 95% interval, speedup over that run's ar, and the relative accuracy drop against the
teacher (1 - accuracy / teacher's). Reads FOLDER/bench_teacher.json (the teacher's ar) and every other
FOLDER/bench_*.json (one converted model each, named by the file); writes FOLDER/papera_table.md and, where matplotlib
exists, FOLDER/papera_sweep.png (accuracy against tokens per forward, the teacher as a line).

    python config/papera_table.py results/papera
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # run from anywhere: bench.py is one level up

from cli import fail
from decode import Method
from report import fmt, interval


def read(path):
    try:
        res = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        fail(f"{path}: not a bench.py JSON result ({e})")
    if not isinstance(res, dict) or not isinstance(res.get("methods"), dict):
        fail(f'{path}: not a bench.py JSON result (no "methods")')
    return res


def k_of(method, r):
    """Tokens one forward may emit: 1 for ar, K for static/verified, "<=k_max" for ConfAdapt (adaptive)."""
    parsed = Method.parse(method)
    if parsed.kind == "ar":
        return "1"
    if parsed.kind == "confadapt":
        return f"<={r['k_max']}"
    return str(parsed.k)


def rows(name, res, teacher_acc):
    out = []
    for method, r in res["methods"].items():
        acc = r["accuracy"]
        drop = f"{100 * (1 - acc / teacher_acc):+.1f}%" if acc is not None and teacher_acc else "-"
        label = " (LOSSY)" if r["lossy"] else ""
        out.append(f"| {name} | {method}{label} | {k_of(method, r)} | {r['tokens_per_forward']:.2f} | "
                   f"{'-' if acc is None else f'{acc:.3f}'} | {interval(r)} | {fmt(r['speedup'], '.2f')}x | "
                   f"{r['exact_match']:.2f} | {drop} |")
    return out


def plot(runs, teacher, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, res in runs.items():
        points = sorted((r["tokens_per_forward"], r["accuracy"], r["accuracy_ci95"], m)
                        for m, r in res["methods"].items() if r["accuracy"] is not None)
        ax.errorbar([p[0] for p in points], [p[1] for p in points],
                    yerr=[[p[1] - p[2][0] for p in points], [p[2][1] - p[1] for p in points]],
                    fmt="o", capsize=3, label=name)
        for x, y, _, m in points:
            ax.annotate(m, (x, y), textcoords="offset points", xytext=(4, -8), fontsize=6)
    if teacher is not None:
        ax.axhline(teacher, color="grey", linestyle="--", linewidth=1, label="teacher ar")
        ax.axhline(0.95 * teacher, color="grey", linestyle=":", linewidth=1, label="teacher -5%")
    ax.set_xlabel("tokens per forward")
    ax.set_ylabel("accuracy (95% interval)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Paper A on synthetic math: accuracy against tokens per forward")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        fail("usage: python config/papera_table.py FOLDER (holding bench_teacher.json and bench_*.json)")
    folder = Path(argv[0])
    if not (folder / "bench_teacher.json").is_file():
        fail(f"{folder}: no bench_teacher.json")
    teacher = read(folder / "bench_teacher.json")["methods"].get("ar")
    if teacher is None:
        fail(f"{folder / 'bench_teacher.json'}: holds no ar result")
    runs = {p.stem.removeprefix("bench_"): read(p) for p in sorted(folder.glob("bench_*.json"))
            if p.name != "bench_teacher.json"}
    t_acc = teacher["accuracy"]
    md = [f"Teacher (ar): accuracy {'-' if t_acc is None else f'{t_acc:.3f}'} (95% {interval(teacher)}), "
          f"{teacher.get('scored', 0)} problems. Speedup: tokens/s over the same run's ar; drop: relative to the "
          f"teacher's accuracy.", "",
          "| model | method | k | tokens/forward | accuracy | acc 95% | speedup | exact vs own ar | drop vs teacher |",
          "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, res in runs.items():
        md += rows(name, res, t_acc)
    (folder / "papera_table.md").write_text("\n".join(md) + "\n")
    drawn = plot(runs, t_acc, folder / "papera_sweep.png")
    print(f"wrote {folder / 'papera_table.md'}" + (f" and {folder / 'papera_sweep.png'}" if drawn else
                                                      " (no matplotlib: no plot)"))


if __name__ == "__main__":
    main()
