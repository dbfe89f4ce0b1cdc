"""`fmnist serve` under load: requests per second, latency and memory, at 1, 8 and 64 clients.

    python bench/serve.py                         # 20 s per row, 1 and 2 server processes
    python bench/serve.py --seconds 5 --workers 2 --clients 8

Each row starts `fmnist serve` on the trained model (models/model.pt), then wrk (Debian's package:
apt-get install wrk) keeps N connections busy POSTing one 28x28 PNG test image (as raw image/png)
to /predict, then GET /healthz with the same N: the server's own floor, measured in the same run,
which the "of healthz" column compares with. Memory is the peak resident set of the server's
processes, summed. ``--json FILE`` writes the figures.
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
wrk.headers["Content-Type"] = "image/png"
local f = assert(io.open(os.getenv("FMNIST_BENCH_PNG"), "rb")); wrk.body = f:read("*a"); f:close()
"""


def test_png(raw: Path) -> bytes:
    from PIL import Image

    from fmnist.data import read_idx_pair

    images, _ = read_idx_pair(raw, "test")
    buffer = io.BytesIO()
    Image.fromarray(images[0]).save(buffer, format="PNG")
    return buffer.getvalue()


def wrk(url: str, clients: int, seconds: float, script: Path | None, env: dict) -> dict:
    cmd = ["wrk", "-t1", f"-c{clients}", f"-d{seconds:g}s", "--latency", "--timeout", "10s", url]
    out = subprocess.run(cmd + (["-s", str(script)] if script else []), capture_output=True, text=True, env=env,
                         check=True).stdout

    def ms(label: str) -> float:
        value, unit = re.search(rf"^\s+{label}\s+([\d.]+)(us|ms|s)$", out, re.M).groups()
        return float(value) * {"us": 1e-3, "ms": 1, "s": 1e3}[unit]

    errors = sum(int(n) for n in re.findall(r"(?:Non-2xx or 3xx responses|connect|read|write|timeout):? (\d+)", out))
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), "p50_ms": ms("50%"),
            "p99_ms": ms("99%"), "errors": errors}


def peak_mib(pid: int) -> float:
    """The peak resident memory of ``pid`` and its children, in MiB."""
    pids = [pid, *map(int, Path(f"/proc/{pid}/task/{pid}/children").read_text().split())]
    return sum(int(re.search(r"VmHWM:\s+(\d+)", Path(f"/proc/{p}/status").read_text()).group(1)) for p in pids) / 1024


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
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (apt-get install wrk)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        picture, script = Path(tmp) / "item.png", Path(tmp) / "post.lua"
        picture.write_bytes(test_png(args.raw))
        script.write_text(LUA)
        env = {"FMNIST_BENCH_PNG": str(picture), "PATH": "/usr/bin:/bin"}
        print(f"{'workers':>7} {'clients':>7} {'rps':>8} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6} "
              f"{'healthz rps':>11} {'of healthz':>10} {'peak MiB':>8}")
        for workers in args.workers:
            proc, port = serve(args.model, workers)
            try:
                for clients in args.clients:
                    pred = wrk(f"http://127.0.0.1:{port}/predict", clients, args.seconds, script, env)
                    floor = wrk(f"http://127.0.0.1:{port}/healthz", clients, args.seconds, None, env)
                    row = {"workers": workers, "clients": clients, **pred, "healthz_rps": floor["rps"],
                           "of_healthz": pred["rps"] / floor["rps"], "peak_mib": peak_mib(proc.pid)}
                    rows.append(row)
                    print(f"{workers:>7} {clients:>7} {row['rps']:>8.0f} {row['p50_ms']:>7.2f} {row['p99_ms']:>7.2f} "
                          f"{row['errors']:>6} {row['healthz_rps']:>11.0f} {row['of_healthz']:>10.2f} "
                          f"{row['peak_mib']:>8.0f}", flush=True)
            finally:
                proc.terminate()
                proc.wait(timeout=60)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
