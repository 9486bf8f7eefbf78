"""Command line of the benchmark harness: ``python -m benchmarks ops [--quick] [--out DIR]``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen benchmark; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    ops = sub.add_parser("ops", help="op kernels vs the eager reference, with memory bandwidth")
    size = ops.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small sizes, under a minute")
    size.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds")
    ops.add_argument("--out", default="bench_results", help="output folder (default: bench_results)")
    ops.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ops.add_argument("--only", nargs="+", metavar="OP", help="run only these ops (name prefixes)")
    ops.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    args = parser.parse_args(argv)

    from .bench_ops import run_ops
    from .report import markdown

    preset = "smoke" if args.smoke else "quick" if args.quick else "full"
    results = run_ops(preset, threads=args.threads, out_dir=args.out, only=args.only, verbose=not args.quiet)
    print(markdown(results))
    print("wrote " + ", ".join(results["files"].values()), file=sys.stderr)
    return 1 if any("error" in c for c in results["cases"]) else 0


if __name__ == "__main__":
    sys.exit(main())
