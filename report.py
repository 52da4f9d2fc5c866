"""
bench.py's results for people: the tables it prints, and the markdown tables and plots it writes.

- `table`: one row per method; `batch_table`: one row per batch size.
- `write_sweep`: the ConfAdapt sweep over tau (and k_max); `write_batches`: speed against batch
  size.
- Plots need matplotlib (optional): without it only the markdown is written.
"""

import math
from pathlib import Path

from files import plural

ACCEPT_SHOWN = 4    # acceptance rates shown per table row; the rest are in the JSON


def pyplot():
    """matplotlib's pyplot on a file backend, or None: plots are optional, the tables are not."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def fmt(x, spec):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def interval(r):
    """An accuracy's 95% interval as text, "-" where there is none."""
    ci = r.get("accuracy_ci95")
    return f"{ci[0]:.3f}-{ci[1]:.3f}" if ci else "-"


def table(res):
    acc = any(r["accuracy"] is not None for r in res["methods"].values())
    nll = res["nll_key"]
    width = 5 * ACCEPT_SHOWN + 4        # the rates shown and " ..." after them
    name_width = max(15, *map(len, res["methods"]))
    head = (f"{'method':<{name_width}} {'tok/s':>8} {'speedup':>8} {'tok/fwd':>8} {'exact':>6} "
            f"{nll:>8}" + (f" {'acc':>6} {'acc 95%':>11}" if acc else "") +
            f"   {'accept (per depth)':<{width}} {'ttft ms':>8} {'wall s':>7}")
    lines = [head]
    for name, r in res["methods"].items():
        rates = r["acceptance_rate"]
        more = " ..." if len(rates) > ACCEPT_SHOWN else ""
        accept = " ".join(f"{a:.2f}" for a in rates[:ACCEPT_SHOWN]) + more
        label = ("  LOSSY" if r["lossy"] else "" if r["implementation"] == "nanoMTP"
                 else f"  ({r['implementation']})")
        lines.append(f"{name:<{name_width}} {r['tok_s']:>8.1f} {fmt(r['speedup'], '.2f') + 'x':>8} "
                     f"{fmt(r['tokens_per_forward'], '.2f'):>8} {r['exact_match']:>6.2f} "
                     f"{fmt(r[nll], '.3f'):>8}" +
                     (f" {fmt(r['accuracy'], '.3f'):>6} {interval(r):>11}" if acc else "") +
                     f"   {accept or '-':<{width}} {r['ttft_ms']:>8.1f} {r['wall_s']:>7.2f}" +
                     label)
    prompts = plural(res["num_prompts"], "prompt")
    lines.append(f"{prompts}, max_new_tokens={res['max_new_tokens']}, "
                 f"temperature={res['temperature']}, {res['device']} {res['dtype']}; tok/fwd "
                 f"excludes prefill; exact = output identical to plain greedy ar" +
                 ("; acc 95% = Wilson interval" if acc else "") +
                 ("; nll_self = NLL under the fine-tuned model itself, NOT the original"
                  if nll == "nll_self" else ""))
    over_mtp1 = [f"{name} {r['speedup_mtp1']:.2f}x" for name, r in res["methods"].items()
                 if r.get("speedup_mtp1") is not None and name != "mtp@1"]
    if over_mtp1:   # Paper B's own reference
        lines.append("speedup over mtp@1: " + " | ".join(over_mtp1))
    bare = res.get("bare_forward_ms", {})
    per_forward = [f"{name} {r['ms_per_forward']:.2f} / {bare[r['query_len']]:.2f} "
                   f"({bare[r['query_len']] / r['ms_per_forward']:.2f})"
                   for name, r in res["methods"].items() if r.get("query_len") in bare]
    if per_forward:   # the overhead every method pays on top of the model itself
        lines.append("ms per forward (wall / forwards, prefills included) / the bare forward of "
                     "the same query length (the model's own, one graph replayed back to back): " +
                     " | ".join(per_forward))
    hists = [f"{name} {' '.join(map(str, r['accepted_lengths']))}"
             for name, r in res["methods"].items() if r.get("accepted_lengths")]
    if hists:   # the acceptance histogram beside the rates: steps that accepted n = 0, 1, 2, ...
        lines.append("accepted drafts per step, steps with n = 0, 1, 2, ...: " + " | ".join(hists))
    return "\n".join(lines + res["notes"])


def sweep_method(tau, k_max=None):
    """The method name of one sweep point: ConfAdapt at tau, with the model's k_max or k_max masks +
    1."""
    return f"confadapt@{tau:g}" + (f":{k_max}" if k_max else "")


def write_sweep(res, taus, k_maxes, out):
    """The ConfAdapt sweep over tau (and k_max) as a markdown table, and where matplotlib exists a
    PNG of quality against tokens per forward, one curve per k_max. Returns notes for the table's
    footer."""
    out, nll = Path(out), res["nll_key"]
    out.mkdir(parents=True, exist_ok=True)
    curves = {k: [(f"{t:g}", res["methods"][sweep_method(t, k)]) for t in taus]
              for k in k_maxes or [None]}
    ar = res["methods"].get("ar")
    md = [f"| method | k_max | tau | tok/fwd | tok/s | speedup | exact match | accuracy | acc 95% "
          f"| {nll} |",
          "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    rows = ([("ar", "-", "-", ar)] if ar else []) + [
        (sweep_method(float(t), k), r["k_max"], t, r)
        for k, points in curves.items() for t, r in points]
    md += [f"| {name} | {k} | {t} | {r['tokens_per_forward']:.2f} | {r['tok_s']:.1f} | "
           f"{fmt(r['speedup'], '.2f')} | {r['exact_match']:.2f} | {fmt(r['accuracy'], '.3f')} | "
           f"{interval(r)} | {fmt(r[nll], '.3f')} |"
           for name, k, t, r in rows]
    (out / "sweep.md").write_text("\n".join(md) + "\n")
    plt = pyplot()
    if plt is None:
        return [f"wrote {out / 'sweep.md'} (no matplotlib: no plot)"]
    keys = [key for key in ("accuracy", "exact_match", nll)
            if any(r[key] is not None for *_, r in rows)]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.4 * len(keys), 3.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for k, points in curves.items():
            pts = [(r["tokens_per_forward"], r[key], t, r["accuracy_ci95"])
                   for t, r in points if r[key] is not None]
            label = f"k_max {points[0][1]['k_max']}"
            if key == "accuracy":    # the 95% interval as error bars
                err = [[y - ci[0] for _, y, _, ci in pts], [ci[1] - y for _, y, _, ci in pts]]
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=err, fmt="o-", capsize=3,
                            label=label)
            else:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
            for x, y, t, _ in pts:
                ax.annotate(t, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if ar and ar[key] is not None:
            ax.axhline(ar[key], color="grey", linestyle="--", linewidth=1, label="ar")
        ax.set_xlabel("tokens per forward")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("ConfAdapt (LOSSY): quality against tokens per forward, labels = tau")
    fig.tight_layout()
    fig.savefig(out / "sweep.png", dpi=120)
    plt.close(fig)
    return [f"wrote {out / 'sweep.md'} and {out / 'sweep.png'}"]


def batch_table(res):
    """One row per batch size: every method's tok/s, speedup over ar and tokens per forward."""
    methods = list(res["methods"])
    head = f"{'batch':>5}" + "".join(f"  {m + ' tok/s':>16} {'speedup':>7} {'tok/fwd':>7} "
                                     f"{'exact':>5}" for m in methods)
    lines = [head]
    for i, B in enumerate(res["batch_sizes"]):
        line = f"{B:>5}"
        for m in methods:
            r = res["methods"][m][i]
            line += (f"  {r['tok_s']:>16.1f} {fmt(r['speedup'], '.2f') + 'x':>7} "
                     f"{r['tokens_per_forward']:>7.2f} {r['exact_match']:>5.2f}")
        lines.append(line)
    lines.append(f"{res['num_prompts']} prompts repeated to fill each batch, "
                 f"max_new_tokens={res['max_new_tokens']}, temperature={res['temperature']}, "
                 f"{res['device']} {res['dtype']}; tok/s counts every row's tokens, prefill "
                 f"included; tok/fwd counts rows still decoding; exact = rows identical to plain "
                 f"greedy ar at the same batch size")
    return "\n".join(lines + res["notes"])


def write_batches(res, out):
    """Markdown table and, where matplotlib exists, tokens/s and speedup against batch size."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    methods = list(res["methods"])
    md = ["| batch | " + " | ".join(f"{m} tok/s | {m} speedup" for m in methods) + " |",
          "| ---: |" + " ---: | ---: |" * len(methods)]
    for i, B in enumerate(res["batch_sizes"]):
        rows = [res["methods"][m][i] for m in methods]
        cells = [f"{r['tok_s']:.1f} | {fmt(r['speedup'], '.2f')}" for r in rows]
        md.append(f"| {B} | " + " | ".join(cells) + " |")
    (out / "batch_sizes.md").write_text("\n".join(md) + "\n")
    plt = pyplot()
    if plt is None:
        return [f"wrote {out / 'batch_sizes.md'} (no matplotlib: no plot)"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for m in methods:
        rows = res["methods"][m]
        axes[0].plot(res["batch_sizes"], [r["tok_s"] for r in rows], "o-", label=m)
        if rows[0]["speedup"] is not None:
            axes[1].plot(res["batch_sizes"], [r["speedup"] for r in rows], "o-", label=m)
    for ax, label in zip(axes, ("tokens/s", "speedup over ar")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(res["batch_sizes"], [str(b) for b in res["batch_sizes"]])
        ax.set_xlabel("batch size")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"tokens/s against batch size ({res['device']}, {res['dtype']})")
    fig.tight_layout()
    fig.savefig(out / "batch_sizes.png", dpi=120)
    return [f"wrote {out / 'batch_sizes.md'} and {out / 'batch_sizes.png'}"]
