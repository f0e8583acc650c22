"""Command line: `resadapt validate [params.yaml]` checks a params file (a dry run: loads nothing heavy)."""

from __future__ import annotations

import argparse
import sys

from resadapt.config import ConfigError, load_params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="resadapt")
    sub = parser.add_subparsers(dest="command", required=True)
    validate = sub.add_parser("validate", help="validate a params file and print its resolved values")
    validate.add_argument("params", nargs="?", default="params.yaml")
    args = parser.parse_args(argv)
    if args.command == "validate":
        try:
            params = load_params(args.params)
        except ConfigError as err:
            print(err, file=sys.stderr)
            return 2
        print(params.model_dump_json(indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
