"""Two-node runs on this machine: two torchrun agents that meet through c10d rendezvous on
localhost (DDP and DeepSpeed ZeRO-3, gloo), and examples/slurm/fit.sbatch under a simulated
SLURM allocation (tests/fake_slurm: srun starts one task per "node" with the variables srun
sets; scontrol records the requeue). Each node is one CPU process.

What is checked (docs/multinode.md, "What the tests prove"):
* a two-node run is a single-process run with the doubled batch: the same train/loss at every
  step (metrics.csv) and the same exported weights, within the tolerances below;
* report.json says 2 processes on 2 nodes; there is one run folder, and only global rank 0
  writes into it (an audit hook, tests/write_audit, records every Python-level write of each
  rank; ZeRO-3's rank 1 writes its own checkpoint shards only);
* SLURM's warning signal (SIGUSR1) saves a checkpoint at a step boundary, requeues the job and
  exits 0; the requeued job resumes and ends with the uninterrupted run's weights; SIGTERM does
  the same in one process;
* a node killed with SIGKILL makes the other exit with one error line in bounded time;
  relaunching both with run.resume=last ends with the uninterrupted run's weights;
* a node that cannot see rank 0's run folder stops with a message saying so.

Every process gets a hard timeout: a hang fails the test and kills the process tree.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from clipft import runner
from clipft.cli import main
from clipft.cluster import LostProcess, explain_lost_process, is_lost_process
from clipft.config import load_config
from clipft.models import read_state_dict, read_training_state
from clipft.preemption import StopOnSignal

ROOT = Path(__file__).resolve().parent.parent
FAKE_SLURM = ROOT / "tests" / "fake_slurm"
AUDIT = ROOT / "tests" / "write_audit"
SBATCH = ROOT / "examples" / "slurm" / "fit.sbatch"
RECIPE = "recipes/quickstart.yaml"
STEPS = 12
TIMEOUT_S = 300  # per launch: a hang fails the test
COLLECTIVE_TIMEOUT_S = 60

# Measured on this machine (2 CPU cores): train/loss of two nodes vs one process differs by at
# most 2e-7 relative (DDP and ZeRO-3); exported weights by at most 1.5e-5 absolute after 12
# AdamW steps (largest weight 2.66). A resumed run equals the uninterrupted run of the same
# world size to float rounding.
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 2e-4
RESUME_ATOL = 1e-6

COMMON = [
    f"trainer.max_steps={STEPS}", "data.synthetic.train_size=640", "data.synthetic.val_size=32", "eval.zeroshot=[]",
    "eval.compositional.source=null", "eval.gap=false", f"trainer.val_check_interval={STEPS}",
    "trainer.check_val_every_n_epoch=null", "trainer.enable_progress_bar=false", "data.num_workers=0", "run.plot=false",
    "trainer.log_every_n_steps=1", "trainer.deterministic=true", "run.checkpoint_every_n_steps=2", "run.threads=1",
]
CPU = ["trainer.accelerator=cpu", "trainer.precision=fp32"]
# per node: 1 process with batch 8; the reference: 1 process with batch 16
TWO_NODES = ["include=configs/trainer/multinode.yaml", *COMMON, *CPU, "trainer.num_nodes=2", "trainer.devices=1",
             "data.batch_size=8", f"trainer.collective_timeout_s={COLLECTIVE_TIMEOUT_S}"]
ZERO3 = ["include=configs/trainer/deepspeed_zero3.yaml", *TWO_NODES]  # multinode.yaml after it: its counts win
ONE_PROCESS = [*COMMON, *CPU, "trainer.devices=1", "data.batch_size=16"]


# ------------------------------------------------------------------ processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def base_env(audit_log: Optional[Path] = None, audit_root: Optional[Path] = None) -> dict[str, str]:
    """This environment without a launcher's or a scheduler's variables (CI may itself run
    under one), with this checkout importable and, optionally, the write audit on."""
    drop = ("SLURM_", "TORCHELASTIC_", "PET_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK", "MASTER_ADDR",
                "MASTER_PORT", runner.RUN_DIR_ENV):
        env.pop(key, None)
    paths = [str(ROOT), *([str(AUDIT)] if audit_log else [])]
    env.update(PYTHONPATH=os.pathsep.join(paths), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    if audit_log and audit_root:
        env.update(CLIPFT_WRITE_AUDIT=str(audit_log), CLIPFT_WRITE_AUDIT_ROOT=str(audit_root))
    return env


class Launch:
    """A process started in its own session, its output in a file."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path, cwd: Path = ROOT) -> None:
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.started = time.monotonic()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def descendants(pid: int) -> list[int]:
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                for child in map(int, f.read().split()):
                    found += [child, *descendants(child)]
    except OSError:
        pass
    return found


def kill_tree(pid: int, signum: int = signal.SIGKILL) -> None:
    """The process and everything it started (torchrun starts its workers in new sessions)."""
    for p in [pid, *descendants(pid)]:
        try:
            os.kill(p, signum)
        except ProcessLookupError:
            pass


def wait_all(launches: list[Launch], timeout: float = TIMEOUT_S) -> list[int]:
    deadline = time.monotonic() + timeout
    codes = []
    for launch in launches:
        try:
            codes.append(launch.proc.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            for other in launches:
                kill_tree(other.proc.pid)
                other.proc.wait()
            pytest.fail(f"no exit within {timeout:.0f} s; {launch.log}:\n{launch.output()[-3000:]}")
    return codes


def wait_for(condition: Callable[[], bool], launches: list[Launch], what: str, timeout: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline or any(l.proc.poll() is not None for l in launches):
            for launch in launches:
                kill_tree(launch.proc.pid)
                launch.proc.wait()
            tails = "\n".join(f"{l.log}:\n{l.output()[-2000:]}" for l in launches)
            pytest.fail(f"{what}: not reached\n{tails}")
        time.sleep(0.02)


def torchrun(out: Path, overrides: list[str], logs: Path, tag: str, cwds: tuple[Path, Path] = (ROOT, ROOT),
             audit: bool = False, recipe: str = RECIPE) -> list[Launch]:
    """Two torchrun agents, node 0 hosting the c10d rendezvous store (is_host) and started
    first (rendezvous order gives it global rank 0 in practice; tests that care look it up).
    Their output goes to LOGS/TAG.node<i>.log, the write audit to LOGS/TAG.audit."""
    port = free_port()
    launches = []
    for node in (0, 1):
        env = base_env(logs / f"{tag}.audit" if audit else None, out)
        argv = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", f"--node-rank={node}",
                "--rdzv-backend=c10d", f"--rdzv-endpoint=localhost:{port}", "--rdzv-conf", f"is_host={int(node == 0)}",
                "--max-restarts=0", "-m", "clipft", "fit", recipe, *overrides, f"run.out_dir={out}"]
        launches.append(Launch(argv, env, logs / f"{tag}.node{node}.log", cwd=cwds[node]))
        time.sleep(0.5)
    return launches


def worker_rank(agent: Launch) -> Optional[int]:
    for pid in descendants(agent.proc.pid):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
        except OSError:
            continue
        if b"RANK" in env:
            return int(env[b"RANK"])
    return None


# ------------------------------------------------------------------ results


def the_run(out: Path) -> Path:
    runs = sorted((out / "quickstart").iterdir())
    assert len(runs) == 1, runs  # exactly one run folder, whatever the number of nodes
    return runs[0]


def losses(run: Path) -> dict[int, float]:
    with open(run / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    steps = [int(r["step"]) for r in rows]
    assert len(steps) == len(set(steps)), "a step logged twice"
    return {int(r["step"]): float(r["train/loss"]) for r in rows}


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def exported(run: Path, out: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, torch.Tensor]:
    assert main(["export", str(run), "--out", str(out)]) == 0
    capsys.readouterr()
    return load_file(str(out / "open_clip_model.safetensors"))


def audit_lines(logs: Path, tag: str) -> dict[str, list[str]]:
    """Paths written per rank ('-': a torchrun agent)."""
    by_rank: dict[str, list[str]] = {}
    path = logs / f"{tag}.audit"
    for line in path.read_text().splitlines() if path.exists() else []:
        rank, _event, written = line.split("\t")
        by_rank.setdefault(rank, []).append(written)
    return by_rank


# ------------------------------------------------------------------ shared runs


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One process with the doubled batch (in this process: no start-up cost)."""
    out = tmp_path_factory.mktemp("reference")
    threads = torch.get_num_threads()
    try:
        runner.fit(load_config(RECIPE, [*ONE_PROCESS, f"run.out_dir={out}"]))
    finally:
        torch.set_num_threads(threads)
    return the_run(out)


@pytest.fixture(scope="module")
def ddp_two_nodes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The two-node DDP run under torchrun (also the uninterrupted run the fault tests end
    with): (its run folder, its output folder)."""
    logs = tmp_path_factory.mktemp("ddp")
    out = logs / "runs"
    launches = torchrun(out, TWO_NODES, logs, "ddp", audit=True)
    codes = wait_all(launches)
    assert codes == [0, 0], "\n".join(l.output()[-3000:] for l in launches)
    return the_run(out), out


# ------------------------------------------------------------------ torchrun


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "zero3"])
def test_two_torchrun_nodes_equal_one_process_with_the_doubled_batch(
    strategy: str, reference: Path, ddp_two_nodes: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if strategy == "ddp":
        run, out = ddp_two_nodes
    else:
        out = tmp_path / "runs"
        launches = torchrun(out, ZERO3, tmp_path, "zero3", audit=True)
        assert wait_all(launches) == [0, 0], "\n".join(l.output()[-3000:] for l in launches)
        run = the_run(out)
    report = json.loads((run / "report.json").read_text())
    assert (report["world_size"], report["num_nodes"], report["launcher"], report["steps"]) == (2, 2, "torchrun", STEPS)

    # one folder, written by global rank 0; under ZeRO-3 rank 1 adds its shards to the checkpoint folders
    writes = audit_lines(out.parent, strategy)
    assert {"config.yaml", "metrics.csv", "report.json"} <= {Path(p).name for p in writes.get("0", [])}
    assert not writes.get("-"), writes.get("-")  # the agents write nothing
    if strategy == "ddp":
        assert not writes.get("1"), writes.get("1")
    else:
        assert all(Path(p).is_relative_to(run / "checkpoints") for p in writes.get("1", [])), writes.get("1")
        assert (run / "checkpoints" / "last.ckpt" / "checkpoint" / "zero_pp_rank_1_mp_rank_00_model_states.pt").is_file()

    two, one = losses(run), losses(reference)
    assert sorted(two) == sorted(one) == list(range(STEPS))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=LOSS_RTOL), step
    assert max_abs_diff(exported(run, tmp_path / "two", capsys), exported(reference, tmp_path / "one", capsys)) < WEIGHT_ATOL


# ------------------------------------------------------------------ SLURM


def slurm_env(tmp_path: Path, port: int, restarts: int = 0) -> dict[str, str]:
    """What sbatch sets for a 2-node x 1-task job (srun adds each task's own ranks)."""
    env = base_env()
    env.update(
        PATH=f"{FAKE_SLURM}{os.pathsep}{env['PATH']}", CLIPFT_PYTHON=sys.executable,
        SLURM_JOB_ID="4242", SLURM_JOB_NAME="clipft", SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="1",
        SLURM_NNODES="2", SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="localhost", SLURM_NODELIST="localhost",
        SLURM_RESTART_COUNT=str(restarts), MASTER_ADDR="localhost", MASTER_PORT=str(port),
        FAKE_SLURM_TASKS=str(tmp_path / "tasks"), FAKE_SLURM_SCONTROL_LOG=str(tmp_path / "scontrol.log"),
    )
    return env


@pytest.mark.slow
def test_sbatch_example_requeues_on_sigusr1_and_the_requeued_job_ends_as_the_uninterrupted_run(
    tmp_path: Path, ddp_two_nodes: tuple[Path, Path]
) -> None:
    out = tmp_path / "runs"
    argv = ["bash", str(SBATCH), RECIPE, *COMMON, *CPU, "data.batch_size=8",
            f"trainer.collective_timeout_s={COLLECTIVE_TIMEOUT_S}", f"run.out_dir={out}"]
    job = Launch(argv, slurm_env(tmp_path, free_port()), tmp_path / "job1.log")
    wait_for(lambda: any(out.glob("quickstart/*/checkpoints/last.ckpt")) and (tmp_path / "tasks").is_file(), [job],
             "a first checkpoint")
    for pid in map(int, (tmp_path / "tasks").read_text().split()):  # slurmstepd signals every task
        os.kill(pid, signal.SIGUSR1)
    assert wait_all([job]) == [0], job.output()[-3000:]
    run = the_run(out)
    stopped = json.loads((run / "report.json").read_text())
    assert stopped["launcher"] == "slurm" and (stopped["world_size"], stopped["num_nodes"]) == (2, 2)
    step = stopped["preempted"]["step"]
    assert stopped["preempted"]["signal"] == "SIGUSR1" and 2 <= step < STEPS
    assert read_training_state(run / "checkpoints" / "last.ckpt")["global_step"] == step
    assert f"stopped by SIGUSR1 at step {step}" in job.output()
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"  # rank 0 only, once

    # the requeued job: SLURM_RESTART_COUNT=1 makes the script add run.resume=last
    job = Launch(argv, slurm_env(tmp_path, free_port(), restarts=1), tmp_path / "job2.log")
    assert wait_all([job]) == [0], job.output()[-3000:]
    assert the_run(out) == run
    report = json.loads((run / "report.json").read_text())
    assert report["steps"] == STEPS and report["resumed_from"].endswith("last.ckpt") and "preempted" not in report
    uninterrupted, _ = ddp_two_nodes
    resumed_losses, once = losses(run), losses(uninterrupted)
    assert sorted(resumed_losses) == list(range(STEPS))
    assert resumed_losses == pytest.approx(once, rel=1e-6)
    final = read_state_dict(run / "checkpoints" / "last.ckpt")
    assert max_abs_diff(final, read_state_dict(uninterrupted / "checkpoints" / "last.ckpt")) <= RESUME_ATOL


class SignalAt(L.Callback):
    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def test_sigterm_stops_one_process_at_a_step_boundary_and_the_resumed_run_ends_as_the_uninterrupted_one(
    tmp_path: Path, reference: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    build = runner.build_callbacks
    monkeypatch.setattr(runner, "build_callbacks", lambda *a, **k: [*build(*a, **k), SignalAt(3, signal.SIGTERM)])
    threads = torch.get_num_threads()
    try:
        stopped = runner.fit(load_config(RECIPE, [*ONE_PROCESS, f"run.out_dir={tmp_path}"]))
        assert stopped["preempted"] == {"signal": "SIGTERM", "step": 3} and stopped["steps"] == 3
        assert not isinstance(getattr(signal.getsignal(signal.SIGTERM), "__self__", None), StopOnSignal)  # handed back
        monkeypatch.setattr(runner, "build_callbacks", build)
        resumed = runner.fit(load_config(RECIPE, [*ONE_PROCESS, f"run.out_dir={tmp_path}", "run.resume=last"]))
    finally:
        torch.set_num_threads(threads)
    assert resumed["steps"] == STEPS and resumed["run_dir"] == stopped["run_dir"]
    run = Path(resumed["run_dir"])
    assert losses(run) == pytest.approx(losses(reference), rel=1e-6)
    final = read_state_dict(run / "checkpoints" / "last.ckpt")
    assert max_abs_diff(final, read_state_dict(reference / "checkpoints" / "last.ckpt")) <= RESUME_ATOL


# ------------------------------------------------------------------ node failures


@pytest.mark.slow
def test_a_killed_node_stops_the_other_with_one_line_and_both_resume_to_the_uninterrupted_weights(
    tmp_path: Path, ddp_two_nodes: tuple[Path, Path]
) -> None:
    out = tmp_path / "runs"
    launches = torchrun(out, TWO_NODES, tmp_path, "kill")
    wait_for(lambda: any(out.glob("quickstart/*/checkpoints/last.ckpt")) and None not in map(worker_rank, launches),
             launches, "a first checkpoint")
    victim = next(l for l in launches if worker_rank(l) == 1)
    survivor = next(l for l in launches if l is not victim)
    kill_tree(victim.proc.pid)  # the whole node: agent and worker
    killed = time.monotonic()
    victim.proc.wait()
    assert wait_all([survivor], timeout=COLLECTIVE_TIMEOUT_S + 60) != [0]
    took = time.monotonic() - killed
    print(f"the surviving node exited {took:.1f} s after the kill")
    assert took < COLLECTIVE_TIMEOUT_S + 30, took
    lines = [line for line in survivor.output().splitlines() if line.startswith("clipft: error:")]
    assert len(lines) == 1 and "rank 0 on" in lines[0] and "run.resume=last" in lines[0], lines
    assert "[rank0]: Traceback" not in survivor.output()  # the worker's error is the one line, not a traceback
    run = the_run(out)
    assert (run / "checkpoints" / "last.ckpt").is_file()

    launches = torchrun(out, [*TWO_NODES, "run.resume=last"], tmp_path, "resume")
    assert wait_all(launches) == [0, 0], "\n".join(l.output()[-3000:] for l in launches)
    assert the_run(out) == run
    assert json.loads((run / "report.json").read_text())["steps"] == STEPS
    uninterrupted, _ = ddp_two_nodes
    final = read_state_dict(run / "checkpoints" / "last.ckpt")
    assert max_abs_diff(final, read_state_dict(uninterrupted / "checkpoints" / "last.ckpt")) <= RESUME_ATOL
    assert sorted(losses(run)) == list(range(STEPS))


@pytest.mark.slow
def test_a_node_that_cannot_see_the_run_folder_stops_both_with_a_clear_message(tmp_path: Path) -> None:
    """run.out_dir relative, and the nodes in different working folders: as if it were not on a
    shared filesystem. Rank 0's folder is removed again (nothing was written into it)."""
    cwds = (tmp_path / "a", tmp_path / "b")
    for cwd in cwds:
        cwd.mkdir()
    launches = torchrun(Path("runs"), TWO_NODES, tmp_path, "blind", cwds=cwds, recipe="quickstart")
    codes = wait_all(launches, timeout=120)
    assert all(code != 0 for code in codes)
    for launch in launches:
        lines = [line for line in launch.output().splitlines() if line.startswith("clipft: error:")]
        assert len(lines) == 1 and "is not visible to rank 1" in lines[0] and "shared filesystem" in lines[0], lines
    for cwd in cwds:
        assert not any((cwd / "runs" / "quickstart").glob("*"))


HUNG_PEER = """
import os, signal, time
import torch, torch.distributed as dist
from clipft.cluster import is_lost_process, launcher_environment, start_process_group
from clipft.config import load_config
cfg = load_config(None, ["trainer.accelerator=cpu", "trainer.devices=1", "trainer.num_nodes=2",
                         "trainer.collective_timeout_s=3"])
open(f"ready{os.environ['RANK']}", "w").close()  # both imported: meet within the 3 s
while not all(os.path.exists(f"ready{rank}") for rank in (0, 1)):
    time.sleep(0.01)
assert start_process_group(launcher_environment(), cfg)
dist.barrier()
if dist.get_rank() == 1:
    os.kill(os.getpid(), signal.SIGSTOP)  # a hung node: alive, connected, silent
start = time.monotonic()
try:
    dist.all_reduce(torch.ones(1))
except Exception as err:
    print(f"failed after {time.monotonic() - start:.2f} s; lost: {is_lost_process(err)}", flush=True)
"""


def test_a_hung_node_fails_the_collective_after_the_timeout(tmp_path: Path) -> None:
    """The process group clipft starts under a launcher carries trainer.collective_timeout_s:
    a peer that stops answering (SIGSTOP) fails the next collective after that time, instead
    of blocking it forever (a killed peer fails it at once: its connections close)."""
    port = free_port()
    launches = []
    for rank in (0, 1):  # what torchrun sets for a worker
        env = dict(base_env(), TORCHELASTIC_RUN_ID="hung", RANK=str(rank), GROUP_RANK=str(rank), LOCAL_RANK="0",
                   LOCAL_WORLD_SIZE="1", WORLD_SIZE="2", MASTER_ADDR="localhost", MASTER_PORT=str(port))
        launches.append(Launch([sys.executable, "-c", HUNG_PEER], env, tmp_path / f"hung{rank}.log", cwd=tmp_path))
    try:
        assert wait_all(launches[:1], timeout=TIMEOUT_S) == [0], launches[0].output()[-3000:]
    finally:
        kill_tree(launches[1].proc.pid)
        launches[1].proc.wait()
    line = next(line for line in launches[0].output().splitlines() if line.startswith("failed after"))
    waited = float(line.split()[2])
    assert 3.0 <= waited < 8.0 and line.endswith("lost: True"), line


def test_a_failed_collective_reads_as_one_line_naming_the_timeout_and_the_resume() -> None:
    gloo = RuntimeError("[../gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:25835: Connection reset by peer.")
    assert is_lost_process(gloo) and not is_lost_process(RuntimeError("CUDA out of memory"))
    with pytest.raises(LostProcess, match=r"collective_timeout_s=60 s .*Connection reset by peer.*run\.resume=last"):
        with explain_lost_process(2, Path("runs/x"), 60):
            raise gloo
    with pytest.raises(RuntimeError, match="Connection reset"):  # one process: nothing to explain
        with explain_lost_process(1, Path("runs/x"), 60):
            raise gloo
