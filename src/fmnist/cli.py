"""The ``fmnist`` command: ``fmnist predict``, ``fmnist serve`` and ``fmnist doctor``.

Errors are one line on stderr, as the stages report them (:func:`fmnist.stage.run`). Exit status: 0 when
everything worked; 1 when a picture or the model could not be read, or doctor found a FAIL; 2 for a bad command line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import CLASSES, stage
from .errors import PipelineError

PREDICT_EXAMPLES = """\
examples:
  fmnist predict shoe.jpg
  fmnist predict photos/ --top 5
  fmnist predict scan.png --invert no --json
  fmnist predict shirt.jpg --model models/other.pt --device cpu

A folder stands for the image files directly in it (sorted by name; subfolders are not
searched). Each picture is made to look like the training images: grayscale, inverted if its
border is light, cropped to the item, padded to a square, resized to 28x28 (a 28x28 picture
is only inverted, if need be). A file that cannot be classified gives one error line and exit
status 1; the others are still classified.
"""

SERVE_EXAMPLES = """\
examples:
  fmnist serve                          # http://127.0.0.1:8000: the page; the API below it
  fmnist serve --port 9000 --model models/other.pt
  fmnist serve --host 0.0.0.0           # reachable from other machines (a phone on the same network)
  fmnist serve --workers 2              # a process per core: about twice the requests per second
  curl -F file=@shoe.jpg -F file=@shirt.png 'http://127.0.0.1:8000/predict?top=5'
  curl --data-binary @shoe.jpg -H 'Content-Type: image/jpeg' http://127.0.0.1:8000/predict

POST /predict answers what fmnist predict --json prints, one entry per picture, each with
the 28x28 picture the model saw; GET /model describes the checkpoint (its metrics, and the
evaluate stage's when dvc.lock records it); GET /healthz; GET /openapi.json is the schema.
A request over 20 MiB or 16 pictures, or slower than --body-timeout to arrive, is refused
with a JSON error. Stop with Ctrl-C.
"""

DOCTOR_EXAMPLES = """\
examples:
  fmnist doctor
  fmnist doctor --repo ~/src/fmnist

Checks the installation (Python, torch, torchvision, DVC, TensorBoard, Pillow, CUDA and cuDNN,
GPUs, the fused CPU kernel, threads) and the repository (params.yaml, data/raw,
data/processed, models/model.pt, the DVC remote). Each line is ok, info, todo (missing, with
the next step: the pipeline makes it) or FAIL (the default pipeline cannot run). Exit status
1 only when something FAILs.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fmnist", description="Fashion-MNIST: classify pictures with the trained "
                                     "model, or check the installation.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{predict,serve,doctor}")

    pred = sub.add_parser("predict", help="classify pictures with a trained checkpoint",
                          description="Classify pictures (files or folders of them) with a trained checkpoint; "
                                      "print the most probable classes of each.",
                          epilog=PREDICT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    pred.add_argument("paths", nargs="+", metavar="IMAGE|FOLDER", help="picture files, or folders of them")
    pred.add_argument("--model", default="models/model.pt", help="checkpoint to use (default: %(default)s)")
    pred.add_argument("--top", type=int, choices=range(1, len(CLASSES) + 1), default=3, metavar="K",
                      help="classes to show per picture (default: 3)")
    pred.add_argument("--invert", choices=("auto", "yes", "no"), default="auto",
                      help="make a light background dark: auto decides from the picture's border (default)")
    pred.add_argument("--no-crop", dest="crop", action="store_false",
                      help="keep the whole picture instead of cropping it to the item first")
    pred.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                      help="where the model runs: auto uses a CUDA GPU when there is one (default)")
    pred.add_argument("--tta", action="store_true",
                      help="average over each picture and its mirror image, as the evaluate stage does with tta: true")
    pred.add_argument("--json", action="store_true", help="print a JSON list, one object per picture")
    pred.set_defaults(run=run_predict)

    srv = sub.add_parser("serve", help="serve the model over HTTP: a web page and a JSON API",
                         description="Serve a trained checkpoint over HTTP: a page to try it in a browser, and "
                                     "POST /predict, fmnist predict's JSON for uploaded pictures.",
                         epilog=SERVE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    srv.add_argument("--host", default="127.0.0.1",
                     help="address to listen on (default: %(default)s, this machine only; 0.0.0.0: every network)")
    srv.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    srv.add_argument("--model", default="models/model.pt", help="checkpoint to serve (default: %(default)s)")
    srv.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                     help="where the model runs: auto uses a CUDA GPU when there is one (default)")
    srv.add_argument("--workers", type=int, default=1, metavar="N",
                     help="server processes, each with the model, sharing the port and the cores (default: 1)")
    srv.add_argument("--body-timeout", type=float, default=10.0, metavar="SECONDS",
                     help="refuse a request whose body takes longer to arrive (default: %(default)g)")
    srv.set_defaults(run=run_serve)

    doc = sub.add_parser("doctor", help="check the installation and what the pipeline needs",
                         description="Check the installation and this repository; say what to do next.",
                         epilog=DOCTOR_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    doc.add_argument("--repo", default=".", type=Path, metavar="PATH",
                     help="the repository's root folder (default: the current one)")
    doc.set_defaults(run=run_doctor)
    return parser


def run_predict(args: argparse.Namespace) -> int:
    from . import predict
    from .runtime import resolve_device

    device = resolve_device(args.device, setting="--device")
    model, info = predict.load_model(args.model, device)  # a missing model stops here, in one line
    pictures, failed = [], 0
    for path in args.paths:
        try:
            files = predict.expand(path)
        except PipelineError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            failed += 1
            continue
        for file in files:
            try:
                pictures.append(predict.read_picture(file, args.invert, args.crop))
            except PipelineError as e:  # this picture only: the others are still classified
                print(f"error: {e}", file=sys.stderr, flush=True)
                failed += 1
    results = predict.classify(model, info, pictures, device, tta=args.tta)
    if args.json:
        print(json.dumps([predict.as_record(r, args.top) for r in results], indent=2))
    else:
        for r in results:
            print(predict.as_text(r, args.top))
    return 1 if failed else 0


def run_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from . import serve
    except ImportError as e:
        raise PipelineError(f"fmnist serve needs the serve extra ({e.name} is missing): "
                            "pip install 'fmnist[serve]', or make") from None
    from .runtime import available_cores

    if not (0 < args.body_timeout < float("inf")):
        raise PipelineError(f"--body-timeout must be a positive number of seconds, got {args.body_timeout:g}")
    if args.workers < 1:
        raise PipelineError(f"--workers must be at least 1, got {args.workers}")
    # a missing or bad checkpoint stops here, in one line, before any worker starts
    app = serve.create_app(args.model, args.device, body_seconds=args.body_timeout)
    if args.workers == 1:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info")
        return 0
    del app  # each worker loads its own, through serve.worker_app
    # the workers inherit these; OMP_NUM_THREADS gives each its share of the cores, as torchrun's does
    os.environ.update(FMNIST_SERVE_MODEL=str(Path(args.model).resolve()), FMNIST_SERVE_DEVICE=args.device,
                      FMNIST_SERVE_BODY_SECONDS=str(args.body_timeout),
                      OMP_NUM_THREADS=str(max(1, available_cores() // args.workers)))
    uvicorn.run("fmnist.serve:worker_app", factory=True, workers=args.workers, host=args.host, port=args.port,
                log_level="info")
    return 0


def run_doctor(args: argparse.Namespace) -> int:
    from . import doctor

    repo = args.repo.expanduser().resolve()
    if not repo.is_dir():
        raise PipelineError(f"{args.repo}: no such folder (--repo takes the repository's root folder)")
    checks = doctor.run_checks(repo)
    print(doctor.render(repo, checks))
    return 1 if any(c.state == doctor.FAIL for c in checks) else 0


def main(argv: list[str] | None = None) -> int:
    """The console script: parse, run the subcommand under :func:`fmnist.stage.run`, return the exit status."""
    args = build_parser().parse_args(argv)
    status: list[int] = []
    stage.run(lambda: status.append(args.run(args)))  # an error is one line and exits 1; signals stop cleanly
    return status[0]


if __name__ == "__main__":
    sys.exit(main())
