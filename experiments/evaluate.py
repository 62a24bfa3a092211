#!/usr/bin/env python
"""Re-evaluate a saved run: load its best checkpoint and recompute the test metrics (task metrics,
attention-vs-gradient-importance correlation, robustness), print them and write <run>/evaluation.json.

    python experiments/evaluate.py runs/sst_attention_at_lstm_20260101-120000

evaluation.json holds every measure the current code computes, among them the correlation of the attention
with each importance definition (test.<split>.correlations: gradient x input with the attention held
constant, the gradient norm, gradient x input through the attention). report.py reads them from there for
runs whose metrics.json predates them (issue 15), so re-evaluating an older run fills its '—' cells.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from paper.cli import ArgumentParser, non_negative_float, positive_int
from paper.data import DataFormatError, MissingDataError


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run directory written by train.py (holds best.pt)")
    parser.add_argument("--data-dir", default=None,
                        help="where the task's files are now (default: the folder the run was trained from)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    parser.add_argument("--robustness-eps", type=non_negative_float, default=None,
                        help="size of the test-time AT perturbation (default: the run's)")
    parser.add_argument("--heatmaps", action="store_true", help="also rewrite the run's heat maps")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from paper.training import UsageError, evaluate_run

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        result = evaluate_run(args.run_dir, data_dir=args.data_dir, device_arg=args.device,
                              robustness_eps=args.robustness_eps, heatmaps=args.heatmaps)
    except (UsageError, MissingDataError, DataFormatError) as error:
        print(f"evaluate.py: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
