"""DVC stage `transform`: decode the raw IDX files, split train/validation, write data/processed/."""

import argparse

from fmnist import params, stage
from fmnist.data import transform


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--raw", default="data/raw")
    parser.add_argument("--out", required=True)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()  # outputs have no default: dvc.yaml names every path
    transform(args.raw, args.out, params.data_params(params.load(args.params)))


if __name__ == "__main__":
    stage.run(main)
