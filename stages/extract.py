"""DVC stage `extract`: the four official Fashion-MNIST files into data/raw/, verified.

Set FMNIST_MIRROR to a local folder or URL base to fetch from there first.
"""

import argparse

from fmnist import stage
from fmnist.extract import extract, sources_from_env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="folder for the four .gz files")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per network read")
    parser.add_argument("--deadline", type=float, default=600.0, help="seconds per download attempt of one file")
    parser.add_argument("--retries", type=int, default=3, help="attempts per URL")
    args = parser.parse_args()  # outputs have no default: dvc.yaml names every path
    if args.timeout <= 0 or args.deadline <= 0 or args.retries < 1:
        parser.error("--timeout and --deadline must be positive and --retries at least 1")
    extract(args.out, sources_from_env(), timeout=args.timeout, deadline=args.deadline, retries=args.retries)


if __name__ == "__main__":
    stage.run(main)
