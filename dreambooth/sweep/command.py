"""The `dreambooth sweep` command: its arguments (argparse only, so `dreambooth --help` stays fast) and its run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_sweep_parser(sub, func) -> argparse.ArgumentParser:
    """The `sweep` subcommand's parser, running `func`."""
    p = sub.add_parser("sweep", help="train a grid of settings x subjects as Ray Tune trials (dreambooth[sweep])",
                       description="dreambooth sweep CONFIG [key=value ...] --grid KEY=[v1,v2] ... [--subjects DIR ...]: "
                                   "one normal run per trial in output_dir/<trial>, sweep.csv/json/html beside them; "
                                   "rerun the same command to resume (finished trials are skipped)")
    p.set_defaults(func=func)
    p.add_argument("items", nargs="*", metavar="CONFIG|key=value")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=[v1,v2,...]",
                   help="a setting to vary (repeat for more: trials are the product), e.g. learning_rate=[1e-6,2e-6]")
    p.add_argument("--subjects", nargs="+", metavar="DIR", help="subject folders (or folders of them): every grid "
                   "point is trained once per subject")
    p.add_argument("--address", help="an existing Ray cluster: auto (this node's), or ray://HOST:10001 (default: a "
                   "local Ray started for the sweep)")
    p.add_argument("--num-cpus", type=int, help="CPUs the local Ray may use (default: all)")
    p.add_argument("--gpus-per-trial", type=float, help="GPUs per trial, fractions allowed (default: 1 where the "
                   "cluster has GPUs, else 0)")
    p.add_argument("--cpus-per-trial", type=float, default=1, help="CPUs per trial (default 1)")
    p.add_argument("--metric", default="final_loss", help="what ranks trials and drives early stopping: final_loss "
                   "(default), mean_loss, recent_loss, or a validation.metrics score as validation_dino, "
                   "validation_clip_t, validation_loss, ...")
    p.add_argument("--mode", choices=["min", "max"], help="min: lower is better (the default for losses and drift); "
                   "max (the default for dino, clip_i, clip_t)")
    p.add_argument("--scheduler", choices=["asha", "median"], help="early stopping of trials behind on --metric")
    p.add_argument("--grace-steps", type=int, help="steps every trial trains before early stopping may end it")
    p.add_argument("--max-failures", type=int, default=2, help="retries of a trial whose worker died (default 2)")
    p.add_argument("--max-concurrent", type=int, help="trials running at once (default: as resources allow)")
    p.add_argument("--checkpoint-steps", type=int, help="checkpoint interval of trials whose config sets none "
                   "(default 100): a retry resumes from the latest")
    p.add_argument("--report-steps", type=int, default=10, help="steps between progress reports to Ray (default 10)")
    return p


def sweep_from_args(args, config: str | None, overrides: list[str], quiet_library_bars) -> int:
    """`dreambooth sweep`: check every trial's config, run the sweep, print each trial's outcome and the best."""
    from dreambooth.config.parse import COMMAND_LINE
    from dreambooth.sweep import grid
    from dreambooth.sweep.trial import check_metric

    base, set_by = grid.read_base(config, overrides)
    subjects = grid.find_subjects(args.subjects) if args.subjects else None
    trials = grid.expand(base, grid.parse_grid(args.grid), subjects, set_by=set_by, source=config or COMMAND_LINE,
                         checkpoint_steps=args.checkpoint_steps)
    check_metric(args.metric, trials)
    sweep_dir = Path(trials[0].dir).parent
    command = grid.command_line(args.argv)
    print(f"sweep: {len(trials)} trial(s) into {sweep_dir}")
    quiet_library_bars()
    from dreambooth.sweep.engine import run_sweep  # Ray: the sweep extra, imported only here
    result = run_sweep(trials, sweep_dir, metric=args.metric, mode=args.mode, address=args.address,
                       num_cpus=args.num_cpus, gpus_per_trial=args.gpus_per_trial, cpus_per_trial=args.cpus_per_trial,
                       scheduler=args.scheduler, grace_steps=args.grace_steps, max_failures=args.max_failures,
                       max_concurrent=args.max_concurrent, report_steps=args.report_steps, command=command)
    for row in result.rows:
        value = row.get(args.metric)
        print(f"{'*' if row['best'] else ' '} {row['trial']}: {row['status']}"
              + (f", {args.metric} {value:.4f}" if isinstance(value, float) else "")
              + (f" ({row['error']})" if row.get("error") else ""))
    print(f"summary: {sweep_dir / 'sweep.html'} (and sweep.csv, sweep.json)")
    if result.best:
        print(f"best by {args.metric}: {sweep_dir / result.best}")
    if result.stopped:
        print(f"stopped; resume the sweep with: {command}", file=sys.stderr)
        return 130
    return 1 if any(r["status"] in ("failed", "error") for r in result.rows) else 0
