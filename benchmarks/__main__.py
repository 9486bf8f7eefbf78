"""Command line of the benchmark harness: ``python -m benchmarks ops|e2e|gpu [--quick] [--out DIR]``."""

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
    e2e = sub.add_parser("e2e", help="descend_tree vs flat search and FAISS on 1e4..1e7 leaves, with recall@10")
    size = e2e.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="1e4 and 1e5 leaves only")
    size.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds (for the tests)")
    e2e.add_argument("--sizes", nargs="+", type=lambda v: int(float(v)), metavar="N", help="leaf counts (e.g. 1e4 1e6)")
    e2e.add_argument("--out", default="bench_results", help="output folder (default: bench_results)")
    e2e.add_argument("--threads", type=int, default=None, help="torch and faiss threads (default: torch's)")
    e2e.add_argument("--no-faiss", action="store_true", help="skip the FAISS baselines")
    e2e.add_argument("--hnsw-m", type=int, default=None, help="HNSW M (default 32)")
    e2e.add_argument("--hnsw-ef-construction", type=int, default=None, help="HNSW efConstruction (default 200)")
    e2e.add_argument(
        "--noise-decay", type=float, default=None, help="within-cluster noise spectrum i^-x (default 0: isotropic)"
    )
    e2e.add_argument("--no-int8", action="store_true", help="skip the int8-keys rows of the tree")
    e2e.add_argument("--layout", choices=["sampled", "semantic"], default=None, help="leaf layout (default: sampled)")
    e2e.add_argument("--scratch", default=None, help="folder of the scratch file for large N, created if missing (default: temp dir)")
    e2e.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    gpu = sub.add_parser("gpu", help="the op cases on CUDA tensors: cold and warm L2, GB/s against the copy bandwidth")
    size = gpu.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small sizes, under a minute")
    size.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds")
    gpu.add_argument("--out", default="bench_results", help="output folder (default: bench_results)")
    gpu.add_argument("--only", nargs="+", metavar="OP", help="run only these ops (name prefixes)")
    gpu.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    args = parser.parse_args(argv)
    preset = "smoke" if args.smoke else "quick" if args.quick else "full"

    if args.command == "gpu":
        import torch

        if not torch.cuda.is_available():
            parser.error("gpu: torch sees no GPU on this machine")
        from .gpu import markdown as gpu_markdown
        from .gpu import run_gpu

        results = run_gpu(preset, out_dir=args.out, only=args.only, verbose=not args.quiet)
        print(gpu_markdown(results))
        return 1 if any("error" in c for c in results["cases"]) else 0

    if args.command == "e2e":
        from .e2e import markdown as e2e_markdown
        from .e2e import run_e2e

        results = run_e2e(
            preset,
            sizes=args.sizes,
            threads=args.threads,
            out_dir=args.out,
            use_faiss=not args.no_faiss,
            layout=args.layout,
            scratch=args.scratch,
            int8=not args.no_int8,
            hnsw=(args.hnsw_m, args.hnsw_ef_construction),
            noise_decay=args.noise_decay,
            verbose=not args.quiet,
        )
        print(e2e_markdown(results))
        print("wrote " + ", ".join(results["files"].values()), file=sys.stderr)
        return 0

    from .bench_ops import run_ops
    from .report import markdown

    results = run_ops(preset, threads=args.threads, out_dir=args.out, only=args.only, verbose=not args.quiet)
    print(markdown(results))
    print("wrote " + ", ".join(results["files"].values()), file=sys.stderr)
    return 1 if any("error" in c for c in results["cases"]) else 0


if __name__ == "__main__":
    sys.exit(main())
