"""Benchmarks: each module has ``run(out_dir) -> dict`` that prints its figures and writes <area>.json."""

import sys


def command_line(doc: str, options: tuple[str, ...] = ()) -> list[str]:
    """The arguments of ``python -m marca.bench.<area>``: ``-h`` / ``--help`` prints the module's docstring
    and exits; an option not in ``options`` is an error (exit 2), never taken for the output folder or
    silently ignored."""
    argv = sys.argv[1:]
    if "-h" in argv or "--help" in argv:
        print(doc.strip())
        raise SystemExit(0)
    unknown = [argument for argument in argv if argument.startswith("-") and argument not in options]
    if unknown:
        print(f"unknown option(s) {' '.join(unknown)}; known: {' '.join(options) or 'none'} (--help describes "
              "the command)", file=sys.stderr)
        raise SystemExit(2)
    return argv
