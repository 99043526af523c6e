"""Tests of checkpoint.py and of train.py's faults: resume refused for a checkpoint of another run (or
announced where only the device differs), exact resume, and the faults of a long run — a save cut short, a
non-finite loss, SIGTERM (one process, or one of two torchrun ranks). CPU, on test_train's tiny shapes
configuration (helpers.TINY: 32 images, batch 8, 4 steps an epoch). Bad input: test_cli_checks.py.
"""
import errno
import io
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import adios
import checkpoint
import recipes
import shapes
import train
from helpers import TINY, assert_identical, bad_input, ckpt, read_log, run, worker_pid

REPO = os.path.dirname(os.path.abspath(train.__file__))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}      # the subprocesses share two busy cores


# ---- resume: the same run, or a refusal in one line ----

@pytest.fixture(scope="module")
def one_step_run(tmp_path_factory):
    """An output directory holding the checkpoint of a one-step run (N = 2, resnet18, 32 px)."""
    out = tmp_path_factory.mktemp("one_step") / "out"
    run(out, "--max_steps", "1")
    return out


@pytest.mark.parametrize("flags, says", [(["--arch", "resnet50"], "--arch resnet18"),
                                         (["--num_masks", "3"], "--num_masks 2"),
                                         (["--img_size", "64"], "--img_size 32")])
def test_resume_with_an_incompatible_checkpoint(capsys, one_step_run, flags, says):
    with pytest.raises(SystemExit) as e:
        run(one_step_run, "--resume", *flags)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and says in err, err


def copy_of(run_dir, tmp_path, **changed_args):
    """A copy of a run folder as tmp_path/out, its checkpoint's args changed as given."""
    shutil.copytree(run_dir, tmp_path / "out")
    state = ckpt(tmp_path / "out")
    state["args"].update(changed_args)
    torch.save(state, tmp_path / "out" / "checkpoint.pth")
    return tmp_path / "out"


def test_every_flag_is_either_shaping_or_running():
    # A new flag must be put in one list: else a resume would silently ignore it, or refuse for nothing.
    flags = {a.dest for a in recipes.get_args_parser()._actions if a.dest != "help"}
    lists = [set(checkpoint.SHAPING), set(checkpoint.RUNNING), set(checkpoint.DEVICE)]
    assert flags | {"data_version"} == set.union(*lists) and sum(map(len, lists)) == len(set.union(*lists))
    assert {"max_steps", "save_every", "resume", "dry_run", "data_dir", "download", "workers", "device",
            "output_dir", "epochs", "compile"} <= set(checkpoint.RUNNING)


def test_changed_shaping_flags_are_refused_listing_each(capsys, one_step_run):
    # The ablation that used to report the first run: same folder, other α and rate.
    with pytest.raises(SystemExit) as e:
        run(one_step_run, "--alpha", "0.7", "--lr", "1.0", "--jitter", "0", "0", "0", "0")
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    for said in ("--alpha 0.5 (this run: 0.7)", "--lr 0.3 (this run: 1.0)",
                 "--jitter 0.4 0.4 0.4 0.1 (this run: 0.0 0.0 0.0 0.0)", "checkpoint's values", "another --output_dir"):
        assert said in err, err


def test_another_shapes_generator_is_refused(capsys, one_step_run, tmp_path):
    out = copy_of(one_step_run, tmp_path, data_version=0)
    assert f"--data_version 0 (this run: {shapes.VERSION})" in bad_input(capsys, tmp_path)
    assert len(read_log(out)) == 1                      # nothing trained


def test_precision_change_is_allowed_and_announced(capsys, one_step_run, tmp_path):
    out = copy_of(one_step_run, tmp_path)
    assert run(out, "--max_steps", "2", "--precision", "bf16")["step"] == 2
    assert "resuming from" in (said := capsys.readouterr().out) and "--precision bf16 on this machine (it was fp32)" in said


def test_a_finished_run_says_complete_and_does_nothing(capsys, one_step_run, tmp_path):
    out = copy_of(one_step_run, tmp_path)
    before = (out / "checkpoint.pth").read_bytes(), (out / "log.jsonl").read_text()
    capsys.readouterr()
    assert run(out, "--max_steps", "1")["complete"]
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].startswith("complete: step 1 of --max_steps 1"), lines
    assert ((out / "checkpoint.pth").read_bytes(), (out / "log.jsonl").read_text()) == before


def test_resume_flag_requires_a_checkpoint(capsys, tmp_path):
    assert "--resume: there is no checkpoint at" in bad_input(capsys, tmp_path, "--resume")


@pytest.mark.parametrize("made, now, says", [
    (dict(world_size=2, batch_size=4), {}, None),                        # 2 × 4 = 1 × 8: the same global batch
    (dict(world_size=2, batch_size=8), {}, "global batch 16 = --batch_size 8 × 2 process(es) (this run: 8 = 8 × 1)"),
    (dict(world_size=2, batch_size=4, sync_bn=False), dict(sync_bn=False), "only with --sync_bn"),
    (dict(world_size=4, batch_size=2, no_gather=True), dict(no_gather=True), "without --no_gather"),
    (dict(world_size=2, batch_size=4, gpu_aug=True), dict(gpu_aug=True), "without --gpu_aug"),
    (dict(world_size=2, batch_size=4, no_gather=True, method="byol"), dict(no_gather=True, method="byol"), None)])
def test_another_process_count_at_the_same_global_batch(one_step_run, made, now, says):
    # Each step trains on the same images whatever the count (the sampler's order, seeded views); the
    # run means the same only where nothing else depends on the count.
    made_args, now_args = {**ckpt(one_step_run)["args"], **made}, {**ckpt(one_step_run)["args"], **now}
    found = checkpoint.shaping_differences(made_args, now_args)
    assert found == [] if says is None else len(found) == 1 and says in found[0], found


def test_resume_on_another_number_of_processes(capsys, one_step_run, tmp_path):
    out = copy_of(one_step_run, tmp_path, world_size=2, batch_size=4)   # 2 × 4: resumed by 1 × 8
    assert run(out, "--max_steps", "2")["step"] == 2
    shutil.rmtree(out)
    copy_of(one_step_run, tmp_path, world_size=2)                        # 2 × 8: not the global batch 8
    capsys.readouterr()
    assert "global batch 16" in bad_input(capsys, tmp_path)


def test_resume_from_an_unreadable_checkpoint(capsys, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "checkpoint.pth").write_bytes(b"PK\x03\x04 half a zip")
    assert "cannot be read" in bad_input(capsys, tmp_path, "--resume")


def test_rerunning_the_same_command_resumes(tmp_path):
    """No --resume needed: an existing checkpoint is continued, never overwritten by a fresh start."""
    run(tmp_path / "out", "--max_steps", "1")
    assert run(tmp_path / "out", "--max_steps", "2")["step"] == 2


# ---- faults during training ----

def test_interrupted_save_keeps_the_previous_checkpoint(capsys, tmp_path, monkeypatch):
    out = tmp_path / "out"
    run(out, "--max_steps", "1")
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):               # half the bytes reach the file, then ENOSPC
        buf = io.BytesIO()
        real_save(obj, buf)
        half = buf.getvalue()[:len(buf.getvalue()) // 2]
        if isinstance(f, (str, os.PathLike)):
            with open(f, "wb") as fh:
                fh.write(half)
        else:
            f.write(half)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", disk_full)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run(out, "--max_steps", "2", "--resume")
    err = capsys.readouterr().err
    assert e.value.code == 1 and "No space left on device" in err and "Traceback" not in err, err
    assert ckpt(out)["step"] == 1 and os.listdir(out).count("checkpoint.pth.tmp") == 0
    monkeypatch.setattr(torch, "save", real_save)
    assert run(out, "--max_steps", "2", "--resume")["step"] == 2      # train.py itself loads the old one


def nan_from_now(monkeypatch, method, stat):
    """Make ADIOS.<method> report a non-finite loss, and the term `stat` in its stats, from now on."""
    real = getattr(adios.ADIOS, method)

    def poisoned(self, *args, **kwargs):
        loss, stats = real(self, *args, **kwargs)
        return loss * float("nan"), {**stats, stat: float("nan")}
    monkeypatch.setattr(adios.ADIOS, method, poisoned)


@pytest.mark.parametrize("method, stat, term", [("encoder_loss", "ssl_loss", "encoder loss"),
                                                ("masker_loss", "ssl_loss", "masker loss"),
                                                ("masker_loss", "penalty", "sparsity penalty")])
def test_non_finite_loss_stops_without_saving(capsys, tmp_path, monkeypatch, method, stat, term):
    out = tmp_path / "out"
    run(out, "--max_steps", "1")
    before = ckpt(out)
    nan_from_now(monkeypatch, method, stat)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run(out, "--max_steps", "3", "--resume")
    err = capsys.readouterr().err
    assert e.value.code == 1 and f"non-finite {term} at step 2" in err and "Traceback" not in err, err
    after = ckpt(out)
    assert after["step"] == 1 and all(torch.equal(before["model"][k], after["model"][k]) for k in before["model"])
    assert len(read_log(out)) == 1


def test_non_finite_weights_are_not_saved(capsys, tmp_path, monkeypatch):
    real_step = train.adios_step

    def spoiling(model, *args):                    # a finite loss, but a step that leaves an infinity
        stats = real_step(model, *args)
        with torch.no_grad():
            model.encoder.conv1.weight[0, 0, 0, 0] = float("inf")
        return stats
    monkeypatch.setattr(train, "adios_step", spoiling)
    with pytest.raises(SystemExit) as e:
        run(tmp_path / "out", "--max_steps", "1")
    err = capsys.readouterr().err
    assert e.value.code == 1 and "non-finite weights in" in err and "conv1.weight" in err, err
    assert not (tmp_path / "out" / "checkpoint.pth").exists()


def test_resume_at_an_epoch_boundary_is_bit_identical(tmp_path, capsys):
    # --max_steps stops at the end of epoch 0 with the 2-epoch LR schedule; `--epochs 1` would give
    # a 1-epoch cosine, a different run by design.
    one_go, split = tmp_path / "one_go", tmp_path / "split"
    run(one_go, "--epochs", "2", "--save_every", "1")
    run(split, "--epochs", "2", "--max_steps", "4")
    first_half = ckpt(split)
    run(split, "--epochs", "2", "--resume")
    keys = ("model", "encoder", "optimizers", "scaler", "epoch", "step")
    assert_identical({k: first_half[k] for k in keys}, {k: ckpt(one_go, "checkpoint_epoch001.pth")[k] for k in keys})
    assert_identical({k: ckpt(split)[k] for k in keys}, {k: ckpt(one_go)[k] for k in keys})
    assert_identical(ckpt(one_go)["model"], ckpt(one_go, "checkpoint_epoch002.pth")["model"])
    assert ckpt(split)["step"] == 8 and [line["epoch"] for line in read_log(split)] == [0, 1]
    capsys.readouterr()
    assert run(split, "--epochs", "2")["complete"]                      # rerun: says so and trains nothing
    assert capsys.readouterr().out.splitlines()[-1].startswith("complete: epoch 2 of 2, step 8")
    assert ckpt(split)["step"] == 8 and len(read_log(split)) == 2


@pytest.mark.parametrize("flags", [[], ["--workers", "2"], ["--gpu_aug", "--single_mask"]],
                         ids=["in-process", "two-workers", "gpu-aug-adios-s"])
def test_resume_mid_epoch_is_bit_identical(tmp_path, flags):
    # Views are seeded per image (data.SeededViews; per batch with --gpu_aug) and each step's own
    # randomness per step (train.step_seed), so a stop anywhere resumes into the uninterrupted run.
    one_go, split = tmp_path / "one_go", tmp_path / "split"
    run(one_go, "--epochs", "2", *flags)
    run(split, "--epochs", "2", "--max_steps", "6", *flags)
    assert (ckpt(split)["epoch"], ckpt(split)["step"]) == (1, 6)      # 2 of epoch 1's 4 steps done
    run(split, "--epochs", "2", *flags)
    assert [line["step"] for line in read_log(split)] == [4, 6, 8]
    keys = ("model", "optimizers", "scaler", "epoch", "step")
    assert_identical({k: ckpt(split)[k] for k in keys}, {k: ckpt(one_go)[k] for k in keys})


def wait_for_first_epoch(out, proc, timeout=180):
    log, deadline = out / "log.jsonl", time.time() + timeout
    while not (log.exists() and log.read_text().strip()):
        assert proc.poll() is None, f"the run ended before its first epoch (rc {proc.returncode})"
        assert time.time() < deadline, "no epoch logged in time"
        time.sleep(0.05)


@pytest.fixture
def launch(tmp_path):
    """launch(name, cmd) -> Popen in its own process group, output in files (a pipe could fill up and
    block the run); whatever still runs when the test ends is killed, workers included."""
    procs = []

    def start(name, cmd):
        with open(tmp_path / f"{name}.out", "w") as out, open(tmp_path / f"{name}.err", "w") as err:
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=out, stderr=err, start_new_session=True))
        return procs[-1]
    yield start
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def finish(tmp_path, name, proc, timeout=300):
    proc.wait(timeout=timeout)
    return proc.returncode, (tmp_path / f"{name}.out").read_text(), (tmp_path / f"{name}.err").read_text()


def test_sigterm_saves_and_resume_completes(tmp_path, launch):
    out = tmp_path / "out"
    cmd = [sys.executable, "train.py", *TINY, "--epochs", "4", "--output_dir", str(out)]
    proc = launch("first", cmd)
    wait_for_first_epoch(out, proc)
    proc.send_signal(signal.SIGTERM)
    rc, stdout, stderr = finish(tmp_path, "first", proc)
    assert rc == 0 and "stopped by signal" in stdout, stderr[-3000:]
    assert 4 <= ckpt(out)["step"] < 16
    rc, _, stderr = finish(tmp_path, "second", launch("second", [*cmd, "--resume"]))
    assert rc == 0, stderr[-3000:]
    assert (ckpt(out)["epoch"], ckpt(out)["step"]) == (4, 16) and read_log(out)[-1]["epoch"] == 3


def test_sigterm_to_one_torchrun_rank_leaves_a_loadable_checkpoint(tmp_path, launch):
    # --max_restarts restarts workers that fail; these save and exit 0, so torchrun ends with success and
    # nothing restarts them (README "Stopping and resuming"): the same command, rerun, continues.
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max_restarts=2",
           "train.py", *TINY, "--epochs", "20", "--output_dir", str(out)]           # 2 steps an epoch on each rank
    proc = launch("ddp", cmd)
    wait_for_first_epoch(out, proc)
    os.kill(worker_pid(proc.pid, rank=1), signal.SIGTERM)              # not rank 0, the one that saves
    rc, stdout, stderr = finish(tmp_path, "ddp", proc)
    assert rc == 0 and "stopped by signal" in stdout, stderr[-3000:]
    assert 2 <= ckpt(out)["step"] < 40 and ckpt(out)["step"] == read_log(out)[-1]["step"]
    assert stdout.count("train.py: shapes") == 1, stdout                 # started once: not restarted
    assert "1 node(s) × 2 process(es) on cpu; batch 8 per process, global batch 16" in stdout


FAILING_SAVE = """
import os, sys, torch
sys.path.insert(0, {repo!r})
import train
if os.environ["RANK"] == "0":                                  # a full disk where rank 0 saves
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    torch.save = disk_full
train.main(sys.argv[1:])
"""


def test_a_failed_save_on_rank_0_ends_every_rank_in_seconds(tmp_path, launch):
    # Rank 1 waits in the collective after the save; it must not wait there for the 30-minute timeout.
    out, script = tmp_path / "out", tmp_path / "failing_save.py"
    script.write_text(FAILING_SAVE.format(repo=REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           *TINY, "--epochs", "20", "--output_dir", str(out)]
    proc = launch("save", cmd)
    deadline = time.time() + 180
    while "cannot write" not in (tmp_path / "save.err").read_text():
        assert proc.poll() is None and time.time() < deadline, (tmp_path / "save.err").read_text()[-3000:]
        time.sleep(0.05)
    failed_at = time.time()
    rc, _, stderr = finish(tmp_path, "save", proc, timeout=60)
    assert rc != 0 and time.time() - failed_at < 10
    ours = [line for line in stderr.splitlines() if line.startswith("train.py: error:")]
    assert "No space left on device" in ours[0] and "previous checkpoint is intact" in ours[0], stderr[-3000:]
    survivors = [line for line in ours[1:] if "rank 1 lost" in line]
    assert len(ours) == 2 and len(survivors) == 1, stderr[-3000:]      # the survivor: exactly one line
    assert "Traceback" not in stderr.split("torch/distributed/elastic")[0], stderr
    assert not (out / "checkpoint.pth").exists()
