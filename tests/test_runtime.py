"""No hidden state: numerics pinned, results independent of the thread count, cores shared, runs recorded."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml

from fmnist import params, runtime

from .conftest import ROOT, outputs

PY = [sys.executable, "-c"]


def python(code: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter: numerics are per process, fixed at the first tensor operation."""
    return subprocess.run([*PY, textwrap.dedent(code)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, **kw)


def test_portable_numerics_pin_every_library_and_native_clears_what_the_shell_set():
    code = """
        import os, torch
        from fmnist import runtime
        runtime.pin_numerics({mode!r})
        torch.ones(3).sum()
        print(torch.backends.cpu.get_cpu_capability(), *(os.environ.get(v) for v in runtime.PINNED_VARS))
    """
    shell = {"MKL_CBWR": "AUTO", "ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"}
    portable = python(code.format(mode="portable"), shell)
    assert portable.returncode == 0, portable.stderr
    assert portable.stdout.split() == ["AVX2", "avx2", "AVX2,STRICT", "AVX2"]  # ATEN, MKL, ONEDNN
    native = python(code.format(mode="native"), shell)
    assert native.returncode == 0, native.stderr
    assert native.stdout.split()[1:] == ["None"] * 3  # the shell's values are gone, the libraries choose


def test_pinning_after_pytorch_chose_its_kernels_is_refused():
    if "AVX512F" not in runtime.cpu_isa():
        pytest.skip("needs a CPU whose native kernels are not the portable ones")
    proc = python("""
        import torch
        from fmnist import runtime
        runtime.pin_numerics("native")
        torch.ones(3).sum()  # PyTorch now runs its AVX-512 kernels for the rest of the process
        runtime.pin_numerics("portable")
    """)
    assert proc.returncode == 1
    assert "PipelineError: numerics: portable was set after PyTorch had chosen its AVX512 kernels" in proc.stderr


TRAIN_AND_HASH = """
    import hashlib, io, torch
    from fmnist import params, runtime
    runtime.pin_numerics({numerics!r})
    from fmnist.data import load_processed
    from fmnist.engine import to_device, train_run
    from fmnist.runtime import make_deterministic
    from fmnist.tracking import RunManager
    make_deterministic()
    data = load_processed({data!r})
    train, val = (to_device(s, data.mean, data.std, torch.device("cpu")) for s in (data.train, data.val))
    p = params.train_params({{}}, epochs=2, batch_size=100, numerics={numerics!r}, cpu_kernel={kernel!r}, model={model!r}, width=8,
                           precision={precision!r})
    for threads in {threads!r}:  # one run per thread count, each from the seed
        torch.set_num_threads(threads)
        model, metrics = train_run(p, train, val, RunManager(stream=io.StringIO()))
        assert torch.get_num_threads() == threads
        print(hashlib.sha256(b"".join(t.numpy().tobytes() for t in model.state_dict().values())).hexdigest(), metrics)
"""


def train_hashes(data, threads, numerics="portable", kernel="fused", model="network", precision="auto") -> list[str]:
    """The weights' hash and metrics of a short training in a fresh process, for each thread count in ``threads``."""
    proc = python(TRAIN_AND_HASH.format(data=str(data), threads=list(threads), numerics=numerics, kernel=kernel,
                                        model=model, precision=precision))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def test_the_default_training_gives_the_same_bits_with_1_2_and_4_threads(processed_small):
    # the fused kernel sums in fixed blocks of images, MKL runs in strict mode: no sum depends on threads
    runs = train_hashes(processed_small, (1, 2, 4))
    assert len(runs) == 3 and runs[0] == runs[1] == runs[2], runs


def test_bfloat16_on_the_cpu_reruns_to_the_same_bits_and_differs_from_float32(processed_small):
    bf16 = [train_hashes(processed_small, [2], numerics="native", model="fastnet", precision="bfloat16")[0]
            for _ in range(2)]  # each in its own process
    fp32 = train_hashes(processed_small, [2], numerics="native", model="fastnet", precision="float32")[0]
    assert bf16[0] == bf16[1]
    assert bf16[0] != fp32  # autocast did run the convolutions in bfloat16
    assert runtime.compute_dtype(torch.device("cpu"), "auto") == torch.float32  # auto is float32 on the CPU


def test_bfloat16_on_the_cpu_with_portable_numerics_is_a_one_line_error(tmp_path, processed_small):
    (tmp_path / "params.yaml").write_text("precision: bfloat16\ndevice: cpu\n")
    proc = subprocess.run([sys.executable, str(ROOT / "stages" / "train.py"), "--data", str(processed_small),
                           "--params", str(tmp_path / "params.yaml"), *outputs("train", tmp_path, model="m.pt")],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "error: params.yaml: precision bfloat16 on the CPU needs numerics: native (pinned to AVX2, PyTorch has no "
        "bfloat16 kernels and runs about 20x slower)"]
    assert not (tmp_path / "m.pt").exists()


def test_runs_whose_bits_follow_the_thread_count_are_declared_so():
    p = lambda **kw: __import__("fmnist.params").params.train_params({}, **kw)  # noqa: E731
    assert runtime.thread_independent(p(), "cpu")
    assert runtime.thread_independent(p(model="fastnet"), "cuda")
    # oneDNN's convolutions split their weight-gradient sums by thread; MKL does outside strict mode
    assert not runtime.thread_independent(p(model="fastnet"), "cpu")
    assert not runtime.thread_independent(p(cpu_kernel="torch"), "cpu")
    assert not runtime.thread_independent(p(numerics="native"), "cpu")
    assert not runtime.thread_independent(p(precision="bfloat16"), "cpu")  # the linear layers go to oneDNN


def test_available_cores_honours_affinity_and_omp_num_threads(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert runtime.available_cores() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert runtime.available_cores() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    assert runtime.available_cores() == 3


def stage(name, *args, env=None):
    return subprocess.run([sys.executable, str(ROOT / "stages" / f"{name}.py"), *map(str, args)],
                          capture_output=True, text=True, env={**os.environ, **(env or {})})


def train_stage(tmp_path, data, params, out="out", env=None):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    o = tmp_path / out
    proc = stage("train", "--data", data, "--params", tmp_path / "params.yaml", *outputs("train", o, model="m.pt"),
                 env=env)
    return proc, o


def test_train_records_what_decides_the_bits_in_the_checkpoint_and_the_machine_beside_the_logs(
        tmp_path, processed_small):
    import importlib.metadata

    import torch

    proc, out = train_stage(tmp_path, processed_small, {"epochs": 1}, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    env = torch.load(out / "m.pt", weights_only=True)["environment"]
    assert env["torch"] == torch.__version__ and env["device"] == "cpu"
    assert env["packages"] == {name: importlib.metadata.version(name) for name in runtime.OUTPUT_PACKAGES}
    assert env["numerics"] == "portable" and env["aten_cpu_capability"] == "AVX2"
    assert env["numerics_env"] == runtime.NUMERICS_ENV["portable"]
    assert env["cpu_kernel"] == "fused" and env["kernel"].startswith("fused")
    assert {"cuda", "cudnn", "python", "platform"} <= set(env)
    # the bits do not depend on the thread count or the CPU model, so neither is in the hashed record
    assert env["thread_independent"] is True and "threads" not in env and "cpu" not in env
    machine = json.loads((out / "runs" / "train" / "machine.json").read_text())
    assert machine["threads"] == 1 and machine["cpu"] == runtime.cpu_model() and "AVX2" in machine["cpu_isa"]


def test_the_thread_count_is_recorded_where_it_decides_the_bits():
    import torch

    p = params.train_params({"model": "fastnet"})
    assert runtime.thread_independent(p, "cpu") is False
    assert runtime.environment(p, torch.device("cpu"), 3)["threads"] == 3
    assert "threads" not in runtime.environment(params.train_params({}), torch.device("cpu"), 3)


def test_a_loss_that_becomes_nan_stops_training_with_the_epoch_the_batch_and_a_hint(tmp_path, processed_small):
    proc, out = train_stage(tmp_path, processed_small, {"epochs": 3, "lr": 1.0e6, "schedule": "constant"})
    assert proc.returncode == 1
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: training diverged: the loss became ") and "at epoch 1, batch " in line
    assert line.endswith("(lr 1000000.0): lower lr in params.yaml")
    # no checkpoint, log, resume state or temporary file or folder (the logs' parent folder may remain)
    assert [p for p in out.rglob("*") if p.is_file() or p.name.endswith(".tmp")] == []


def test_accuracies_are_exact_fractions_of_counts(tmp_path, processed_small):
    import torch

    proc, out = train_stage(tmp_path, processed_small, {"epochs": 1})
    assert proc.returncode == 0, proc.stderr
    metrics = torch.load(out / "m.pt", weights_only=True)["metrics"]
    counts = {"train_accuracy": 600, "val_accuracy": 100}  # processed_small's split sizes
    for key, n in counts.items():
        assert metrics[key] == round(metrics[key] * n) / n, (key, metrics[key])
