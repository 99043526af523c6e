"""Two machines, proven on one: two torchrun agents on 127.0.0.1 with --nnodes 2 and node ranks 0 and 1 are
two nodes for every purpose of train.py (README "Many GPUs and many machines", docs/many_gpus.md).

Each node has its own copy of an image folder (--data_dir) and its own run folder (--output_dir): disks that
are not shared. One gloo process per node, CPU, 16-px images, 4 steps an epoch, 2 epochs; README's launch
flags, with train.py's main run in float64 (the one change), so that the two nodes can be compared with one
process to 1e-9. Three launches serve every test: a run to the end; the same run with node 1 killed in its
second epoch; and the same two commands again, which resume it. A one-process run at the same global batch
is the reference. The last test: --collective_timeout reaches the process group (a machine switched off
closes no connection; its peers wait that long in a collective, then end).
"""
import datetime
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

import recipes
import run_setup
import shapes
import train
from helpers import REPO, assert_identical, free_port, worker_pid

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# Learned ADIOS with N = 2 and views made on the CPU: no per-rank random draws, so two processes of batch
# 4 compute what one of batch 8 does (ADIOS-s, random or block masks and --gpu_aug differ by design).
FLAGS = ["--dataset", "imagefolder", "--img_size", "16", "--stem", "standard", "--num_masks", "2", "--mask_channels",
         "8", "--proj_hidden_dim", "32", "--proj_output_dim", "16", "--workers", "0", "--device", "cpu",
         "--precision", "fp32", "--epochs", "2", "--save_every", "1"]
# float64, where the code allows it: train.py's main, run by torchrun with float64 as torch's default dtype.
FLOAT64 = """
import sys, torch
sys.path.insert(0, {repo!r})
torch.set_default_dtype(torch.float64)
import train
train.main(sys.argv[1:])
"""
IMAGES = dict(train=16, val=4)          # per class, two classes: 32 training images, 4 steps of 8 an epoch


def image_folder(root):
    """train/ and val/ with two class folders of 16-px shapes images (PNG)."""
    for split, n in IMAGES.items():
        for c in range(2):
            os.makedirs(root / split / f"class{c}")
            for i in range(n):
                img = shapes.render_shapes(0, shapes.SPLIT_IDS["train" if split == "train" else "test"], 2 * i + c, 16)[0]
                Image.fromarray(img).save(root / split / f"class{c}" / f"{i}.png")
    return root


def node_command(node, port, script, data_dir, out):
    """README's launch on node `node` of two, HOST0 = 127.0.0.1 (static rendezvous, torchrun's default), of
    `script`: train.py's main in float64."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", f"--node_rank={node}",
            f"--rdzv_endpoint=127.0.0.1:{port}", str(script), *FLAGS, "--batch_size", "4", "--data_dir", str(data_dir),
            "--output_dir", str(out)]


class Nodes:
    """Two torchrun agents, output in files; kill() ends an agent and its workers (their own sessions)."""

    def __init__(self, root, name, disks):
        port, self.root, self.name, self.procs = free_port(), root, name, []
        for node, disk in enumerate(disks):
            with open(root / f"{name}{node}.out", "w") as o, open(root / f"{name}{node}.err", "w") as e:
                self.procs.append(subprocess.Popen(node_command(node, port, root / "float64_train.py", disk / "data", disk / "run"), cwd=REPO,
                                                   env=ENV, stdout=o, stderr=e, start_new_session=True))

    def kill(self, node):
        agent = self.procs[node]
        try:
            workers = [worker_pid(agent.pid, rank=node)]
        except AssertionError:                  # not started, or already gone
            workers = []
        for pid in [agent.pid, *workers]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        agent.wait()

    def wait(self, timeout=240):
        for proc in self.procs:
            proc.wait(timeout=timeout)
        return [(p.returncode, (self.root / f"{self.name}{n}.out").read_text(), (self.root / f"{self.name}{n}.err").read_text())
                for n, p in enumerate(self.procs)]

    def cleanup(self):
        for node, proc in enumerate(self.procs):
            if proc.poll() is None:
                self.kill(node)


def one_process_reference(root):
    """train.main here, float64, with the global batch 8 on one process: its first epoch's checkpoint (4 steps)."""
    out, default = root / "one_process", torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        train.main([*FLAGS, "--batch_size", "8", "--max_steps", "4", "--data_dir", str(root / "disk0" / "data"),
                    "--output_dir", str(out)])
    finally:
        torch.set_default_dtype(default)
    return torch.load(out / "checkpoint.pth", weights_only=True)


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    """The three two-node launches (see the module's docstring) and the one-process reference. The run to
    the end and the one that loses node 1 start together; the reference runs here after the loss."""
    root = tmp_path_factory.mktemp("two_nodes")
    (root / "float64_train.py").write_text(FLOAT64.format(repo=REPO))
    whole, broken = [root / f"disk{n}" for n in range(2)], [root / f"broken{n}" for n in range(2)]
    for disk in (*whole, *broken):
        image_folder(disk / "data")
    started = []
    try:
        started += [Nodes(root, "whole", whole), Nodes(root, "broken", broken)]
        # Node 1 lost in epoch 1 (steps 4 to 7), after the checkpoint of epoch 0. Watched before the reference
        # runs here: on a busy machine the reference would outlast the broken run's two epochs.
        log, deadline = broken[0] / "run" / "log.jsonl", time.time() + 180
        while not (log.exists() and log.read_text().strip()):
            assert time.time() < deadline and started[1].procs[0].poll() is None, "no epoch logged in time"
            time.sleep(0.05)
        time.sleep(0.5)
        assert started[1].procs[0].poll() is None, "node 0 ended before node 1 was lost"
        killed_at = time.time()
        started[1].kill(1)
        results = dict(lost=(started[1].procs[0].wait(timeout=60), time.time() - killed_at))
        try:
            results["reference"] = one_process_reference(root)
        except (Exception, SystemExit) as e:
            results["reference"] = e
        results["lost_checkpoint"] = (broken[0] / "run" / "checkpoint.pth").read_bytes()
        results["broken"] = started[1].wait()
        started.append(Nodes(root, "broken", broken))      # the same two commands again
        results["resumed"] = started[2].wait()
        results["whole"] = started[0].wait()
    finally:
        for nodes in started:
            nodes.cleanup()
    return dict(root=root, disks=dict(whole=whole, broken=broken), **results)


def load(path):
    return torch.load(path, weights_only=True)


def test_two_nodes_train_as_one(launches):
    (rc0, out0, err0), (rc1, out1, err1) = launches["whole"]
    assert rc0 == rc1 == 0, (err0 + err1)[-3000:]
    # The settings line, said once (rank 0): nodes × processes per node, per-process and global batch.
    assert "2 node(s) × 1 process(es) on cpu; batch 4 per process, global batch 8" in out0 and "train.py:" not in out1
    # Each process checked its share of the image folder: every file once, together.
    assert f"checked {2 * sum(IMAGES.values())} images under" in out0
    # One writer: rank 0's run folder holds the run, node 1's nothing.
    node0, node1 = (disk / "run" for disk in launches["disks"]["whole"])
    assert load(node0 / "checkpoint.pth")["step"] == 8 and os.listdir(node1) == []


def test_two_nodes_equal_one_process_at_the_same_global_batch(launches):
    if isinstance(launches["reference"], BaseException):
        raise launches["reference"]
    two, one = load(launches["disks"]["whole"][0] / "run" / "checkpoint_epoch001.pth"), launches["reference"]
    assert two["step"] == one["step"] == 4
    # DDP's mean of the two processes' means against one mean over the whole batch: the same in float64 up
    # to the order of additions (fp32 drifts apart by about 1 % in 4 steps).
    assert two["model"]["net.encoder.conv1.weight"].dtype == torch.float64
    for key, value in one["model"].items():
        torch.testing.assert_close(two["model"][key], value, rtol=1e-9, atol=1e-11, msg=key)


def test_a_lost_node_ends_the_other_in_seconds_with_one_line(launches):
    (rc0, _, err0), _ = launches["broken"]
    rc, seconds = launches["lost"]
    assert rc != 0 and seconds < 15, (seconds, err0[-3000:])
    ours = [line for line in err0.splitlines() if line.startswith("train.py: error:")]
    assert len(ours) == 1 and "rank 0 lost the process at 127.0.0.1" in ours[0], err0[-3000:]
    assert "rerun the same command on every machine to resume" in ours[0]
    assert "Traceback" not in err0.split("torch/distributed/elastic")[0], err0[-3000:]
    state = torch.load(__import__("io").BytesIO(launches["lost_checkpoint"]), weights_only=True)
    assert (state["epoch"], state["step"]) == (1, 4)                  # the last checkpoint, intact


def test_the_same_two_commands_resume_to_the_uninterrupted_state(launches):
    (rc0, out0, err0), (rc1, _, err1) = launches["resumed"]
    assert rc0 == rc1 == 0, (err0 + err1)[-3000:]
    assert "resuming from" in out0 and "epoch 1, step 4" in out0          # from rank 0's disk alone
    keys = ("model", "optimizers", "scaler", "epoch", "step")
    resumed, whole = (load(launches["disks"][name][0] / "run" / "checkpoint.pth") for name in ("broken", "whole"))
    assert_identical({k: resumed[k] for k in keys}, {k: whole[k] for k in keys})


# ---- a machine that disappears: the collective timeout ----

def test_collective_timeout_reaches_the_process_group(monkeypatch):
    # A machine switched off closes no connection: its peers wait this long in a collective, then end.
    seen = {}
    monkeypatch.setattr(run_setup.dist, "init_process_group", lambda backend, timeout=None: seen.update(t=timeout))
    for key, value in dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0").items():
        monkeypatch.setenv(key, value)
    args = recipes.parse_args(["--collective_timeout", "0.5", "--device", "cpu"])
    assert run_setup.setup_distributed(args.device, args.collective_timeout)[:2] == (0, 2)
    assert seen["t"] == datetime.timedelta(seconds=30)
