"""``python -m mllm``: the command line (see ``mllm.cli``)."""

from .cli import main

if __name__ == "__main__":
    main()
