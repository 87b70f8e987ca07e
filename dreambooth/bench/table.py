"""The benchmark's results: rows merged over passes, FLOP rates, the default-vs-baseline ratio, the Markdown table."""

from __future__ import annotations

import statistics

from dreambooth.files import write_text_atomic

# 16gb and 12gb are the default profile's settings, so the matrix runs them once, as default.
# The EMA rows measure what the average costs: its fp32 copy on the device, in host memory, and with 8gb (auto: host).
EMA_ROWS = ("default+ema", "default+ema+ema_on_cpu", "8gb+ema")
ROWS = ("baseline", "default", "8gb", "6gb", "24gb", "lora", *EMA_ROWS)  # the targets' rows first, should time run out
COMPILED = "default+compile"  # the default profile with CUDA graphs, as compile: auto runs long jobs on CUDA


def finish_rows(result: dict, runs: dict) -> None:
    """Merge each row's passes so far and add its FLOP rates and the default-vs-baseline ratios."""
    rows = [merge_runs(parts) for parts in runs.values()]
    for row in rows:
        if row["status"] == "ok":
            flops = result["model_flops_per_step"]["prior" if row["prior"] else "no_prior"]
            row["model_flops_per_step"] = flops
            row["achieved_tflops"] = flops / row["s_per_step"] / 1e12
            row["mfu"] = row["achieved_tflops"] / result["bf16_matmul_peak_tflops"]
    result["rows"] = rows
    result["default_vs_baseline"] = ratios(rows)
    result["compiled_vs_baseline"] = ratios(rows, COMPILED)


def merge_runs(parts: list[dict]) -> dict:
    """One row from its passes: the median over all timed steps, the highest peak memory, the first failure."""
    bad = next((p for p in parts if p["status"] != "ok"), None)
    if bad is not None:
        return bad
    row = dict(parts[-1])
    row["step_times_s"] = [t for p in parts for t in p["step_times_s"]]
    row["s_per_step"] = statistics.median(row["step_times_s"])
    row["images_per_s"] = row["images_per_step"] / row["s_per_step"]
    row["setup_s"] = statistics.median(p["setup_s"] for p in parts)
    row["warmup_s"] = max(p.get("warmup_s", 0.0) for p in parts)  # the first pass pays for compilation
    row["peak_memory"] = {k: max((p["peak_memory"][k] for p in parts), key=lambda v: v or 0)
                          for k in parts[0]["peak_memory"]}
    row["passes"] = len(parts)
    return row


def ratios(rows: list[dict], name: str = "default") -> dict:
    """Throughput of row `name` (the default profile) over the baseline's, per prior setting."""
    ok = {(r["name"], r["prior"]): r for r in rows if r["status"] == "ok"}
    return {("prior" if p else "no_prior"): ok[("baseline", p)]["s_per_step"] / ok[(name, p)]["s_per_step"]
            for p in (False, True) if ("baseline", p) in ok and (name, p) in ok}


def _gib(n) -> str:
    return f"{n / 2**30:.2f}" if n is not None else "-"


def format_table(r: dict) -> str:
    """A short Markdown table of the result."""
    cuda = r["device_type"] == "cuda"
    lines = [f"device: {r['device']} | model: {r['model']} ({r['model_note']}) | {r['resolution']} px | "
             f"batch {r['batch']} | median of {r['timed_steps']} steps (after {r['warmup_steps']} warm-up) x "
             f"{r['repeats']} interleaved passes",
             f"bf16 matmul peak measured: {r['bf16_matmul_peak_tflops']:.2f} TFLOP/s; {r['scaled_note']}", "",
             "| row | prior | s/step | x baseline | images/s | " + ("peak alloc GiB | peak reserved GiB" if cuda else
                                                                   "peak RSS GiB") + " | TFLOP/s | MFU | warm-up s |",
             "|---|---|---|---|---|---|" + ("---|" if cuda else "") + "---|---|---|"]
    for row in r["rows"]:
        prior = "on" if row["prior"] else "off"
        if row["status"] != "ok":
            lines.append(f"| {row['name']} | {prior} | {row['status']}: {row['reason'][:80]} |")
            continue
        pm = row["peak_memory"]
        mem = (f"{_gib(pm['cuda_max_allocated_bytes'])} | {_gib(pm['cuda_max_reserved_bytes'])}" if cuda
               else _gib(pm["cpu_peak_rss_bytes"]))
        x = ratios(r["rows"], row["name"]).get("prior" if row["prior"] else "no_prior")  # the one baseline rule
        speedup = f"{x:.2f}" if x is not None else "-"
        lines.append(f"| {row['name']} | {prior} | {row['s_per_step']:.3f} | {speedup} | {row['images_per_s']:.2f} | "
                     f"{mem} | {row['achieved_tflops']:.3f} | {row['mfu']:.1%} | {row.get('warmup_s', 0):.1f} |")
    profiled = [row for row in r["rows"] if row.get("profile")]
    if profiled:
        from dreambooth.bench.profile import format_profile  # imports torch: cli builds its parser from this module
        lines += ["", "Profiled steps (bench --profile):"]
        for row in profiled:
            lines += format_profile(row["name"], row["prior"], row["profile"])
    for row in r["rows"]:
        if row.get("compile_stats"):
            parts = [f"{k[:-2].replace('_', ' ')} {v:.1f} s" if k.endswith("_s") else f"{k} {v:g}"
                     for k, v in row["compile_stats"].items()]
            lines.append(f"\ncompile of {row['name']} (prior {'on' if row['prior'] else 'off'}): " + ", ".join(parts))
    for k, v in r.get("default_vs_baseline", {}).items():
        lines.append(f"\ndefault profile vs baseline ({k.replace('_', ' ')}): {v:.2f}x the throughput")
    for k, v in r.get("compiled_vs_baseline", {}).items():
        lines.append(f"\ndefault profile compiled ({COMPILED}) vs baseline ({k.replace('_', ' ')}): {v:.2f}x")
    s = r.get("sampling")
    if s and "ours" in s:
        lines.append(f"class-image sampling: ours ({s['ours']['scheduler']}, {s['ours']['steps']} steps, batch "
                     f"{s['ours']['batch']}) {s['ours']['images_per_s']:.3f} img/s vs PNDM 50 steps batch 1 "
                     f"{s['pndm50_batch1']['images_per_s']:.3f} img/s: {s['speedup']:.2f}x")
    return "\n".join(lines)


def names(text: str) -> list[str]:
    """A comma list from the command line (--rows, --compile, ...), blanks dropped."""
    return [r.strip() for r in text.split(",") if r.strip()]


def show(table: str, table_path: str | None, out: str | None) -> int:
    """Print a benchmark's table, write it to --table if given, and say where the JSON went; exit code 0."""
    print(table)
    if table_path:
        write_text_atomic(table_path, table + "\n")
    print(f"results: {out}")
    return 0
