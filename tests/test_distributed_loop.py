"""The reduction loop under torchrun (2 CPU ranks, gloo on 127.0.0.1)."""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

SCRIPT = textwrap.dedent('''
    import json, os, sys, time
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset
    from easier import parallel as D
    from easier.methods.easier import Easier
    from easier import RunConfig, StopRule
    from easier.pipeline.reduce import reduce
    from easier.train.finetune import FineTune

    out, epochs = sys.argv[1], int(sys.argv[2])
    resume = len(sys.argv) > 3 and sys.argv[3] == "resume"
    fail_at = int(os.environ.get("EASIER_TEST_FAIL_AT", "0"))
    freeze_at = int(os.environ.get("EASIER_TEST_FREEZE_AT", "0"))
    timeout = float(os.environ.get("EASIER_TEST_TIMEOUT", "0")) or None
    info = D.init_from_env("cpu", timeout_s=timeout)
    torch.set_num_threads(1)

    class Crashy(Easier):
        def step(self, ctx):
            if ctx.iteration in (fail_at, freeze_at):
                # every rank gets here only after rank 0 saved the previous iteration: the
                # fault below cannot race that write (no timing involved)
                D.barrier()
                if info.rank == 1 and ctx.iteration == fail_at:
                    os._exit(3)  # a rank dies without warning
                if info.rank == 1 and ctx.iteration == freeze_at:
                    time.sleep(3600)  # a rank freezes (torchrun's SIGTERM ends it)
            return super().step(ctx)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(),
                          nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 3))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(203, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.3).long()
    train, val = TensorDataset(x[:160], y[:160]), TensorDataset(x[160:], y[160:])
    try:
        res = reduce(model, train, val, method=Crashy(), out=out, resume=resume,
                     finetune=FineTune(epochs=epochs, lr=0.05, batch_size=16),
                     stop=StopRule(delta=100.0, max_removals=3), run=RunConfig(seed=0, log=print))
    except Exception as exc:
        from easier.cli import describe_failure

        print("FAILED", *describe_failure(exc), flush=True)
        D.cleanup()
        sys.exit(1)
    if info.is_main:
        print("RESULT", json.dumps({"sites": res.linearized,
                                    "val": [h["val_acc"] for h in res.history]}))
    D.cleanup()
''')


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path, out, epochs, *extra, ranks=2, fail_at=0, freeze_at=0, timeout=0):
    script = tmp_path / "dist_reduce.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "EASIER_TEST_FAIL_AT": str(fail_at), "EASIER_TEST_FREEZE_AT": str(freeze_at),
           "EASIER_TEST_TIMEOUT": str(timeout)}
    if ranks == 1:
        cmd = [sys.executable, str(script), str(out), str(epochs), *extra]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               str(script), str(out), str(epochs), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)


def result(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    return json.loads(line.split(" ", 1)[1])


@pytest.mark.slow
def test_two_ranks_choose_the_same_sites_as_one_process(tmp_path):
    # No fine-tuning: the choices depend only on the entropy, whose counts are summed exactly.
    one = result(launch(tmp_path, tmp_path / "one", 0, ranks=1))
    two = result(launch(tmp_path, tmp_path / "two", 0))
    assert two["sites"] == one["sites"] and len(two["sites"]) == 3
    assert two["val"] == one["val"]  # exact sharded evaluation
    files = sorted(p.name for p in (tmp_path / "two").iterdir())
    assert "state.pt" in files and "history.jsonl" in files
    assert not any(".tmp" in f for f in files)  # one writer, no torn files
    rows = (tmp_path / "two" / "history.jsonl").read_text().splitlines()
    assert len(rows) == 4  # written once per iteration, by rank 0 only


@pytest.mark.slow
def test_rank_dying_mid_run_leaves_a_resumable_state(tmp_path):
    full = result(launch(tmp_path, tmp_path / "full", 1))
    crashed = launch(tmp_path, tmp_path / "crash", 1, fail_at=2)
    assert crashed.returncode != 0
    hist = (tmp_path / "crash" / "history.jsonl").read_text().splitlines()
    assert len(hist) == 2  # baseline and iteration 1 were saved before rank 1 died
    resumed = result(launch(tmp_path, tmp_path / "crash", 1, "resume"))
    assert resumed == full


@pytest.mark.slow
def test_frozen_rank_times_out_on_every_rank_and_the_run_resumes(tmp_path):
    t0 = time.monotonic()
    # 20 s: long enough that a loaded machine's ordinary collectives never time out before the
    # freeze (3 s did once, at load 15), short enough to prove the frozen rank is noticed
    frozen = launch(tmp_path, tmp_path / "run", 0, freeze_at=2, timeout=20)
    took = time.monotonic() - t0
    assert frozen.returncode != 0
    # each rank prints its own line, in whichever order the ranks reach the timeout
    failed = [x for x in frozen.stdout.splitlines() if x.startswith("FAILED")]
    assert any("rank 0" in x for x in failed), failed
    assert all("--dist-timeout" in x and "--resume" in x for x in failed), failed
    assert took < 240  # without a timeout this waited forever (the issue saw > 180 s)
    hist = (tmp_path / "run" / "history.jsonl").read_text().splitlines()
    assert len(hist) == 2  # baseline and iteration 1 were saved before the freeze
    resumed = result(launch(tmp_path, tmp_path / "run", 0, "resume", ranks=1))
    assert len(resumed["sites"]) == 3 and len(resumed["val"]) == 4
