"""`fmnist serve` under load: requests per second, latency and memory, at 1, 8 and 64 clients.

    python bench/serve.py                         # 20 s per row, 1 and 2 server processes
    python bench/serve.py --seconds 5 --workers 2 --clients 8 --pictures png28

For each number of server processes it starts `fmnist serve` on the trained model
(models/model.pt); then, for each number of clients, wrk (Debian's package: apt-get install wrk)
keeps that many connections busy POSTing one picture as a raw body to /predict: a 28x28 PNG test
image, then a photo-sized JPEG (the same image enlarged to 4032x3024 on a light background), and
GET /healthz with the same connections, the server's own floor measured in the same run, which the
"of healthz" column compares with. Memory is the server's processes' resident set, summed: after
the row and at its peak since the server started (flat over the run when the two stay close).
``--json FILE`` writes the figures.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LUA = """wrk.method = "POST"
wrk.headers["Content-Type"] = os.getenv("FMNIST_BENCH_TYPE")
local f = assert(io.open(os.getenv("FMNIST_BENCH_PNG"), "rb")); wrk.body = f:read("*a"); f:close()
"""


def pictures(raw: Path) -> dict[str, tuple[bytes, str]]:
    """name: (the picture's bytes, its content type), from the first test image."""
    from PIL import Image

    from fmnist.data import read_idx_pair

    item = Image.fromarray(read_idx_pair(raw, "test")[0][0])
    small, photo = io.BytesIO(), io.BytesIO()
    item.save(small, format="PNG")
    side = 2800
    big = Image.eval(item.resize((side, side), Image.Resampling.BICUBIC), lambda v: 255 - v).convert("RGB")
    canvas = Image.new("RGB", (4032, 3024), (255, 255, 255))
    canvas.paste(big, ((4032 - side) // 2, (3024 - side) // 2))
    canvas.save(photo, format="JPEG", quality=90)
    return {"png28": (small.getvalue(), "image/png"), "photo": (photo.getvalue(), "image/jpeg")}


def wrk(url: str, clients: int, seconds: float, script: Path | None, env: dict) -> dict:
    cmd = ["wrk", "-t1", f"-c{clients}", f"-d{seconds:g}s", "--latency", "--timeout", "10s", url]
    out = subprocess.run(cmd + (["-s", str(script)] if script else []), capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", **env}, check=True).stdout

    def ms(label: str) -> float:
        value, unit = re.search(rf"^\s+{label}\s+([\d.]+)(us|ms|s)$", out, re.M).groups()
        return float(value) * {"us": 1e-3, "ms": 1, "s": 1e3}[unit]

    errors = sum(int(n) for n in re.findall(r"(?:Non-2xx or 3xx responses|connect|read|write|timeout):? (\d+)", out))
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), "p50_ms": ms("50%"),
            "p99_ms": ms("99%"), "errors": errors}


def memory_mib(pid: int, field: str) -> float:
    """``field`` of /proc/PID/status (VmRSS: resident now; VmHWM: its peak) for ``pid`` and its children, in MiB."""
    pids = [pid, *map(int, Path(f"/proc/{pid}/task/{pid}/children").read_text().split())]
    return sum(int(re.search(rf"{field}:\s+(\d+)", Path(f"/proc/{p}/status").read_text()).group(1)) for p in pids) / 1024


def serve(model: Path, workers: int) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fmnist = Path(sys.executable).parent / "fmnist"
    proc = subprocess.Popen([str(fmnist), "serve", "--model", str(model), "--port", str(port),
                             "--workers", str(workers)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            time.sleep(2 if workers > 1 else 0)  # every worker listening, not only the first
            return proc, port
        except OSError:
            if proc.poll() is not None:
                sys.exit(f"fmnist serve exited with status {proc.returncode}: run it by hand to see why")
            time.sleep(0.2)
    sys.exit("fmnist serve did not start in 120 s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "model.pt")
    ap.add_argument("--raw", type=Path, default=ROOT / "data" / "raw", help="Fashion-MNIST's files, for a test image")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--pictures", nargs="+", choices=("png28", "photo"), default=["png28", "photo"])
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (apt-get install wrk)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "post.lua"
        script.write_text(LUA)
        made = pictures(args.raw)
        print(f"{'workers':>7} {'clients':>7} {'picture':>7} {'rps':>7} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6} "
              f"{'of healthz':>10} {'MiB now':>7} {'MiB peak':>8}")
        for workers in args.workers:
            proc, port = serve(args.model, workers)
            try:
                for clients in args.clients:
                    floor = wrk(f"http://127.0.0.1:{port}/healthz", clients, args.seconds, None, {})["rps"]
                    for name in args.pictures:
                        data, kind = made[name]
                        (Path(tmp) / name).write_bytes(data)
                        env = {"FMNIST_BENCH_PNG": str(Path(tmp) / name), "FMNIST_BENCH_TYPE": kind}
                        row = {"workers": workers, "clients": clients, "picture": name,
                               **wrk(f"http://127.0.0.1:{port}/predict", clients, args.seconds, script, env),
                               "healthz_rps": floor, "rss_mib": memory_mib(proc.pid, "VmRSS"),
                               "peak_mib": memory_mib(proc.pid, "VmHWM")}
                        row["of_healthz"] = row["rps"] / floor
                        rows.append(row)
                        print(f"{workers:>7} {clients:>7} {name:>7} {row['rps']:>7.0f} {row['p50_ms']:>7.2f} "
                              f"{row['p99_ms']:>7.2f} {row['errors']:>6} {row['of_healthz']:>10.3f} "
                              f"{row['rss_mib']:>7.0f} {row['peak_mib']:>8.0f}", flush=True)
            finally:
                proc.terminate()
                proc.wait(timeout=60)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
