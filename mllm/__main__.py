"""Command line: ``python -m mllm demo [--leaves N] [--queries B]``."""

import argparse

from . import demo


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="mllm", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser("demo", help="descend a synthetic embedding tree with the fused ops")
    demo.add_arguments(demo_parser)
    args = parser.parse_args(argv)
    if args.command == "demo":
        demo.run(args)


if __name__ == "__main__":
    main()
