"""The seed's RunBuilder and RunManager, under the names users know: RunManager only tracks and records,
averages losses over the true number of samples and keeps per-batch values on the device until the epoch ends."""

from __future__ import annotations

import sys
import time
import warnings
from collections import namedtuple
from collections.abc import Mapping, Sequence
from itertools import product
from pathlib import Path

import torch
from torch import nn

from .fileio import write_csv, write_json
from .tensorboard_logs import add_histogram, freeze_logs, image_grid

TIMINGS = ("epoch_duration", "run_duration")  # the table's wall-clock columns: never in files kept in git


class RunBuilder:
    @staticmethod
    def get_runs(params: Mapping[str, Sequence]) -> list:
        """The cartesian product of ``params``' value lists, as named tuples (``run.lr``, ``str(run)``)."""
        Run = namedtuple("Run", params.keys())
        return [Run(*values) for values in product(*params.values())]


def run_name(run) -> str:
    """A folder-safe name from a run's values, e.g. ``lr=0.01,batch_size=1000``."""
    return ",".join(f"{k}={v}" for k, v in run._asdict().items())


class RunManager:
    """Records runs and their epochs: TensorBoard logs under ``log_root/<name>`` (None: none), rows, a progress
    line per epoch. ``histograms``: every parameter and its gradient, once per epoch."""

    _HEADER = (f"{'run':>4} {'epoch':>5} {'loss':>8} {'accuracy':>8} {'val_loss':>9} {'val_acc':>8} {'epoch':>8} "
               f"{'run':>9}  params")
    _ROW = ("{run:>4} {epoch:>5} {loss:>8.4f} {accuracy:>8.2%} {val_loss:>9} {val_accuracy:>8} {epoch_duration:>7.1f}s "
            "{run_duration:>8.1f}s  {name}")

    def __init__(self, log_root: str | Path | None = None, histograms: bool = True, stream=sys.stderr):
        self.log_root = Path(log_root) if log_root is not None else None
        self.histograms = histograms
        self.stream = stream
        self.run_data: list[dict] = []
        self.run_count = 0
        self.run_params = None
        self.network: nn.Module | None = None
        self.tb = None
        self.epoch_count = 0
        self._reset_epoch()

    def _reset_epoch(self) -> None:
        self.epoch_loss = 0.0  # sum of per-sample losses (a device tensor while the epoch runs)
        self.epoch_num_correct = 0
        self.epoch_samples = 0

    def begin_run(
        self, run, network: nn.Module, name: str | None = None, example: torch.Tensor | None = None,
        log_dir: str | Path | None = None, resume: dict | None = None,
    ) -> None:
        """Start recording ``run`` (a named tuple) of ``network``; ``example`` (a batch) draws the graph and images.

        TensorBoard writes to ``log_dir``, else ``log_root/<name>``. ``resume``: a :func:`fmnist.resume.run_state`
        of this run cut short, whose rows and events are put back."""
        self.run_start_time = time.perf_counter()
        self.run_params = run
        self.run_count += 1
        self.network = network
        self.epoch_count = 0
        self.run_name = name or run_name(run)
        if log_dir is None and self.log_root is not None:
            log_dir = self.log_root / self.run_name
        if resume is not None:
            self.epoch_count = len(resume["rows"])
            self.run_data.extend(resume["rows"])
            self.run_start_time -= resume["rows"][-1]["run_duration"] if resume["rows"] else 0.0
            if log_dir is not None:
                from .resume import restore

                restore(log_dir, resume["logs"])
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter  # heavy import, only when logging

            self.tb = SummaryWriter(log_dir=str(log_dir))
            if example is not None and resume is None:  # a resumed run's log has them already
                self.tb.add_image("images", image_grid(example[:64].float().cpu(), nrow=8))
                was_training = network.training
                network.eval()
                with warnings.catch_warnings():  # add_graph traces with torch.jit, which warns it is deprecated
                    warnings.simplefilter("ignore", FutureWarning)
                    self.tb.add_graph(network, example[:8])
                network.train(was_training)
        print(self._HEADER, file=self.stream, flush=True)
        if resume is not None:
            for row in resume["rows"]:
                print(self._format(row), file=self.stream)
            print(f"resumed after epoch {self.epoch_count}", file=self.stream, flush=True)

    def add_finished_run(self, run, rows: list[dict]) -> None:
        """Record a run that finished in an earlier, interrupted process (its logs are already in place)."""
        self.run_count += 1
        self.run_params = run
        self.run_name = run_name(run)
        self.run_data.extend(rows)

    @property
    def log_dir(self) -> Path | None:
        """The current run's TensorBoard folder, or None when it is not logged."""
        return None if self.tb is None else Path(self.tb.log_dir)

    def end_run(self, hparams: Mapping | None = None, metrics: Mapping[str, float] | None = None) -> None:
        """Close the run's TensorBoard log, writing ``hparams`` and final ``metrics`` for the HPARAMS view."""
        if self.tb is not None:
            if hparams is not None:
                self.tb.add_hparams(
                    {k: v for k, v in hparams.items() if isinstance(v, (int, float, str, bool))},
                    {f"hparam/{k}": v for k, v in (metrics or {}).items()},
                    run_name=".",  # into this run's own folder, not a timestamped sub-folder
                )
            self.tb.close()
            freeze_logs(self.tb.log_dir)
            self.tb = None

    def abort_run(self) -> None:
        """Stop writing a run that failed: its TensorBoard writer thread ends here, not after its folder is gone."""
        if self.tb is not None:
            self.tb.close()
            self.tb = None

    def begin_epoch(self) -> None:
        self.epoch_start_time = time.perf_counter()
        self.epoch_count += 1
        self._reset_epoch()

    def track_loss(self, loss: torch.Tensor, batch_size: int) -> None:
        """Add a batch's *mean* loss, weighted by the batch's true size."""
        self.epoch_loss = self.epoch_loss + loss.detach() * batch_size
        self.epoch_samples += batch_size

    def track_num_correct(self, preds: torch.Tensor, labels: torch.Tensor) -> None:
        self.epoch_num_correct = self.epoch_num_correct + (preds.detach().argmax(dim=1) == labels).sum()

    def end_epoch(self, val_loss: float | None = None, val_accuracy: float | None = None) -> dict:
        """Close the epoch: averages over the samples seen, TensorBoard scalars and histograms, one row."""
        n = max(self.epoch_samples, 1)
        now = time.perf_counter()
        row = {
            "run": self.run_count, "name": self.run_name, "epoch": self.epoch_count,
            "loss": float(self.epoch_loss) / n, "accuracy": int(self.epoch_num_correct) / n,  # exact: two counts
            "val_loss": val_loss, "val_accuracy": val_accuracy,
            "epoch_duration": now - self.epoch_start_time, "run_duration": now - self.run_start_time,
            **(self.run_params._asdict() if self.run_params is not None else {}),
        }
        self.run_data.append(row)
        if self.tb is not None:
            e = self.epoch_count
            self.tb.add_scalar("Loss/train", row["loss"], e)
            self.tb.add_scalar("Accuracy/train", row["accuracy"], e)
            if val_loss is not None:
                self.tb.add_scalar("Loss/val", val_loss, e)
                self.tb.add_scalar("Accuracy/val", val_accuracy, e)
            if self.histograms:
                for name, param in self.network.named_parameters():
                    add_histogram(self.tb, name, param, e)
                    if param.grad is not None:
                        add_histogram(self.tb, f"{name}.grad", param.grad, e)
            self.tb.flush()
        print(self._format(row), file=self.stream, flush=True)
        return row

    def _format(self, row: dict) -> str:
        val_loss, val_acc = row["val_loss"], row["val_accuracy"]
        return self._ROW.format(**{**row, "val_loss": "-" if val_loss is None else f"{val_loss:.4f}",
                                   "val_accuracy": "-" if val_acc is None else f"{val_acc:.2%}"})

    def run_rows(self) -> list[dict]:
        """The rows of the current run."""
        return [r for r in self.run_data if r["run"] == self.run_count]

    def dataframe(self) -> "pd.DataFrame":  # noqa: F821
        """Every row as a pandas DataFrame, as the seed's RunManager gives it."""
        import pandas as pd

        return pd.DataFrame.from_records(self.run_data)

    def save(self, file_name: str | Path) -> None:
        """Write every row to ``<file_name>.csv`` and ``<file_name>.json``, atomically."""
        file_name = Path(file_name)
        write_csv(file_name.with_suffix(".csv"), self.run_data)
        write_json(file_name.with_suffix(".json"), self.run_data)
