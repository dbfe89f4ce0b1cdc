"""ThreadShare: trainings on one machine share its cores, and leave alone the cores other work uses."""

import os
import subprocess
import sys
import textwrap
import time


from fmnist import threadshare

PY = [sys.executable, "-c"]


def hold_share(folder, seconds=30) -> subprocess.Popen:
    """Another training's registration: a process holding a ThreadShare in ``folder``."""
    proc = subprocess.Popen([*PY, textwrap.dedent(f"""
        import sys, time
        from fmnist.threadshare import ThreadShare
        with ThreadShare(cores=4, folder={str(folder)!r}):
            print("in", flush=True)
            time.sleep({seconds})
    """)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "in"
    return proc


def test_trainings_running_at_once_share_the_cores_and_a_dead_ones_share_returns(tmp_path, monkeypatch):
    monkeypatch.setattr(threadshare, "busy_seconds", lambda cpus: None)  # this test counts trainings, not load
    p = __import__("fmnist.params").params.train_params({})
    with threadshare.ThreadShare(cores=4, folder=tmp_path) as mine:
        assert mine.count() == 1 and mine.threads_for(follow=True) == 4
        other = hold_share(tmp_path)
        try:
            assert mine.count() == 2
            assert mine.threads_for(follow=True) == 2
            assert mine.threads_for(follow=False) == 4  # bits that depend on threads keep every core
            third = hold_share(tmp_path)
            assert mine.count() == 3 and mine.threads_for(follow=True) == 1
            third.kill()  # kill -9: no clean-up ran, its lock died with it
            third.wait()
            assert mine.count() == 2
            assert len(list(tmp_path.glob("*.lock"))) == 2  # the dead one's file was removed
            import torch

            before = torch.get_num_threads()
            try:
                assert mine.rebalance(p, "cpu") == 2 and torch.get_num_threads() == 2
            finally:
                torch.set_num_threads(before)
        finally:
            other.kill()
            other.wait()
        assert mine.count() == 1
    assert list(tmp_path.iterdir()) == []


def test_cores_busy_with_other_work_are_not_taken(monkeypatch):
    clock = {"wall": 0.0, "busy": 0.0, "own": 0.0}
    monkeypatch.setattr(threadshare, "busy_seconds", lambda cpus: clock["busy"])
    monkeypatch.setattr(threadshare.time, "monotonic", lambda: clock["wall"])
    monkeypatch.setattr(threadshare.time, "process_time", lambda: clock["own"])
    share = threadshare.ThreadShare(cores=4, folder="/nonexistent/never-registered")

    def epoch(seconds, own_cores, other_cores):
        clock["wall"] += seconds
        clock["own"] += seconds * own_cores
        clock["busy"] += seconds * (own_cores + other_cores)
        return share.threads_for(follow=True)

    assert share.threads_for(follow=True) == 4  # nothing measured yet
    assert epoch(2.0, 4, 0.0) == 4              # alone: every core
    assert epoch(2.0, 2.5, 1.5) == 2            # a compiler took 1.5 cores: leave it 2
    assert epoch(2.0, 2, 2.8) == 1              # nearly all of them: at least one thread
    assert epoch(2.0, 1, 0.3) == 4              # it finished: every core again
    assert share.threads_for(follow=False) == 4  # bits that depend on threads keep every core


def test_a_busy_process_beside_a_training_is_measured(tmp_path):
    # the real /proc/stat: a process spinning on this machine's cores shows as about one core of load
    spin = subprocess.Popen([*PY, "import time\nend = time.time() + 3\nwhile time.time() < end: pass"])
    try:
        share = threadshare.ThreadShare(folder=tmp_path)
        assert share.others_load() > 0.6  # the first measurement too: a training that starts beside it
        time.sleep(1.0)
        assert share.others_load() > 0.6  # (other work on a busy machine can only add to it)
    finally:
        spin.kill()
        spin.wait()


def test_trainings_register_in_a_folder_only_their_user_can_enter(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    with threadshare.ThreadShare() as share:
        assert share.folder == tmp_path / f"fmnist-trainings-{os.getuid()}"
        assert share.folder.stat().st_mode & 0o777 == 0o700 and share.count() == 1
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o1777)  # a folder others can write to: their files there could pose as trainings
    with threadshare.ThreadShare(folder=shared) as share:
        assert list(shared.iterdir()) == [] and share.count() == 1
    assert f"not a private folder of this user (owner {os.getuid()}, mode 777)" in caplog.text
