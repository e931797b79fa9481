"""Cloud TPU launcher: ``python -m launch.tpu <command> [flags]`` (add ``--dry-run`` to print only).

One-liner (create a spot v5p-32 through a queued resource, install, train, restart on preemption,
delete at the end)::

    python -m launch.tpu up --name=cca-d30 --tpu=v5p-32 --zone=us-east5-a --project=my-proj \\
        --queued --spot --config=configs/var_d30.py --workdir=gs://my-bucket/runs/var_d30 \\
        --data=gs://my-bucket/tokens/imagenet_var256 \\
        --reference-checkpoint=gs://my-bucket/weights/var_d30.pth \\
        --tokenizer-checkpoint=gs://my-bucket/weights/vae_ch160v4096z32.pth

Commands: ``create`` (TPU VM or ``--queued`` resource, ``--spot`` / ``--preemptible``), ``stage``
(upload the source tree and local inputs to GCS), ``install`` (project + TPU JAX on every worker),
``start`` (train detached on all workers), ``status``, ``logs`` (stream a worker's log), ``stop``,
``delete`` (tear down), ``up`` (all of it under the preemption supervisor), ``gke`` (render a
JobSet manifest), ``image`` (build the container the manifest runs).

Restart on preemption (``up``): the supervisor polls the slice state and the run's status file on
every worker. A preempted / deleted / failed slice is deleted and created again, the project is
installed again and the same ``cca_jax.main`` command is started again; the trainer resumes from
the latest Orbax checkpoint in ``--workdir`` by itself (which is why the workdir must be on GCS:
the VMs' disks go away with them). Training failures (non-zero exit with the slice healthy) are
retried ``--max-failures`` times, then the supervisor stops with an error.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import re
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time
from typing import Callable, Optional, Sequence

from cca_jax.plan import Topology, parse_topology
from launch import paths

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBTPU_FIND_LINKS = "https://storage.googleapis.com/jax-releases/libtpu_releases.html"
SCOPES = "https://www.googleapis.com/auth/cloud-platform"
# Remote layout on every worker (home directory of the ssh user).
REMOTE_SRC = "~/cca_jax"
REMOTE_RUN = "~/cca_jax_run"
STATUS_TAG = "cca-status:"
# Slice states. VM: `gcloud compute tpus tpu-vm describe --format=value(state)`; queued resource:
# `... queued-resources describe --format=value(state.state)`.
VM_READY = {"READY"}
VM_DEAD = {"PREEMPTED", "TERMINATED", "STOPPED", "STOPPING", "HIDDEN", "UNHIDING", "DELETING"}
QR_READY = {"ACTIVE"}
QR_DEAD = {"SUSPENDING", "SUSPENDED", "FAILED", "DELETING"}
MISSING = "MISSING"


class LaunchError(RuntimeError):
    pass


# ----------------------------------------------------------------------------------- running

@dataclasses.dataclass
class Result:
    rc: int
    stdout: str = ""


class Runner:
    """Runs (or, with ``dry_run``, prints) shell-free argv commands.

    Every command is echoed as ``$ <argv>``; in dry-run mode nothing is executed and queries get a
    canned healthy answer from ``dry_answer`` so one pass through the whole flow is printed.
    """

    def __init__(self, dry_run: bool = False, out=None, sleep: Callable[[float], None] = time.sleep,
                 dry_answer: Optional[Callable[[list[str]], Result]] = None):
        self.dry_run = dry_run
        self.out = out if out is not None else sys.stdout
        self._sleep = sleep
        self.dry_answer = dry_answer or (lambda argv: Result(0, ""))

    def echo(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def note(self, text: str) -> None:
        self.echo(f"# {text}")

    def sleep(self, seconds: float) -> None:
        if not self.dry_run:
            self._sleep(seconds)

    def __call__(self, argv: Sequence[str], *, capture: bool = False, check: bool = True) -> Result:
        argv = [str(a) for a in argv]
        self.echo("$ " + shlex.join(argv))
        if self.dry_run:
            return self.dry_answer(argv)
        proc = subprocess.run(argv, text=True, stdout=subprocess.PIPE if capture else None)
        res = Result(proc.returncode, proc.stdout or "")
        if check and res.rc:
            raise LaunchError(f"command failed with exit code {res.rc}: {shlex.join(argv)}")
        return res


# ----------------------------------------------------------------------------------- settings

@dataclasses.dataclass
class Launch:
    """Everything a command needs, validated once (see :func:`from_args`)."""

    name: str
    zone: str
    project: str
    topology: Topology
    config: str = ""  # repo-relative recipe path (may carry ml_collections ':arg')
    workdir: str = ""  # gs:// run directory
    stage_dir: str = ""  # gs:// directory for the source tarball and staged local inputs
    overrides: tuple[str, ...] = ()  # KEY=VALUE -> --config.KEY=VALUE
    inputs: tuple[tuple[str, str, Optional[list[str]]], ...] = ()  # (config key, gs path, stage cmd)
    queued: bool = False
    spot: bool = False
    preemptible: bool = False
    runtime_version: str = ""
    service_account: str = ""
    python: str = "3.11"
    jax_version: str = ""
    poll_seconds: float = 60.0
    max_restarts: int = 100
    max_failures: int = 2
    keep: bool = False

    @property
    def qr_name(self) -> str:
        return f"{self.name}-qr"

    def gcloud_loc(self) -> list[str]:
        loc = [f"--zone={self.zone}"]
        return loc + ([f"--project={self.project}"] if self.project else [])


def jax_version_from_requirements(path: str = os.path.join(REPO_ROOT, "requirements.txt")) -> str:
    """The ``jax==X`` pin of requirements.txt (the TPU build installed on workers uses the same X)."""
    with open(path) as f:
        for line in f:
            m = re.match(r"\s*jax\s*==\s*([0-9][^\s;#]*)", line)
            if m:
                return m.group(1)
    raise LaunchError(f"{path} has no 'jax==VERSION' line; pin jax there (launch installs "
                      "jax[tpu]==VERSION on the workers).")


_NAME_RE = re.compile(r"^[a-z]([-a-z0-9]{0,46}[a-z0-9])?$")
_OVERRIDE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*=")
INPUT_FLAGS = (  # CLI flag -> config field the trainer reads
    ("data", "data.path"),
    ("reference_checkpoint", "init.reference_checkpoint"),
    ("tokenizer_checkpoint", "init.tokenizer_checkpoint"),
)


def check_config_path(config: str) -> str:
    """A recipe path relative to the repository root (it is shipped with the source tree)."""
    file_part = config.split(":", 1)[0]
    full = os.path.abspath(os.path.join(REPO_ROOT, file_part))
    if os.path.isabs(file_part) or not full.startswith(REPO_ROOT + os.sep):
        raise LaunchError(f"--config={config!r} must be a path inside the repository (e.g. "
                          "configs/var_d30.py); the workers run the shipped copy.")
    if not os.path.isfile(full):
        raise LaunchError(f"--config={config!r}: {full} does not exist; pick a recipe in configs/.")
    return config


def from_args(args: argparse.Namespace, *, need_run: bool) -> Launch:
    """Validates CLI flags. ``need_run``: the command starts training (config/workdir required)."""
    if not _NAME_RE.match(args.name or ""):
        raise LaunchError(f"--name={args.name!r}: use 1-48 lowercase letters, digits or '-', "
                          "starting with a letter (a Cloud TPU node id).")
    try:
        topo = parse_topology(args.tpu)
    except ValueError as e:
        raise LaunchError(str(e)) from None
    if not topo.is_tpu:
        raise LaunchError(f"--tpu={args.tpu!r} is not a Cloud TPU slice (v4-N, v5p-N, v5e-N, v6e-N).")
    if not args.zone:
        raise LaunchError("--zone is required (e.g. us-east5-a for v5p, us-central2-b for v4).")
    if args.spot and args.preemptible:
        raise LaunchError("--spot and --preemptible are exclusive; --spot is the current model.")
    if args.queued and args.preemptible:
        raise LaunchError("queued resources take --spot, not --preemptible.")
    launch = Launch(name=args.name, zone=args.zone, project=args.project or "", topology=topo,
                    queued=args.queued, spot=args.spot, preemptible=args.preemptible,
                    runtime_version=args.runtime_version or topo.accelerator.runtime_version,
                    service_account=args.service_account or "", python=args.python,
                    jax_version=args.jax_version or jax_version_from_requirements(),
                    poll_seconds=args.poll_seconds, max_restarts=args.max_restarts,
                    max_failures=args.max_failures, keep=args.keep)
    if not need_run:
        return launch
    if not args.config or not args.workdir:
        raise LaunchError("--config and --workdir are required for this command.")
    launch.config = check_config_path(args.config)
    try:
        launch.workdir = paths.validate_gcs_uri(args.workdir, "--workdir")
    except ValueError as e:
        raise LaunchError(f"{e} TPU VMs are deleted on preemption, so checkpoints, logs and "
                          "outputs must live in GCS.") from None
    try:
        launch.stage_dir = paths.validate_gcs_uri(
            args.stage_dir or paths.join(launch.workdir, "staged"), "--stage-dir")
        inputs = []
        for flag, key in INPUT_FLAGS:
            value = getattr(args, flag, None)
            if value:
                dest, cmd = paths.resolve_input(value, flag, launch.stage_dir)
                inputs.append((key, dest, cmd))
    except (ValueError, FileNotFoundError) as e:
        raise LaunchError(str(e)) from None
    launch.inputs = tuple(inputs)
    for o in args.override or ():
        if not _OVERRIDE_RE.match(o):
            raise LaunchError(f"--override={o!r}: expected KEY=VALUE with a dotted config key, "
                              "e.g. --override=train.num_steps=100.")
    launch.overrides = tuple(args.override or ())
    return launch


# ----------------------------------------------------------------------------- gcloud commands

def create_command(L: Launch) -> list[str]:
    """Creates the slice: a TPU VM, or a queued resource that provisions one when capacity exists."""
    t = L.topology
    if L.queued:
        cmd = ["gcloud", "compute", "tpus", "queued-resources", "create", L.qr_name,
               f"--node-id={L.name}", *L.gcloud_loc(), f"--accelerator-type={t.accelerator_type}",
               f"--runtime-version={L.runtime_version}", f"--scopes={SCOPES}"]
    else:
        cmd = ["gcloud", "compute", "tpus", "tpu-vm", "create", L.name, *L.gcloud_loc(),
               f"--accelerator-type={t.accelerator_type}", f"--version={L.runtime_version}",
               f"--scopes={SCOPES}"]
    if L.service_account:
        cmd.append(f"--service-account={L.service_account}")
    if L.spot:
        cmd.append("--spot")
    if L.preemptible:
        cmd.append("--preemptible")
    return cmd


def describe_command(L: Launch) -> list[str]:
    if L.queued:
        return ["gcloud", "compute", "tpus", "queued-resources", "describe", L.qr_name,
                *L.gcloud_loc(), "--format=value(state.state)"]
    return ["gcloud", "compute", "tpus", "tpu-vm", "describe", L.name, *L.gcloud_loc(),
            "--format=value(state)"]


def delete_command(L: Launch) -> list[str]:
    if L.queued:  # --force also deletes the node the queued resource provisioned
        return ["gcloud", "compute", "tpus", "queued-resources", "delete", L.qr_name,
                *L.gcloud_loc(), "--force", "--quiet"]
    return ["gcloud", "compute", "tpus", "tpu-vm", "delete", L.name, *L.gcloud_loc(), "--quiet"]


def ssh_command(L: Launch, script: str, worker: str = "all") -> list[str]:
    """Runs ``script`` with bash on ``worker`` ('all' = every host of the slice, in parallel)."""
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", L.name, *L.gcloud_loc(),
            f"--worker={worker}", "--quiet", f"--command={script}"]


# ------------------------------------------------------------------------------ source staging

def source_files(root: str = REPO_ROOT) -> list[str]:
    """Repository files to ship: git's tracked + untracked-not-ignored, else a filtered walk."""
    try:
        out = subprocess.run(["git", "-C", root, "ls-files", "--cached", "--others",
                              "--exclude-standard", "-z"], check=True, capture_output=True).stdout
        files = [f for f in out.decode().split("\0") if f]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", ".venv", "__pycache__", ".pytest_cache", "runs"}
        files = []
        for d, dirs, names in os.walk(root):
            dirs[:] = sorted(x for x in dirs if x not in skip and not x.startswith("workdir"))
            files += [os.path.relpath(os.path.join(d, n), root) for n in names]
    files = [f for f in files if os.path.isfile(os.path.join(root, f)) and not f.endswith(".pyc")]
    return sorted(files)


def source_digest(files: Sequence[str], root: str = REPO_ROOT) -> str:
    """Content hash of the shipped tree (names the tarball; workers skip reinstalling the same one)."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.encode() + b"\0")
        with open(os.path.join(root, f), "rb") as fh:
            h.update(hashlib.sha256(fh.read()).digest())
    return h.hexdigest()[:16]


def write_source_tarball(files: Sequence[str], dest: str, root: str = REPO_ROOT) -> None:
    with tarfile.open(dest, "w:gz") as tar:
        for f in files:
            tar.add(os.path.join(root, f), arcname=f, recursive=False)


@dataclasses.dataclass(frozen=True)
class Source:
    digest: str
    uri: str  # gs:// location of the tarball


def source_for(L: Launch, root: str = REPO_ROOT) -> tuple[Source, list[str]]:
    files = source_files(root)
    if not any(f.startswith("cca_jax/") for f in files):
        raise LaunchError(f"{root} does not look like the cca_jax repository (no cca_jax/ files).")
    digest = source_digest(files, root)
    return Source(digest, paths.join(L.stage_dir, "code", f"cca_jax_src-{digest}.tar.gz")), files


def stage(L: Launch, run: Runner, root: str = REPO_ROOT) -> Source:
    """Uploads the source tarball and any local inputs to GCS."""
    src, files = source_for(L, root)
    local = os.path.join(tempfile.gettempdir(), f"cca_jax_src-{src.digest}.tar.gz")
    run.note(f"source tree: {len(files)} files, digest {src.digest} -> {local}")
    if not run.dry_run:
        write_source_tarball(files, local, root)
    run(["gcloud", "storage", "cp", local, src.uri])
    for key, dest, cmd in L.inputs:
        if cmd:
            run.note(f"staging local {key} -> {dest}")
            run(cmd)
    return src


# ------------------------------------------------------------------------------ remote scripts

def install_script(L: Launch, src: Source) -> str:
    """Bash run on every worker: unpack the source and install it with the TPU build of JAX.

    TPU VM images ship an older system Python, so ``uv`` provides the pinned interpreter. A marker
    named after the source digest makes reinstalling the same tree a no-op.
    """
    marker = f"{REMOTE_SRC}/.installed-{src.digest}"
    uv = "~/.local/bin/uv"
    lines = [
        "set -euo pipefail",
        f"if [ -f {marker} ]; then echo 'cca-install: up to date ({src.digest})'; exit 0; fi",
        f"rm -rf {REMOTE_SRC} && mkdir -p {REMOTE_SRC}",
        f"gcloud storage cp {shlex.quote(src.uri)} /tmp/cca_jax_src.tar.gz",
        f"tar -xzf /tmp/cca_jax_src.tar.gz -C {REMOTE_SRC}",
        "python3 -m pip install --user --quiet --upgrade uv",
        f"{uv} venv --python {shlex.quote(L.python)} {REMOTE_SRC}/.venv",
        f"{uv} pip install --python {REMOTE_SRC}/.venv/bin/python -r {REMOTE_SRC}/requirements.txt "
        f"{shlex.quote(f'jax[tpu]=={L.jax_version}')} --find-links {LIBTPU_FIND_LINKS}",
        f"touch {marker}",
        f"echo 'cca-install: installed ({src.digest})'",
    ]
    return "\n".join(lines)


def train_argv(L: Launch) -> list[str]:
    """The trainer command line every worker runs (same on all hosts: JAX is multi-controller)."""
    argv = [".venv/bin/python", "-m", "cca_jax.main", f"--config={L.config}", f"--workdir={L.workdir}"]
    argv += [f"--config.{key}={dest}" for key, dest, _ in L.inputs]
    argv += [f"--config.{o}" for o in L.overrides]
    return argv


# Cloud TPU VMs publish the slice's hosts in instance metadata; exporting them the way GKE does
# (TPU_WORKER_HOSTNAMES / TPU_WORKER_ID) makes cca_jax.distributed join all hosts with
# jax.distributed on every platform alike.
_WORKER_ENV = (
    "MD=http://metadata.google.internal/computeMetadata/v1/instance/attributes\n"
    "W=$(curl -sf --max-time 10 -H 'Metadata-Flavor: Google' $MD/agent-worker-number) "
    "&& export TPU_WORKER_ID=$W\n"
    "H=$(curl -sf --max-time 10 -H 'Metadata-Flavor: Google' $MD/worker-network-endpoints "
    "| tr ',' '\\n' | awk -F: '{print $NF}' | paste -sd, -)\n"
    "[ -n \"$H\" ] && export TPU_WORKER_HOSTNAMES=$H"
)


def start_script(L: Launch) -> str:
    """Bash run on every worker: stop a previous run, start training detached, return at once.

    The run writes ``train.log``; when it ends its exit code goes to ``rc``, and ``sigterm`` marks
    that the host was being shut down (a preempted run checkpoints and exits 0, which must not be
    mistaken for the end of training).
    """
    run = REMOTE_RUN
    inner = "\n".join([
        f"trap 'touch {run}/sigterm' TERM",
        f"cd {REMOTE_SRC}",
        f"{shlex.join(train_argv(L))} >> {run}/train.log 2>&1",
        f"echo $? > {run}/rc",
    ])
    return "\n".join([
        "set -uo pipefail",
        f"mkdir -p {run}",
        # a previous run still alive gets SIGTERM (it checkpoints) and up to 60 s to exit
        f"if [ -f {run}/pid ] && kill -0 -- -$(cat {run}/pid) 2>/dev/null; then "
        f"kill -TERM -- -$(cat {run}/pid); for i in $(seq 60); do "
        f"kill -0 -- -$(cat {run}/pid) 2>/dev/null || break; sleep 1; done; "
        f"kill -KILL -- -$(cat {run}/pid) 2>/dev/null; fi",
        f"rm -f {run}/rc {run}/sigterm",
        _WORKER_ENV,
        f"echo \"=== start $(date -u +%FT%TZ) worker ${{TPU_WORKER_ID:-0}}\" >> {run}/train.log",
        f"nohup setsid bash -c {shlex.quote(inner)} > /dev/null 2>&1 < /dev/null &",
        f"echo $! > {run}/pid",
        f"echo '{STATUS_TAG} started'",
    ])


def status_script(tail_lines: int = 0) -> str:
    """Bash run on every worker: one ``cca-status: running|exit=N|preempted|lost`` line."""
    run = REMOTE_RUN
    tail = f"tail -n {int(tail_lines)} {run}/train.log 2>/dev/null; " if tail_lines else ""
    return (
        f"{tail}if [ -f {run}/sigterm ]; then echo '{STATUS_TAG} preempted'; "
        f"elif [ -f {run}/rc ]; then echo \"{STATUS_TAG} exit=$(cat {run}/rc)\"; "
        f"elif [ -f {run}/pid ] && kill -0 -- -$(cat {run}/pid) 2>/dev/null; then "
        f"echo '{STATUS_TAG} running'; "
        f"else echo '{STATUS_TAG} lost'; fi")


def stop_script() -> str:
    run = REMOTE_RUN
    return (f"if [ -f {run}/pid ]; then kill -TERM -- -$(cat {run}/pid) 2>/dev/null; fi; "
            f"echo '{STATUS_TAG} stopped'")


def logs_script(lines: int, follow: bool) -> str:
    return f"tail -n {int(lines)} {'-F ' if follow else ''}{REMOTE_RUN}/train.log"


def parse_status(stdout: str, num_hosts: int) -> str:
    """Combines the workers' status lines: done | failed | preempted | lost | running | unknown."""
    found = re.findall(re.escape(STATUS_TAG) + r" (running|exit=(\d+)|preempted|lost)", stdout)
    states = [s for s, _ in found]
    codes = [int(c) for _, c in found if c]
    if any(c != 0 for c in codes):
        return "failed"
    if "preempted" in states:
        return "preempted"
    if "lost" in states:
        return "lost"
    if len(states) < num_hosts:
        return "unknown"
    if all(s == "exit=0" for s in states):
        return "done"
    return "running"


# ---------------------------------------------------------------------------------- supervisor

def slice_state(L: Launch, run: Runner) -> str:
    """The slice's state word, or MISSING when it does not exist."""
    res = run(describe_command(L), capture=True, check=False)
    if res.rc:
        return MISSING
    return (res.stdout.strip().splitlines() or [MISSING])[-1].strip().upper() or MISSING


def is_ready(L: Launch, state: str) -> bool:
    return state in (QR_READY if L.queued else VM_READY)


def is_dead(L: Launch, state: str) -> bool:
    return state == MISSING or state in (QR_DEAD if L.queued else VM_DEAD)


def ensure_slice(L: Launch, run: Runner) -> None:
    """Brings the slice to READY/ACTIVE: deletes a dead one, creates a missing one, waits."""
    attempts = 0
    while True:
        state = slice_state(L, run)
        if is_ready(L, state):
            return
        if is_dead(L, state):
            if attempts > L.max_restarts:
                raise LaunchError(f"could not get {L.name} running after {attempts} creations; "
                                  f"check quota and capacity for {L.topology.accelerator_type} "
                                  f"in {L.zone}.")
            if state != MISSING:
                run.note(f"slice {L.name} is {state}: deleting it to create it again")
                run(delete_command(L), check=False)
            attempts += 1
            res = run(create_command(L), check=False)
            if res.rc:
                run.note(f"create failed (exit {res.rc}); retrying in {L.poll_seconds:.0f}s")
                run.sleep(L.poll_seconds)
            continue
        run.note(f"slice {L.name} is {state}; waiting")
        run.sleep(L.poll_seconds)


def watch(L: Launch, run: Runner, tail_lines: int = 5) -> str:
    """Polls until the run ends; returns done | failed | preempted (slice lost or host shut down)."""
    while True:
        run.sleep(L.poll_seconds)
        state = slice_state(L, run)
        if not is_ready(L, state):
            run.note(f"slice {L.name} is {state}")
            return "preempted"
        res = run(ssh_command(L, status_script(tail_lines), "all"), capture=True, check=False)
        if res.stdout:
            run.echo(res.stdout.rstrip())
        status = parse_status(res.stdout, L.topology.num_hosts)
        if status == "done":
            # a shutdown that has not reached the state API yet must not read as success
            if not is_ready(L, slice_state(L, run)):
                return "preempted"
            return "done"
        if status in ("failed", "preempted"):
            return status
        if status == "lost":
            return "preempted"  # the host rebooted (maintenance) without a status: run it again
        # running / unknown (an ssh hiccup): keep polling


def supervise(L: Launch, run: Runner, src: Source) -> int:
    """create -> install -> start -> watch, again after every preemption; returns restarts used."""
    restarts = failures = 0
    while True:
        ensure_slice(L, run)
        res = run(ssh_command(L, install_script(L, src)), check=False)
        if res.rc == 0:
            res = run(ssh_command(L, start_script(L)), check=False)
        outcome = watch(L, run) if res.rc == 0 else (
            "preempted" if not is_ready(L, slice_state(L, run)) else "failed")
        if outcome == "done":
            run.note(f"training finished after {restarts} restart(s); outputs in {L.workdir}")
            return restarts
        if outcome == "failed":
            failures += 1
            run.note(f"run failed ({failures}/{L.max_failures + 1}); last log lines:")
            run(ssh_command(L, logs_script(50, follow=False), "0"), check=False)
            if failures > L.max_failures:
                raise LaunchError(f"training failed {failures} times on a healthy slice; see "
                                  f"`python -m launch.tpu logs` and {L.workdir}.")
        else:
            restarts += 1
            if restarts > L.max_restarts:
                raise LaunchError(f"gave up after {restarts - 1} restarts (--max-restarts).")
            run.note(f"preempted: restart {restarts}; the trainer resumes from the latest "
                     f"checkpoint in {L.workdir}")


def dry_answer(L: Launch) -> Callable[[list[str]], Result]:
    """Canned answers so a dry run prints one pass of the whole flow: the slice does not exist
    until a create command was printed, then it is ready and the run ends successfully."""
    ready = "ACTIVE" if L.queued else "READY"
    created = []

    def answer(argv: list[str]) -> Result:
        if "create" in argv:
            created.append(True)
        if "describe" in argv:
            return Result(0, ready + "\n") if created else Result(1, "")
        command = next((a for a in argv if a.startswith("--command=")), "")
        if f"{STATUS_TAG} running" in command:
            return Result(0, "\n".join(f"{STATUS_TAG} exit=0" for _ in range(L.topology.num_hosts)))
        return Result(0, "")
    return answer


# ------------------------------------------------------------------------------------- GKE

GKE_TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "jobset.yaml")


def render_jobset(*, name: str, topology: Topology, image: str, config: str, workdir: str,
                  inputs: Sequence[tuple[str, str]] = (), overrides: Sequence[str] = (),
                  spot: bool = False, max_restarts: int = 100, num_slices: int = 1,
                  namespace: str = "default") -> dict:
    """Fills launch/jobset.yaml: one Job per slice, one pod per TPU host.

    Preemption: a lost node fails its pod, the Job fails (backoffLimit 0) and the JobSet restarts
    every Job (up to ``max_restarts``); the trainer resumes from ``workdir``.
    """
    import yaml

    if not topology.is_tpu:
        raise LaunchError(f"{topology.name} is not a TPU slice; the JobSet targets GKE TPU node pools.")
    if num_slices < 1:
        raise LaunchError(f"--num-slices={num_slices}; expected >= 1.")
    with open(GKE_TEMPLATE) as f:
        doc = yaml.safe_load(f)
    doc["metadata"]["name"] = name
    doc["metadata"]["namespace"] = namespace
    doc["spec"]["failurePolicy"]["maxRestarts"] = int(max_restarts)
    rj = doc["spec"]["replicatedJobs"][0]
    rj["replicas"] = int(num_slices)
    job = rj["template"]["spec"]
    job["parallelism"] = job["completions"] = topology.num_hosts
    pod = job["template"]["spec"]
    pod["nodeSelector"]["cloud.google.com/gke-tpu-accelerator"] = topology.accelerator.gke_accelerator
    pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"] = topology.gke_topology
    if spot:
        pod["nodeSelector"]["cloud.google.com/gke-spot"] = "true"
        pod["tolerations"].append({"key": "cloud.google.com/gke-spot", "operator": "Equal",
                                   "value": "true", "effect": "NoSchedule"})
    container = pod["containers"][0]
    container["image"] = image
    argv = ["python", "-m", "cca_jax.main", f"--config={config}", f"--workdir={workdir}"]
    argv += [f"--config.{k}={v}" for k, v in inputs] + [f"--config.{o}" for o in overrides]
    container["command"] = argv
    container["resources"]["limits"]["google.com/tpu"] = topology.devices_per_host
    return doc


# --------------------------------------------------------------------------------------- CLI

def _common(p: argparse.ArgumentParser, *, run_flags: bool) -> None:
    p.add_argument("--name", required=True, help="TPU node id (queued resource: NAME-qr).")
    p.add_argument("--tpu", required=True, help="slice: v4-32, v5p-64, v5e-16 (v5litepod-16), v6e-64...")
    p.add_argument("--zone", default="", help="Cloud TPU zone (required except for gke/image).")
    p.add_argument("--project", default="", help="GCP project (default: gcloud's configured one).")
    p.add_argument("--queued", action="store_true", help="use a queued resource (waits for capacity).")
    p.add_argument("--spot", action="store_true", help="Spot capacity (preemptible at any time).")
    p.add_argument("--preemptible", action="store_true", help="legacy preemptible TPU VM (v4 and older).")
    p.add_argument("--runtime-version", default="", help="TPU software version (default per generation).")
    p.add_argument("--service-account", default="")
    p.add_argument("--python", default="3.11", help="Python version of the workers' venv.")
    p.add_argument("--jax-version", default="", help="default: the jax pin in requirements.txt.")
    p.add_argument("--poll-seconds", type=float, default=60.0)
    p.add_argument("--max-restarts", type=int, default=100, help="preemptions tolerated.")
    p.add_argument("--max-failures", type=int, default=2, help="training failures retried.")
    p.add_argument("--keep", action="store_true", help="up: keep the slice after training ends.")
    p.add_argument("--dry-run", action="store_true", help="print every command, run nothing.")
    if run_flags:
        p.add_argument("--config", default="", help="recipe, relative to the repo (configs/var_d30.py).")
        p.add_argument("--workdir", default="", help="gs:// run directory (checkpoints, logs, outputs).")
        p.add_argument("--data", default="", help="token shards: gs:// (used in place) or local (staged).")
        p.add_argument("--reference-checkpoint", default="", help="gs:// or local file / Orbax dir.")
        p.add_argument("--tokenizer-checkpoint", default="", help="gs:// or local file / Orbax dir.")
        p.add_argument("--stage-dir", default="", help="gs:// dir for code and staged inputs "
                       "(default WORKDIR/staged).")
        p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                       help="extra --config.KEY=VALUE for the trainer (repeatable).")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m launch.tpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, run_flags, help_ in [
        ("create", False, "create the slice and wait until it is ready"),
        ("stage", True, "upload the source tree and local inputs to GCS"),
        ("install", True, "stage, then install the project + TPU JAX on every worker"),
        ("start", True, "start training detached on every worker"),
        ("status", False, "print every worker's run status"),
        ("logs", False, "stream a worker's train.log"),
        ("stop", False, "stop the run on every worker (SIGTERM: it checkpoints first)"),
        ("delete", False, "tear the slice down"),
        ("up", True, "create, stage, install, train, restart on preemption, tear down"),
    ]:
        p = sub.add_parser(name, help=help_)
        _common(p, run_flags=run_flags)
        if name == "logs":
            p.add_argument("--worker", default="0")
            p.add_argument("--lines", type=int, default=100)
            p.add_argument("--no-follow", action="store_true")
    g = sub.add_parser("gke", help="render a JobSet manifest for a GKE TPU node pool")
    g.add_argument("--name", required=True)
    g.add_argument("--tpu", required=True)
    g.add_argument("--image", required=True, help="container with the project (see `image`).")
    g.add_argument("--config", required=True)
    g.add_argument("--workdir", required=True)
    g.add_argument("--data", default="")
    g.add_argument("--reference-checkpoint", default="")
    g.add_argument("--tokenizer-checkpoint", default="")
    g.add_argument("--override", action="append", default=[], metavar="KEY=VALUE")
    g.add_argument("--spot", action="store_true")
    g.add_argument("--max-restarts", type=int, default=100)
    g.add_argument("--num-slices", type=int, default=1)
    g.add_argument("--namespace", default="default")
    g.add_argument("--out", default="", help="write the manifest here instead of stdout.")
    g.add_argument("--dry-run", action="store_true", help="accepted for symmetry; gke never runs kubectl.")
    i = sub.add_parser("image", help="print (or run) docker build + push of launch/Dockerfile")
    i.add_argument("--image", required=True, help="e.g. us-docker.pkg.dev/PROJ/REPO/cca-jax:TAG")
    i.add_argument("--jax-version", default="")
    i.add_argument("--dry-run", action="store_true")
    return parser


def cmd_gke(args, out) -> int:
    import yaml

    try:
        topo = parse_topology(args.tpu)
        workdir = paths.validate_gcs_uri(args.workdir, "--workdir")
        inputs = [(key, paths.validate_gcs_uri(getattr(args, flag), f"--{flag.replace('_', '-')}"))
                  for flag, key in INPUT_FLAGS if getattr(args, flag)]
    except ValueError as e:
        raise LaunchError(f"{e} (GKE pods read inputs from GCS; upload local files first).") from None
    if not _NAME_RE.match(args.name):
        raise LaunchError(f"--name={args.name!r}: use lowercase letters, digits or '-'.")
    for o in args.override:
        if not _OVERRIDE_RE.match(o):
            raise LaunchError(f"--override={o!r}: expected KEY=VALUE.")
    doc = render_jobset(name=args.name, topology=topo, image=args.image,
                        config=check_config_path(args.config), workdir=workdir, inputs=inputs,
                        overrides=args.override, spot=args.spot, max_restarts=args.max_restarts,
                        num_slices=args.num_slices, namespace=args.namespace)
    text = ("# Rendered by `python -m launch.tpu gke`; needs the JobSet controller on the cluster.\n"
            + yaml.safe_dump(doc, sort_keys=False))
    target = args.out or "jobset.yaml"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        out.write(text)
    print(f"# apply:  kubectl apply -f {target}", file=out)
    print(f"# logs:   kubectl logs -n {args.namespace} -f -l jobset.sigs.k8s.io/jobset-name={args.name}",
          file=out)
    print(f"# delete: kubectl delete jobset -n {args.namespace} {args.name}", file=out)
    return 0


def cmd_image(args, run: Runner) -> int:
    jax_version = args.jax_version or jax_version_from_requirements()
    run(["docker", "build", "-f", os.path.join(REPO_ROOT, "launch", "Dockerfile"),
         "--build-arg", f"JAX_VERSION={jax_version}", "-t", args.image, REPO_ROOT])
    run(["docker", "push", args.image])
    return 0


def main(argv: Optional[Sequence[str]] = None, out=None) -> int:
    out = out if out is not None else sys.stdout
    args = build_parser().parse_args(argv)
    try:
        if args.command == "gke":
            return cmd_gke(args, out)
        if args.command == "image":
            return cmd_image(args, Runner(args.dry_run, out))
        run_cmds = {"stage", "install", "start", "up"}
        L = from_args(args, need_run=args.command in run_cmds)
        run = Runner(args.dry_run, out, dry_answer=dry_answer(L))
        return dispatch(args, L, run)
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def dispatch(args, L: Launch, run: Runner) -> int:
    c = args.command
    if c == "create":
        ensure_slice(L, run)
    elif c == "stage":
        stage(L, run)
    elif c == "install":
        run(ssh_command(L, install_script(L, stage(L, run))))
    elif c == "start":
        run(ssh_command(L, start_script(L)))
    elif c == "status":
        res = run(ssh_command(L, status_script(tail_lines=3)), capture=True, check=False)
        run.echo(res.stdout.rstrip())
        run.echo(f"{STATUS_TAG} overall={parse_status(res.stdout, L.topology.num_hosts)}")
    elif c == "logs":
        run(ssh_command(L, logs_script(args.lines, not args.no_follow), args.worker), check=False)
    elif c == "stop":
        run(ssh_command(L, stop_script()))
    elif c == "delete":
        run(delete_command(L))
    elif c == "up":
        src = stage(L, run)
        try:
            supervise(L, run, src)
        finally:
            if not L.keep:
                run.note(f"tearing down {L.name}")
                run(delete_command(L), check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
