"""launch/: gs:// path handling, dry-run command lines, the preemption supervisor, the remote
bash scripts (run for real against a local stand-in HOME) and the GKE JobSet manifest.

Nothing here calls gcloud, kubectl or docker: dry runs print commands, the supervisor runs
against a scripted fake runner.
"""

import io
import os
import re
import shlex
import subprocess
import time

import pytest
import yaml
from etils import epath

from launch import paths, tpu

JAX_PIN = tpu.jax_version_from_requirements()
CONFIG = "configs/var_d30.py"


def dry(*argv):
    out = io.StringIO()
    rc = tpu.main(list(argv) + ["--dry-run"], out=out)
    return rc, out.getvalue()


def commands(text):
    """The argv of every printed command (lines starting with '$ '), in order."""
    joined, cmds = [], []
    # a command's --command=... may span lines; shlex needs the complete quoted string
    for line in text.splitlines(keepends=True):
        if line.startswith("$ ") and joined:
            cmds.append(shlex.split("".join(joined)[2:]))
            joined = []
        if line.startswith("$ ") or joined:
            joined.append(line)
            try:
                shlex.split("".join(joined)[2:])
            except ValueError:
                continue  # unterminated quote: the command continues on the next line
            cmds.append(shlex.split("".join(joined)[2:]))
            joined = []
    return cmds


def flag(argv, name):
    vals = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
    assert len(vals) == 1, (name, argv)
    return vals[0]


# ------------------------------------------------------------------------------------- paths

def test_join_keeps_gcs_scheme_and_matches_os_path_locally(tmp_path):
    assert paths.join("gs://my-bkt/runs/", "var_d30", "ckpt") == "gs://my-bkt/runs/var_d30/ckpt"
    assert paths.join("gs://my-bkt", "a/b") == "gs://my-bkt/a/b"
    assert paths.join(str(tmp_path), "a", "b.txt") == os.path.join(str(tmp_path), "a", "b.txt")
    for bad in ("../x", "/abs", "a/../b", ""):
        with pytest.raises(ValueError, match="relative path"):
            paths.join("gs://my-bkt/runs", bad)


def test_joined_local_stand_in_is_usable_through_epath(tmp_path):
    # the same join + epath calls the trainer uses on gs:// work on a local stand-in workdir
    target = epath.Path(paths.join(str(tmp_path), "run", "checkpoints", "note.txt"))
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("step 7")
    assert (tmp_path / "run" / "checkpoints" / "note.txt").read_text() == "step 7"
    assert paths.basename(str(tmp_path / "run") + "/") == "run"
    assert paths.basename("gs://my-bkt/tokens/imagenet/") == "imagenet"


@pytest.mark.parametrize("uri,msg", [
    ("/local/dir", "not a gs:// URI"),
    ("gs://Upper_Case/x", "bucket name"),
    ("gs://ab/x", "bucket name"),
    ("gs://my-bkt//x", "empty path segment"),
    ("gs://my-bkt/a b", "whitespace"),
    ("gs://my-bkt/a/../b", "'..'"),
])
def test_validate_gcs_uri_rejects(uri, msg):
    with pytest.raises(ValueError, match=re.escape(msg)):
        paths.validate_gcs_uri(uri, "--workdir")


def test_validate_gcs_uri_strips_trailing_slash():
    assert paths.validate_gcs_uri("gs://my.bkt-1/runs/", "x") == "gs://my.bkt-1/runs"
    assert paths.validate_gcs_uri("gs://my-bkt", "x") == "gs://my-bkt"


def test_resolve_input_passes_gcs_through_and_stages_local(tmp_path):
    assert paths.resolve_input("gs://b-1/tok/", "data", "gs://b-1/stage") == ("gs://b-1/tok", None)
    shards = tmp_path / "shards"
    shards.mkdir()
    ckpt = tmp_path / "var_d30.pth"
    ckpt.write_bytes(b"x")
    dest, cmd = paths.resolve_input(str(shards), "data", "gs://b-1/stage")
    assert dest == "gs://b-1/stage/data/shards"
    assert cmd == ["gcloud", "storage", "rsync", "--recursive", str(shards), dest]
    dest, cmd = paths.resolve_input(str(ckpt), "reference_checkpoint", "gs://b-1/stage")
    assert cmd == ["gcloud", "storage", "cp", str(ckpt), "gs://b-1/stage/reference_checkpoint/var_d30.pth"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        paths.resolve_input(str(tmp_path / "nope"), "data", "gs://b-1/stage")
    with pytest.raises(ValueError, match="only share GCS"):
        paths.resolve_input(str(ckpt), "data", str(tmp_path))


# ------------------------------------------------------------------------------------ dry runs

UP = ["up", "--name=cca-d30", "--tpu=v5p-32", "--zone=us-east5-a", "--project=proj",
      f"--config={CONFIG}", "--workdir=gs://my-bkt/runs/var_d30",
      "--data=gs://my-bkt/tokens/imagenet_var256",
      "--reference-checkpoint=gs://my-bkt/weights/var_d30.pth",
      "--tokenizer-checkpoint=gs://my-bkt/weights/vae_ch160v4096z32.pth"]


def test_up_dry_run_queued_spot_prints_the_whole_flow():
    rc, text = dry(*UP, "--queued", "--spot", "--override=train.ckpt_every=500")
    assert rc == 0, text
    cmds = commands(text)
    kinds = [" ".join(c[:5]) for c in cmds]
    order = ["gcloud storage cp", "gcloud compute tpus queued-resources describe",
             "gcloud compute tpus queued-resources create", "gcloud compute tpus tpu-vm ssh",
             "gcloud compute tpus queued-resources delete"]
    pos = [next(i for i, k in enumerate(kinds) if k.startswith(o)) for o in order]
    assert pos == sorted(pos), kinds
    assert kinds[-1].startswith("gcloud compute tpus queued-resources delete")  # teardown last

    upload = cmds[0]
    assert upload[-1].startswith("gs://my-bkt/runs/var_d30/staged/code/cca_jax_src-")
    create = next(c for c in cmds if c[:5] == "gcloud compute tpus queued-resources create".split())
    assert create[5] == "cca-d30-qr"
    assert flag(create, "node-id") == "cca-d30"
    assert flag(create, "accelerator-type") == "v5p-32"
    assert flag(create, "runtime-version") == "v2-alpha-tpuv5"
    assert flag(create, "zone") == "us-east5-a" and flag(create, "project") == "proj"
    assert "--spot" in create and "--preemptible" not in create

    ssh = [c for c in cmds if c[:5] == "gcloud compute tpus tpu-vm ssh".split()]
    assert all(flag(c, "worker") == "all" for c in ssh)
    install, start = flag(ssh[0], "command"), flag(ssh[1], "command")
    assert upload[-1] in install
    assert f"'jax[tpu]=={JAX_PIN}'" in install and "-r ~/cca_jax/requirements.txt" in install
    train = re.search(r"\.venv/bin/python -m cca_jax\.main [^>]*", start).group(0).split()
    assert train[3:] == [f"--config={CONFIG}", "--workdir=gs://my-bkt/runs/var_d30",
                         "--config.data.path=gs://my-bkt/tokens/imagenet_var256",
                         "--config.init.reference_checkpoint=gs://my-bkt/weights/var_d30.pth",
                         "--config.init.tokenizer_checkpoint=gs://my-bkt/weights/vae_ch160v4096z32.pth",
                         "--config.train.ckpt_every=500"]
    delete = cmds[-1]
    assert delete[5] == "cca-d30-qr" and "--force" in delete and "--quiet" in delete


def test_up_dry_run_tpu_vm_preemptible_v4_and_keep():
    args = [a.replace("v5p-32", "v4-32") for a in UP]
    rc, text = dry(*args, "--preemptible")
    assert rc == 0, text
    cmds = commands(text)
    create = next(c for c in cmds if c[:5] == "gcloud compute tpus tpu-vm create".split())
    assert create[5] == "cca-d30"
    assert flag(create, "accelerator-type") == "v4-32"
    assert flag(create, "version") == "tpu-ubuntu2204-base"
    assert "--preemptible" in create and "--spot" not in create
    assert cmds[-1][:6] == "gcloud compute tpus tpu-vm delete cca-d30".split()
    rc, text = dry(*args, "--keep")
    assert not any("delete" in c for c in commands(text))


def test_v5e_slice_uses_v5litepod_accelerator_type():
    rc, text = dry("create", "--name=n1", "--tpu=v5e-16", "--zone=z", "--spot")
    assert rc == 0
    create = next(c for c in commands(text) if "create" in c)
    assert flag(create, "accelerator-type") == "v5litepod-16"
    assert flag(create, "version") == "v2-alpha-tpuv5-lite"
    assert "--spot" in create


def test_local_inputs_are_staged_and_passed_as_gcs(tmp_path):
    shards = tmp_path / "imagenet_codes"
    shards.mkdir()
    args = [a for a in UP if not a.startswith("--data=")] + [f"--data={shards}"]
    rc, text = dry(*args)
    assert rc == 0, text
    cmds = commands(text)
    dest = "gs://my-bkt/runs/var_d30/staged/data/imagenet_codes"
    assert ["gcloud", "storage", "rsync", "--recursive", str(shards), dest] in cmds
    start = [flag(c, "command") for c in cmds if any(a.startswith("--command=") for a in c)][1]
    assert f"--config.data.path={dest}" in start


def test_single_commands_dry_run():
    base = ["--name=n1", "--tpu=v6e-64", "--zone=z"]
    _, text = dry("delete", *base)
    assert commands(text) == [["gcloud", "compute", "tpus", "tpu-vm", "delete", "n1", "--zone=z",
                               "--quiet"]]
    _, text = dry("logs", *base, "--worker=3", "--lines=20")
    (c,) = commands(text)
    assert flag(c, "worker") == "3" and flag(c, "command") == "tail -n 20 -F ~/cca_jax_run/train.log"
    _, text = dry("stop", *base)
    (c,) = commands(text)
    assert flag(c, "worker") == "all" and "kill -TERM" in flag(c, "command")
    _, text = dry("status", *base)
    assert "cca-status: overall=" in text


@pytest.mark.parametrize("change,msg", [
    (("--workdir=gs://my-bkt/runs/var_d30", "--workdir=/tmp/run"), "must live in GCS"),
    (("--name=cca-d30", "--name=CCA_d30"), "--name"),
    (("--tpu=v5p-32", "--tpu=8xH100"), "not a Cloud TPU slice"),
    (("--tpu=v5p-32", "--tpu=v5p-33"), "multiple of 2"),
    ((f"--config={CONFIG}", "--config=/etc/passwd"), "inside the repository"),
    ((f"--config={CONFIG}", "--config=configs/nope.py"), "does not exist"),
    (("--zone=us-east5-a", "--zone="), "--zone is required"),
])
def test_bad_flags_are_rejected(change, msg, capsys):
    args = [change[1] if a == change[0] else a for a in UP]
    rc, text = dry(*args)
    assert rc == 2
    assert msg in capsys.readouterr().err
    assert "$ " not in text  # nothing was printed as if it would run


def test_exclusive_capacity_flags(capsys):
    assert dry(*UP, "--spot", "--preemptible")[0] == 2
    assert "exclusive" in capsys.readouterr().err
    assert dry(*UP, "--queued", "--preemptible")[0] == 2


def test_bad_override_rejected(capsys):
    assert dry(*UP, "--override=no_equals_sign")[0] == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_jax_pin_read_from_requirements(tmp_path):
    req = tmp_path / "requirements.txt"
    req.write_text("# comment\njaxlib==9.9.9\njax==9.9.8\nflax==1\n")
    assert tpu.jax_version_from_requirements(str(req)) == "9.9.8"
    req.write_text("flax==1\n")
    with pytest.raises(tpu.LaunchError, match="jax==VERSION"):
        tpu.jax_version_from_requirements(str(req))


def test_image_dry_run_builds_with_jax_pin():
    rc, text = dry("image", "--image=us-docker.pkg.dev/p/r/cca-jax:1")
    build, push = commands(text)
    assert build[:2] == ["docker", "build"] and f"JAX_VERSION={JAX_PIN}" in build
    assert build[build.index("-f") + 1].endswith("launch/Dockerfile")
    assert push == ["docker", "push", "us-docker.pkg.dev/p/r/cca-jax:1"]


def test_source_tarball_ships_the_package(tmp_path):
    files = tpu.source_files()
    assert "cca_jax/main.py" in files and "requirements.txt" in files
    assert not any(f.startswith((".venv/", ".git/")) or "__pycache__" in f for f in files)
    tar = tmp_path / "src.tar.gz"
    tpu.write_source_tarball(["cca_jax/main.py", "requirements.txt"], str(tar))
    import tarfile
    with tarfile.open(tar) as t:
        assert sorted(t.getnames()) == ["cca_jax/main.py", "requirements.txt"]
    assert tpu.source_digest(files) == tpu.source_digest(files)
    assert tpu.source_digest(files[:-1]) != tpu.source_digest(files)


# ---------------------------------------------------------------------------------- supervisor

class FakeGcloud:
    """Scripted stand-in for gcloud: slice states and worker status lines, in call order."""

    def __init__(self, states, statuses, hosts):
        self.states = list(states)
        self.statuses = list(statuses)
        self.hosts = hosts
        self.log = []

    def __call__(self, argv):
        self.log.append(argv)
        if "describe" in argv:
            state = self.states.pop(0) if len(self.states) > 1 else self.states[0]
            return tpu.Result(1, "") if state == tpu.MISSING else tpu.Result(0, state + "\n")
        command = next((a for a in argv if a.startswith("--command=")), "")
        if "cca-status: running" in command:
            s = self.statuses.pop(0)
            return tpu.Result(0, "\n".join([f"cca-status: {s}"] * self.hosts))
        return tpu.Result(0, "")


def supervised(states, statuses, **overrides):
    parser = tpu.build_parser()
    args = parser.parse_args(UP + ["--poll-seconds=0"])
    L = tpu.from_args(args, need_run=True)
    for k, v in overrides.items():
        setattr(L, k, v)
    fake = FakeGcloud(states, statuses, L.topology.num_hosts)
    out = io.StringIO()
    run = tpu.Runner(dry_run=True, out=out, dry_answer=fake)  # dry: never executes anything
    src = tpu.Source("d1g3st", "gs://my-bkt/runs/var_d30/staged/code/x.tar.gz")
    return L, run, src, fake, out


def verbs(fake):
    out = []
    for argv in fake.log:
        if "ssh" in argv:
            c = next(a for a in argv if a.startswith("--command="))
            out.append("install" if "uv venv" in c else "start" if "setsid" in c else
                       "status" if "cca-status: running" in c else "ssh")
        else:
            out.append(argv[4] if argv[3] == "tpu-vm" else "?")
    return out


def test_supervisor_recreates_preempted_slice_and_reruns():
    # READY while installing/starting, running once, then PREEMPTED; recreated; finishes.
    states = ["READY", "READY", "PREEMPTED", "PREEMPTED", "CREATING", "READY"]
    L, run, src, fake, out = supervised(states, ["running", "exit=0"])
    assert tpu.supervise(L, run, src) == 1
    v = verbs(fake)
    assert v == ["describe", "install", "start",  # first attempt
                 "describe", "status",  # running
                 "describe",  # PREEMPTED -> watch returns
                 "describe", "delete", "create",  # ensure_slice recreates
                 "describe", "describe", "install", "start",  # CREATING, READY
                 "describe", "status", "describe"], v  # done, slice still healthy
    assert "resumes from the latest checkpoint" in out.getvalue()


def test_supervisor_treats_sigterm_exit_as_preemption_not_success():
    # the trainer checkpoints and exits 0 on SIGTERM; the status says 'preempted' -> run again
    L, run, src, fake, out = supervised(["READY"], ["preempted", "exit=0"])
    assert tpu.supervise(L, run, src) == 1
    assert verbs(fake).count("start") == 2 and "create" not in verbs(fake)


def test_supervisor_success_is_rechecked_against_slice_state():
    # all workers exit 0 but the slice is going away: not done, restart
    states = ["READY", "READY", "STOPPING", "MISSING", "READY"]
    L, run, src, fake, out = supervised(states, ["exit=0", "exit=0"])
    assert tpu.supervise(L, run, src) == 1
    assert verbs(fake).count("create") == 1


def test_supervisor_gives_up_after_repeated_training_failures():
    L, run, src, fake, out = supervised(["READY"], ["exit=1", "exit=1"], max_failures=1)
    with pytest.raises(tpu.LaunchError, match="failed 2 times"):
        tpu.supervise(L, run, src)
    assert verbs(fake).count("start") == 2


def test_supervisor_gives_up_after_max_restarts():
    L, run, src, fake, out = supervised(["READY"], ["lost", "lost", "lost"], max_restarts=2)
    with pytest.raises(tpu.LaunchError, match="max-restarts"):
        tpu.supervise(L, run, src)


@pytest.mark.parametrize("lines,hosts,want", [
    (["running", "running"], 2, "running"),
    (["exit=0", "exit=0"], 2, "done"),
    (["exit=0"], 2, "unknown"),
    (["exit=0", "exit=3"], 2, "failed"),
    (["running", "preempted"], 2, "preempted"),
    (["running", "lost"], 2, "lost"),
])
def test_parse_status(lines, hosts, want):
    text = "some log line\n" + "\n".join(f"cca-status: {s}" for s in lines)
    assert tpu.parse_status(text, hosts) == want


# ----------------------------------------------------------------- remote scripts, run locally

def _fake_worker(tmp_path, python_body):
    """A HOME with ~/cca_jax/.venv/bin/python = ``python_body`` and a PATH whose curl fails."""
    home = tmp_path / "home"
    venv = home / "cca_jax" / ".venv" / "bin"
    venv.mkdir(parents=True)
    py = venv / "python"
    py.write_text("#!/bin/bash\n" + python_body)
    py.chmod(0o755)
    fakebin = tmp_path / "bin"
    fakebin.mkdir()
    curl = fakebin / "curl"
    curl.write_text("#!/bin/bash\nexit 22\n")  # no metadata server here
    curl.chmod(0o755)
    env = dict(os.environ, HOME=str(home), PATH=f"{fakebin}:{os.environ['PATH']}")
    return home, env


def _bash(script, env):
    return subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)


def _wait_status(env, want, timeout=20.0):
    deadline = time.time() + timeout
    while True:
        out = _bash(tpu.status_script(), env).stdout
        if f"cca-status: {want}" in out or time.time() > deadline:
            return out
        time.sleep(0.1)


def _launch(tmp_path):
    args = tpu.build_parser().parse_args(UP + ["--override=train.num_steps=3"])
    return tpu.from_args(args, need_run=True)


def test_start_script_runs_trainer_detached_and_reports_exit(tmp_path):
    home, env = _fake_worker(tmp_path, 'echo "ARGS $@"; echo "WID=${TPU_WORKER_ID:-unset}"; exit 0\n')
    L = _launch(tmp_path)
    res = _bash(tpu.start_script(L), env)
    assert res.returncode == 0 and "cca-status: started" in res.stdout, res.stderr
    out = _wait_status(env, "exit=0")
    assert "cca-status: exit=0" in out
    log = (home / "cca_jax_run" / "train.log").read_text()
    assert f"ARGS -m cca_jax.main --config={CONFIG} --workdir=gs://my-bkt/runs/var_d30" in log
    assert "--config.train.num_steps=3" in log
    assert "WID=unset" in log  # metadata unavailable: nothing invented
    assert tpu.parse_status(out, 1) == "done"


def test_start_script_failure_and_sigterm_are_reported(tmp_path):
    home, env = _fake_worker(tmp_path, "exit 7\n")
    L = _launch(tmp_path)
    _bash(tpu.start_script(L), env)
    assert tpu.parse_status(_wait_status(env, "exit=7"), 1) == "failed"

    py = home / "cca_jax" / ".venv" / "bin" / "python"
    ready = tmp_path / "trainer_started"
    py.write_text(f"#!/bin/bash\ntouch {ready}\nsleep 30\n")
    _bash(tpu.start_script(L), env)  # previous run ended: starts at once
    assert "cca-status: running" in _wait_status(env, "running")
    # the trainer runs only after the wrapper installed its TERM trap; wait for it so a loaded
    # machine cannot deliver the SIGTERM before the trap exists
    deadline = time.time() + 20
    while not ready.exists() and time.time() < deadline:
        time.sleep(0.1)
    assert ready.exists()
    _bash(tpu.stop_script(), env)  # SIGTERM to the run's process group, like a host shutdown
    out = _wait_status(env, "preempted")
    assert tpu.parse_status(out, 1) == "preempted", out


# ------------------------------------------------------------------------------------- GKE

def gke(*extra):
    out = io.StringIO()
    rc = tpu.main(["gke", "--name=cca-d30", "--image=reg/cca:1", f"--config={CONFIG}",
                   "--workdir=gs://my-bkt/runs/var_d30", "--data=gs://my-bkt/tok", *extra], out=out)
    return rc, out.getvalue()


def test_jobset_manifest_v5p_multi_host_spot():
    rc, text = gke("--tpu=v5p-32", "--spot", "--max-restarts=7")
    assert rc == 0
    doc = yaml.safe_load(text)  # comments (kubectl hints) are ignored by YAML
    assert doc["apiVersion"] == "jobset.x-k8s.io/v1alpha2" and doc["kind"] == "JobSet"
    assert doc["metadata"]["name"] == "cca-d30"
    assert doc["spec"]["failurePolicy"]["maxRestarts"] == 7
    (rj,) = doc["spec"]["replicatedJobs"]
    assert rj["replicas"] == 1
    job = rj["template"]["spec"]
    assert job["parallelism"] == job["completions"] == 4 and job["backoffLimit"] == 0
    pod = job["template"]["spec"]
    assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice",
                                   "cloud.google.com/gke-tpu-topology": "2x2x4",
                                   "cloud.google.com/gke-spot": "true"}
    assert any(t["key"] == "cloud.google.com/gke-spot" for t in pod["tolerations"])
    (c,) = pod["containers"]
    assert c["image"] == "reg/cca:1"
    assert c["resources"]["limits"]["google.com/tpu"] == 4
    assert c["command"] == ["python", "-m", "cca_jax.main", f"--config={CONFIG}",
                            "--workdir=gs://my-bkt/runs/var_d30", "--config.data.path=gs://my-bkt/tok"]
    assert "kubectl apply -f jobset.yaml" in text


def test_jobset_manifest_single_host_v5e_and_slices(tmp_path):
    out = tmp_path / "js.yaml"
    rc, text = gke("--tpu=v5e-8", "--num-slices=2", f"--out={out}")
    assert rc == 0
    doc = yaml.safe_load(out.read_text())
    rj = doc["spec"]["replicatedJobs"][0]
    assert rj["replicas"] == 2
    pod = rj["template"]["spec"]["template"]["spec"]
    assert rj["template"]["spec"]["parallelism"] == 1
    assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice",
                                   "cloud.google.com/gke-tpu-topology": "2x4"}
    assert pod["containers"][0]["resources"]["limits"]["google.com/tpu"] == 8


def test_jobset_rejects_local_paths_and_gpus(capsys):
    rc, _ = gke("--tpu=v5p-32", "--reference-checkpoint=/local/var_d30.pth")
    assert rc == 2 and "gs://" in capsys.readouterr().err
    rc, _ = gke("--tpu=8xH100")
    assert rc == 2 and "not a TPU slice" in capsys.readouterr().err
