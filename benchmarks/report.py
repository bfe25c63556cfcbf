"""Turn a saved pytest-benchmark run into plots and a markdown table of ratios.

    python benchmarks/report.py benchmarks/results/full.json
    python benchmarks/report.py a.json b.json --name merged --stat median
    python benchmarks/report.py benchmarks/results/full-2core.json.gz    # gzip is read too

Writes ``benchmarks/results/<name>.md`` (``<name>`` defaults to the first JSON's
stem) and ``benchmarks/results/<name>-<op>-<dtype>-<pass>.png`` (log-log time
against n for batch 1, and against batch * n for the batched cells, one line per
implementation, l2 and kl panels).

Ratios are computed per grid cell (op, regularization, dtype, batch, n, pass),
all numbers from the run(s) given, with one statistic of each benchmark
(``--stat``, default ``min``: the least disturbed by other load on the machine):

- floor: softrank / the faster of ``np.argsort`` and ``torch.sort`` of the same
  array; bars: forward <= 1.5 and forward+backward <= 2.5 where batch*n >= 10^4;
- peers: ``softrank.torch`` / each torch peer, ``softrank.numpy`` /
  fast-soft-sort and ``softrank.jax`` / ott-jax, for soft rank / sort and the
  operators on the permutahedron (``test_bench_operators.py``); bar <= 0.5;
- Sinkhorn (50 iterations) / softrank at n = 100 and 1000;
- threads: time with 1 thread / time with 2 threads (bar >= 1.6 at (1, 10^6));
- fresh data: each call on a new array against the same array every call
  (``test_bench_fresh_data.py``), for softrank.numpy and np.argsort; no bar.

Given several JSON files (runs of the same code on the same machine), each
benchmark's statistic is the smallest over the runs: on a shared machine a burst of
load can spoil one benchmark's whole time window, and repeating the run is the cheap
way to get it measured undisturbed.
"""
from __future__ import annotations

import argparse
import gzip
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Tuple

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

SOFTRANK = ("softrank.numpy", "softrank.torch", "softrank.jax")
VARIANTS = {  # fwdbwd-only variants of softrank.numpy -> their column's name (no bar)
    "softrank.numpy[stateless]": "numpy stateless",
    "softrank.numpy[vjp-only]": "numpy vjp-only",
}
FLOORS = ("np.argsort", "torch.sort")
PEERS = {  # peer -> the softrank implementation it is compared with
    "fast-soft-sort": "softrank.numpy",
    "torchsort": "softrank.torch",
    "torchisotonic": "softrank.torch",
    "torchpsort": "softrank.torch",
    "ott-jax": "softrank.jax",
}
FLOOR_OPS = ("soft_rank", "soft_sort")  # the operators timed next to a bare sort
FWD_BAR, FWDBWD_BAR, PEER_BAR, THREAD_BAR = 1.5, 2.5, 0.5, 1.6
FLOOR_MIN_SIZE = 10**4

CellKey = Tuple[str, str, str, int, int, str]  # op, reg, dtype, batch, n, pass


def load(paths: List[Path], stat: str):
    """{cell: {impl: seconds}}, {thread cell: {threads: seconds}},
    {fresh-data cell: {(impl, "same" | "fresh"): seconds}}, [machine/meta per file]."""
    cells: Dict[CellKey, Dict[str, float]] = defaultdict(dict)
    threads: Dict[CellKey, Dict[int, float]] = defaultdict(dict)
    fresh: Dict[CellKey, Dict[Tuple[str, str], float]] = defaultdict(dict)
    meta = []
    for path in paths:
        opener = gzip.open if str(path).endswith(".gz") else open
        with opener(path, "rt") as fh:
            run = json.load(fh)
        meta.append(
            {
                "file": str(path),
                "datetime": run.get("datetime"),
                "machine": run.get("machine_info", {}),
                "commit": run.get("commit_info", {}),
            }
        )
        for bench in run.get("benchmarks", []):
            info = bench.get("extra_info", {})
            if "impl" not in info:
                continue
            key = (info["op"], info["reg"], info["dtype"], int(info["batch"]), int(info["n"]),
                   info["pass"])
            seconds = float(bench["stats"][stat])
            # several runs: keep the best (the least disturbed) of each benchmark
            if info.get("kind") == "threads":
                slot, name = threads[key], int(info["threads"])
            elif info.get("kind") == "fresh":
                slot, name = fresh[key], (info["base_impl"], info["arrays"])
            else:
                slot, name = cells[key], info["impl"]
            slot[name] = min(seconds, slot.get(name, math.inf))
    return cells, threads, fresh, meta


# --- formatting ---------------------------------------------------------------


def fmt_time(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def fmt_ratio(ratio: Optional[float], bar: Optional[float] = None, upper: bool = True) -> str:
    if ratio is None:
        return "-"
    text = f"{ratio:.2f}"
    if bar is None:
        return text
    ok = ratio <= bar if upper else ratio >= bar
    return text + (" ✓" if ok else " ✗")


def fmt_n(n: int) -> str:
    if n >= 10**4 and math.log10(n).is_integer():
        return f"1e{int(math.log10(n))}"
    return str(n)


def short_label(key: CellKey) -> str:
    op, reg, dtype, batch, n, pass_ = key
    return f"{op} {reg} {dtype} ({batch}, {fmt_n(n)}) {pass_}"


def cell_label(key: CellKey) -> str:
    op, reg, dtype, batch, n, pass_ = key
    return f"{op} | {reg} | {dtype} | {batch} | {fmt_n(n)} | {pass_}"


CELL_HEADER = "op | reg | dtype | batch | n | pass"


def ordered(keys):
    """Cells by op, reg, pass and size, float32 and float64 of a cell side by side."""
    return sorted(keys, key=lambda k: (k[0], k[1], k[5], k[3] != 1, k[3] * k[4], k[3], k[2]))


def table(header: List[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# --- the ratios -----------------------------------------------------------------


def floor_of(impls: Dict[str, float]) -> Tuple[Optional[float], Optional[str]]:
    present = [(impls[f], f) for f in FLOORS if f in impls]
    if not present:
        return None, None
    return min(present)


def floor_section(cells, checks) -> Optional[str]:
    impls_present = [s for s in SOFTRANK if any(s in v for v in cells.values())]
    variants = [v for v in VARIANTS if any(v in c for c in cells.values())]
    header = CELL_HEADER.split(" | ") + ["np.argsort", "torch.sort"]
    header += [f"{s} / floor" for s in impls_present]
    header += [f"{VARIANTS[v]} / floor" for v in variants]
    rows = []
    for key in ordered(cells):
        if key[0] not in FLOOR_OPS:
            continue
        impls = cells[key]
        floor, _ = floor_of(impls)
        _, _, dtype, batch, n, pass_ = key
        bar = None
        if batch * n >= FLOOR_MIN_SIZE:
            bar = FWD_BAR if pass_ == "fwd" else FWDBWD_BAR
        row = cell_label(key).split(" | ")
        row += [fmt_time(impls.get("np.argsort")), fmt_time(impls.get("torch.sort"))]
        for s in impls_present:
            ratio = impls[s] / floor if (s in impls and floor) else None
            row.append(fmt_ratio(ratio, bar))
            if ratio is not None and bar is not None:
                checks.append(("floor", dtype, pass_, s, key, ratio, ratio <= bar))
        for variant in variants:
            ratio = impls[variant] / floor if (variant in impls and floor) else None
            row.append(fmt_ratio(ratio))
        rows.append(row)
    if not rows:
        return None
    return table(header, rows)


def peer_section(cells, checks) -> Optional[str]:
    peers = [p for p in PEERS if any(p in v for v in cells.values())]
    if not peers:
        return None
    header = CELL_HEADER.split(" | ") + [f"{PEERS[p].split('.')[1]} / {p}" for p in peers]
    header += [f"{p} time" for p in peers]
    rows = []
    for key in ordered(cells):
        impls = cells[key]
        if not any(p in impls for p in peers):
            continue
        row = cell_label(key).split(" | ")
        for p in peers:
            mine = impls.get(PEERS[p])
            ratio = mine / impls[p] if (mine is not None and p in impls) else None
            row.append(fmt_ratio(ratio, PEER_BAR))
            if ratio is not None:
                checks.append(("peer", key[2], key[5], f"{PEERS[p]} vs {p}", key, ratio,
                               ratio <= PEER_BAR))
        row += [fmt_time(impls.get(p)) for p in peers]
        rows.append(row)
    return table(header, rows)


def sinkhorn_section(cells) -> Optional[str]:
    rows = []
    for key in ordered(cells):
        op, reg, dtype, batch, n, pass_ = key
        if "sinkhorn" not in cells[key]:
            continue
        sink = cells[key]["sinkhorn"]
        row = [dtype, str(batch), fmt_n(n), pass_, fmt_time(sink)]
        for s in ("softrank.torch", "softrank.numpy"):
            for r in ("l2", "kl"):
                mine = cells.get((op, r, dtype, batch, n, pass_), {}).get(s)
                row.append(f"{sink / mine:,.0f}" if mine else "-")
        rows.append(row)
    if not rows:
        return None
    header = ["dtype", "batch", "n", "pass", "sinkhorn (50 it.)",
              "/ torch l2", "/ torch kl", "/ numpy l2", "/ numpy kl"]
    return table(header, rows)


def thread_section(threads, checks) -> Optional[str]:
    rows = []
    for key in ordered(threads):
        t = threads[key]
        speedup = t[1] / t[2] if (1 in t and 2 in t) else None
        bar = THREAD_BAR if (key[3], key[4]) == (1, 10**6) else None
        row = cell_label(key).split(" | ") + [fmt_time(t.get(1)), fmt_time(t.get(2)),
                                              fmt_ratio(speedup, bar, upper=False)]
        if speedup is not None and bar is not None:
            checks.append(("threads", key[2], key[5], "softrank.numpy", key, speedup,
                           speedup >= bar))
        rows.append(row)
    if not rows:
        return None
    return table(CELL_HEADER.split(" | ") + ["1 thread", "2 threads", "1 / 2 threads"], rows)


def fresh_section(fresh) -> Optional[str]:
    rows = []
    for key in ordered(fresh):
        t = fresh[key]

        def ratio(a, b):
            return t[a] / t[b] if (a in t and b in t) else None

        sr, ref = "softrank.numpy", "np.argsort"
        rows.append(cell_label(key).split(" | ") + [
            fmt_time(t.get((sr, "same"))), fmt_time(t.get((sr, "fresh"))),
            fmt_ratio(ratio((sr, "fresh"), (sr, "same"))),
            fmt_ratio(ratio((ref, "fresh"), (ref, "same"))),
            fmt_ratio(ratio((sr, "same"), (ref, "same"))),
            fmt_ratio(ratio((sr, "fresh"), (ref, "fresh")))])
    if not rows:
        return None
    return table(CELL_HEADER.split(" | ") + [
        "softrank same", "softrank fresh", "softrank fresh / same", "argsort fresh / same",
        "floor ratio, same", "floor ratio, fresh"], rows)


def summary_section(checks) -> str:
    groups: Dict[Tuple, List] = defaultdict(list)
    for kind, dtype, pass_, who, key, ratio, ok in checks:
        groups[(kind, dtype, pass_, who)].append((ratio, ok, key))
    rows = []
    for (kind, dtype, pass_, who), items in sorted(groups.items()):
        failed = [i for i in items if not i[1]]
        worst = (min if kind == "threads" else max)(items, key=lambda i: i[0])
        bar = {"floor": FWD_BAR if pass_ == "fwd" else FWDBWD_BAR, "peer": PEER_BAR,
               "threads": THREAD_BAR}[kind]
        rows.append([kind, who, dtype, pass_, ("≥ " if kind == "threads" else "≤ ") + str(bar),
                     f"{len(items) - len(failed)}/{len(items)}",
                     f"{worst[0]:.2f}: {short_label(worst[2])}"])
    return table(["check", "who", "dtype", "pass", "bar", "cells met", "worst ratio (cell)"], rows)


def machine_section(meta) -> str:
    lines = []
    for m in meta:
        mi = m["machine"]
        cpu = mi.get("cpu", {})
        lines.append(f"- `{m['file']}`: {m['datetime']}, {mi.get('node', '?')}, "
                     f"{cpu.get('brand_raw', mi.get('processor', '?'))}, "
                     f"{cpu.get('count', '?')} logical CPUs, Python {mi.get('python_version', '?')}")
        if mi.get("note"):
            lines.append(f"  - note: {mi['note']}")
        if mi.get("simd_level"):
            lines.append(f"  - instruction set of the softrank core: {mi['simd_level']}")
        sr = mi.get("softrank")
        if sr:
            lines.append(f"  - softrank: {sr}")
        for field in ("loadavg_start", "loadavg_end"):
            if field in mi:
                lines.append(f"  - load average at {field.split('_')[1]}: {mi[field]}")
        commit = m.get("commit") or {}
        if commit.get("id"):
            dirty = " (dirty tree)" if commit.get("dirty") else ""
            lines.append(f"  - commit {commit['id'][:10]}{dirty}")
    return "\n".join(lines)


# --- plots ------------------------------------------------------------------------

STYLE = {
    "softrank.numpy": ("C0", "-", "o"),
    "softrank.numpy[stateless]": ("C0", "--", "o"),
    "softrank.numpy[vjp-only]": ("C0", ":", "o"),
    "softrank.torch": ("C1", "-", "s"),
    "softrank.jax": ("C2", "-", "^"),
    "np.argsort": ("k", "--", "x"),
    "torch.sort": ("0.45", "--", "+"),
    "fast-soft-sort": ("C3", "-.", "v"),
    "torchsort": ("C4", "-.", "D"),
    "torchisotonic": ("C5", "-.", "P"),
    "torchpsort": ("C6", "-.", "*"),
    "ott-jax": ("C8", "-.", "X"),
    "sinkhorn": ("C7", ":", "h"),
}


def plots(cells, out_dir: Path, name: str, stat: str) -> List[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    combos = sorted({(k[0], k[2], k[5]) for k in cells})
    for op, dtype, pass_ in combos:
        fig, axes = plt.subplots(2, 2, figsize=(12, 8.5), squeeze=False)
        for row, reg in enumerate(("l2", "kl")):
            keys = [k for k in cells if k[0] == op and k[1] == reg and k[2] == dtype and k[5] == pass_]
            impls = [i for i in STYLE if any(i in cells[k] for k in keys)]
            for col, single in enumerate((True, False)):
                ax = axes[row][col]
                sel = sorted((k for k in keys if (k[3] == 1) == single), key=lambda k: k[3] * k[4])
                for impl in impls:
                    pts = [(k[4] if single else k[3] * k[4], cells[k][impl], k)
                           for k in sel if impl in cells[k]]
                    if not pts:
                        continue
                    color, ls, marker = STYLE[impl]
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color, ls=ls,
                            marker=marker, label=impl)
                if not single:
                    for k in sel:
                        ax.annotate(f"{k[3]}×{fmt_n(k[4])}", (k[3] * k[4], min(cells[k].values())),
                                    textcoords="offset points", xytext=(0, -12), ha="center",
                                    fontsize=7, color="0.3")
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.set_xlabel("n" if single else "batch × n (batch > 1)")
                ax.set_ylabel(f"time per call, s ({stat})")
                ax.set_title(f"{reg}, batch = 1" if single else f"{reg}, batched")
                ax.grid(True, which="both", alpha=0.3)
                if ax.lines:
                    ax.legend(fontsize=7)
                else:
                    ax.set_axis_off()
                    ax.set_title(f"{reg}: no data")
        fig.suptitle(f"{op}, {dtype}, {'forward' if pass_ == 'fwd' else 'forward + backward'}")
        fig.tight_layout()
        path = out_dir / f"{name}-{op}-{dtype}-{pass_}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    return written


# --- main ---------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="+", type=Path, help="pytest-benchmark JSON file(s)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--name", help="output name (default: the first JSON's stem)")
    parser.add_argument("--stat", default="min", choices=("min", "median", "mean"))
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)

    name = args.name or args.json[0].name.split(".json")[0]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    cells, threads, fresh, meta = load(args.json, args.stat)
    checks: List = []

    parts = [f"# softrank benchmark: {name}", "",
             f"Statistic: **{args.stat}** of each benchmark's rounds. Times per call. "
             "Ratios < 1 mean softrank is faster. ✓/✗: against the speed goals (bars) of each table.",
             "", "## Machine", "", machine_section(meta)]
    floor = floor_section(cells, checks) if cells else None
    peer = peer_section(cells, checks) if cells else None
    sink = sinkhorn_section(cells) if cells else None
    thr = thread_section(threads, checks)
    new_data = fresh_section(fresh)
    if checks:
        parts += ["", "## Summary", "", summary_section(checks)]
    if floor:
        parts += ["", "## softrank / the faster of np.argsort and torch.sort",
                  "", f"Bars where batch·n ≥ 1e4: forward ≤ {FWD_BAR}, forward+backward ≤ "
                  f"{FWDBWD_BAR}. numpy forward+backward is `*_with_vjp` then its pullback (one "
                  "forward pass); the stateless column times the op then its `*_vjp` (which "
                  "recomputes the forward; softrank.numpy's own fwdbwd timing in runs made "
                  "before `*_with_vjp` existed), the vjp-only column the `*_vjp` call alone.",
                  "", floor]
    if peer:
        parts += ["", "## softrank / peers", "", f"Bar: ≤ {PEER_BAR} (2x faster). "
                  "torchisotonic: its isotonic regression inside a sort/un-permute, l2 only "
                  "(and its own isotonic regression for `isotonic_regression` rows). The "
                  "rows of the operators and their peers: `test_bench_operators.py`.",
                  "", peer]
    if sink:
        parts += ["", "## Sinkhorn (O(n²), 50 iterations) / softrank", "", sink]
    if thr:
        parts += ["", "## Thread scaling (softrank.numpy)", "",
                  f"Bar at (1, 1e6): ≥ {THREAD_BAR}.", "", thr]
    if new_data:
        parts += ["", "## The same array every call against fresh arrays (softrank.numpy, "
                  "np.argsort)", "",
                  "The grid times one array per cell; a training loop passes new values "
                  "every step. fresh: each call takes the next of 16 arrays of the grid's "
                  "distribution. The floor ratio is softrank / np.argsort on the same kind of "
                  "data. No bar.", "", new_data]
    if not args.no_plots and cells:
        pngs = plots(cells, args.out_dir, name, args.stat)
        parts += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in pngs]
    md = args.out_dir / f"{name}.md"
    md.write_text("\n".join(parts) + "\n")
    print(f"wrote {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
