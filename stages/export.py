"""DVC stage `export`: the trained model as a standalone program, models/model.pt2 (see fmnist.export).

The program is checked against the checkpoint on the 10,000 test images before it is written.
"""

import argparse
import dataclasses
import logging

from fmnist import export, kernels, runtime, stage
from fmnist.checkpoint import model_from, read_checkpoint, trained_params
from fmnist.data import load_processed

log = logging.getLogger("export")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="models/model.pt")
    parser.add_argument("--data", default="data/processed")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()  # outputs have no default: dvc.yaml names every path

    payload = read_checkpoint(args.model)
    runtime.configure(dataclasses.replace(trained_params(payload), device="cpu"))  # the training's numerics
    model, info = model_from(payload, args.model, cpu_kernel="torch")  # what torch alone can run
    reference, _ = model_from(payload, args.model, cpu_kernel="fused" if kernels.available() else "torch")
    images = load_processed(args.data).test.images
    mean, std = info["normalize"]["mean"], info["normalize"]["std"]
    program = export.export(model, mean, std, images[:2])
    worst = export.check(program, reference, mean, std, images)
    export.save(program, args.out)
    log.info("%s: %s, largest logit difference from the checkpoint %.2g on %d test images",
             args.out, info["model"], worst, len(images))


if __name__ == "__main__":
    stage.run(main)
