"""TensorBoard logs that DVC can hash: event files rewritten as a function of the run alone, and the
pieces of them (image grid, histograms) computed without machine-dependent rounding."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .fileio import atomic_path


def freeze_logs(folder: str | Path) -> None:
    """Make the TensorBoard logs under ``folder`` a function of the run alone, so that DVC hashes them the same:
    each run's event files merged into one of a fixed name, every event's time set to its step (the epoch),
    the hparams dates removed and the graph's maps in a fixed order."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto import event_pb2, graph_pb2
    from tensorboard.plugins.hparams import plugin_data_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter

    for run_dir in sorted({f.parent for f in Path(folder).rglob("*tfevents*")}):
        paths = sorted(run_dir.glob("*tfevents*"), key=_creation_order)
        events = []
        for path in paths:  # a resumed run has two or more files: merged into one, in order
            for record in RawEventFileLoader(str(path)).Load():
                event = event_pb2.Event.FromString(record)
                if event.HasField("file_version") and events:
                    continue  # each file starts with one; a single file keeps only the first
                event.wall_time = float(event.step)
                if event.HasField("graph_def"):
                    graph = graph_pb2.GraphDef.FromString(event.graph_def)
                    event.graph_def = graph.SerializeToString(deterministic=True)
                for value in event.summary.value:
                    if value.metadata.plugin_data.plugin_name == "hparams":
                        data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
                        if data.HasField("session_start_info"):
                            data.session_start_info.start_time_secs = 0.0
                        if data.HasField("session_end_info"):
                            data.session_end_info.end_time_secs = 0.0
                        value.metadata.plugin_data.content = data.SerializeToString(deterministic=True)
                events.append(event.SerializeToString(deterministic=True))
        target = run_dir / "events.out.tfevents.0000000000.fmnist"
        with atomic_path(target) as tmp, open(tmp, "wb") as f:
            writer = RecordWriter(f)
            for event in events:
                writer.write(event)
        for path in paths:
            if path != target:
                path.unlink()


def _creation_order(path: Path) -> tuple[int, int]:
    """Sort key of ``events.out.tfevents.<seconds>.<host>.<pid>.<n>``, ``n`` counting a process's writers."""
    parts = path.name.split(".")
    seconds = int(parts[3]) if len(parts) > 3 and parts[3].isdigit() else 0
    return seconds, int(parts[-1]) if parts[-1].isdigit() else -1


def image_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2) -> torch.Tensor:
    """Gray images [N, 1, H, W] as one RGB picture [3, rows * (H + p) + p, nrow * (W + p) + p], scaled to [0, 1]:
    torchvision's ``make_grid(..., normalize=True)`` pixel for pixel, without importing torchvision (slow)."""
    n, _, h, w = images.shape
    low, high = float(images.min()), float(images.max())
    scaled = images.clamp(low, high).sub(low).div(max(high - low, 1e-5))
    cols, rows = min(nrow, n), -(-n // nrow)
    grid = images.new_zeros((3, rows * (h + padding) + padding, cols * (w + padding) + padding))
    for k in range(n):
        y, x = padding + (k // nrow) * (h + padding), padding + (k % nrow) * (w + padding)
        grid[:, y : y + h, x : x + w] = scaled[k]
    return grid


def add_histogram(writer, tag: str, values: torch.Tensor, step: int) -> None:
    """``writer.add_histogram`` with exactly rounded sums: TensorBoard's own sum of squares is a BLAS
    dot product, whose last bit depends on the thread count and the CPU."""
    from torch.utils.tensorboard.summary import make_histogram

    v = values.detach().double().cpu().numpy().ravel()
    h = make_histogram(v, writer.default_bins)
    writer.add_histogram_raw(tag, h.min, h.max, h.num, math.fsum(v.tolist()), math.fsum((v * v).tolist()),
                             list(h.bucket_limit), list(h.bucket), step)
