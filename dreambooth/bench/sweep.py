"""Ray's cost per trial: the same run alone (`dreambooth train` in a fresh process, as one would run it without a
sweep) against a 1-trial sweep on a local Ray (everything Ray adds: its start, Tune, the worker, its stop), and the
later trials of an N-trial sweep (start -> end as the driver sees them); one trial at a time. Needs the sweep
extra. JSON out:

    python -m dreambooth.bench.sweep [--trials 4] [--steps 20] [--model builtin:tiny] [--out sweep-bench.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from dreambooth.files import write_json_atomic

SCHEMA = "dreambooth-bench-sweep/1"


def _alone(data: dict, folder: Path) -> dict:
    """One run by `dreambooth train` in a fresh process: its wall time and its training loop's time."""
    folder.mkdir(parents=True)
    config = folder / "run.yaml"
    config.write_text(yaml.safe_dump({**data, "output_dir": str(folder / "out")}))
    # The thread count Ray gives a 1-CPU trial: otherwise the comparison measures torch's threads, not Ray.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    start = time.time()
    subprocess.run([sys.executable, "-m", "dreambooth.cli", "train", str(config)], check=True,
                   stdout=subprocess.DEVNULL, env=env)
    wall = time.time() - start
    summary = json.loads((folder / "out" / "train_summary.json").read_text())
    return {"wall_s": round(wall, 3), "loop_s": summary["wall_time_s"]}


def _sweep(base: dict, n: int, folder: Path, report_steps: int) -> tuple[float, object]:
    """A sweep of n trials that differ only in seed, one at a time, on a Ray it starts and stops: (wall s, result)."""
    from dreambooth.sweep import engine, grid
    trials = grid.expand({**base, "output_dir": str(folder)},
                         grid.parse_grid([f"seed=[{','.join(map(str, range(n)))}]"]))
    start = time.time()
    result = engine.run_sweep(trials, folder, max_concurrent=1, report_steps=report_steps, verbose=0)
    assert all(r["status"] == "finished" for r in result.rows), result.rows
    return time.time() - start, result


def run(trials_n: int, steps: int, model: str, resolution: int, report_steps: int, workdir: Path) -> dict:
    from dreambooth.demo import write_demo_dataset

    subject = write_demo_dataset(workdir / "subject", n=4, size=max(48, resolution))
    base = {"model": model, "data": {"dir": str(subject)}, "resolution": resolution, "max_steps": steps,
            "center_crop": True, "gradient_checkpointing": False, "validation": {"enabled": False}, "quiet": True}
    alone = [_alone({**base, "seed": i}, workdir / "alone" / str(i)) for i in range(trials_n)]
    one_s, one = _sweep(base, 1, workdir / "sweep-1", report_steps)
    all_s, result = _sweep(base, trials_n, workdir / f"sweep-{trials_n}", report_steps)
    alone_s = statistics.mean(a["wall_s"] for a in alone)
    driver = list(result.trial_times.values())  # each trial's start -> end as the driver saw it, in order
    later = statistics.mean(driver[1:]) if len(driver) > 1 else None
    rows = {r["trial"]: r for r in result.rows}
    return {
        "schema": SCHEMA, "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_1m": round(os.getloadavg()[0], 2)},
        "command": "python -m dreambooth.bench.sweep " + " ".join(sys.argv[1:]),
        "settings": {"trials": trials_n, "steps": steps, "model": model, "resolution": resolution,
                     "report_steps": report_steps, "concurrency": 1},
        "alone_s": [a["wall_s"] for a in alone], "alone_mean_s": round(alone_s, 3),
        # A 1-trial sweep against the same run alone: everything Ray adds (start, Tune, the worker, stop).
        "one_trial_sweep_s": round(one_s, 3), "one_trial_overhead_s": round(one_s - alone_s, 3),
        # In the N-trial sweep: the trials after the first (Tune reuses the worker: no new process, no imports)
        # against a run alone, and what the sweep spent outside its trials (Ray, Tune, the first worker's start).
        "n_trial_sweep_s": round(all_s, 3),
        "per_extra_trial_s": round(later, 3) if later is not None else None,
        "per_extra_trial_overhead_s": round(later - alone_s, 3) if later is not None else None,
        "n_trial_sweep_outside_trials_s": round(all_s - sum(driver), 3),
        "ray_start_s": [round(one.ray_start_s, 3), round(result.ray_start_s, 3)],  # in each of the two sweeps
        "trials": [{"trial": name, "driver_s": t, "loop_s": rows[name]["train_time_s"],
                    "alone_loop_s": a["loop_s"]} for (name, t), a in zip(result.trial_times.items(), alone)],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dreambooth.bench.sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--model", default="builtin:tiny")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--report-steps", type=int, default=10)
    p.add_argument("--out", default="sweep-bench.json")
    p.add_argument("--workdir", help="keep the runs here (default: a temporary folder)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        result = run(args.trials, args.steps, args.model, args.resolution, args.report_steps, workdir)
    write_json_atomic(args.out, result)
    print(f"run alone: {result['alone_mean_s']:.1f} s (mean of {len(result['alone_s'])}); a 1-trial sweep: "
          f"{result['one_trial_sweep_s']:.1f} s (overhead {result['one_trial_overhead_s']:+.1f} s, Ray start "
          f"{result['ray_start_s'][0]:.1f} s)")
    if result["per_extra_trial_s"] is not None:
        print(f"each further trial: {result['per_extra_trial_s']:.1f} s (overhead "
              f"{result['per_extra_trial_overhead_s']:+.1f} s against a run alone); written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
