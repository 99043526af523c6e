"""The method's files copied alone into an empty folder (README "Reading guide": what a student copies) build
ADIOS and train it one step each way, with torch and torchvision only: nothing else of this repo is there."""
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COPIED = ("adios.py", "masker.py", "encoders.py", "losses.py", "batchnorm.py")   # README's list

STEPS = """
import sys, torch
import adios, batchnorm, encoders, masker
assert all(not p.startswith({root!r}) for p in sys.path if p), sys.path        # the repo is out of reach
torch.manual_seed(0)
for method in ("simclr", "byol", "simsiam"):
    backbone, feat_dim = encoders.build_encoder("resnet18", 32)
    model = adios.ADIOS(backbone, feat_dim, masker.Masker(3, 32, base_channels=8), method=method,
                        proj_hidden_dim=64, proj_output_dim=32, pred_hidden_dim=16, num_classes=4)
    opt_enc = torch.optim.SGD(model.net.parameters(), lr=0.01)
    opt_mask = torch.optim.SGD(model.masker.parameters(), lr=0.01)
    x_a, x_b = torch.randn(2, 4, 3, 32, 32)                   # two views of 4 random images
    labels = torch.tensor([0, 1, 2, -1])
    weights = [p.detach().clone() for p in (*model.net.parameters(), *model.masker.parameters())]
    with batchnorm.as_released(model, "encoder"):            # the encoder step
        loss, stats = model.encoder_loss(x_a, x_b, labels)
    opt_enc.zero_grad(); loss.backward(); opt_enc.step()
    with batchnorm.as_released(model, "masker"):             # the masker step
        loss, _ = model.masker_loss(x_a, x_b)
    opt_mask.zero_grad(); loss.backward(); opt_mask.step()
    if method == "byol":
        model.momentum_update(0.99)
    moved = [not torch.equal(w, p) for w, p in zip(weights, (*model.net.parameters(), *model.masker.parameters()))]
    n_net = len(list(model.net.parameters()))
    assert any(moved[:n_net]) and any(moved[n_net:]), method    # both players stepped
    assert torch.isfinite(loss) and set(stats) >= {{"ssl_loss", "penalty", "area_0", "online_acc"}}
    print(method, "ok", round(stats["ssl_loss"].item(), 3))
"""


def test_the_method_files_alone_build_and_train_adios(tmp_path):
    for name in COPIED:
        shutil.copy(os.path.join(ROOT, name), tmp_path / name)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    run = subprocess.run([sys.executable, "-c", STEPS.format(root=ROOT)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert [line.split()[:2] for line in run.stdout.splitlines()] == [[m, "ok"] for m in ("simclr", "byol", "simsiam")]


def test_readme_names_the_copied_files():
    paragraphs = open(os.path.join(ROOT, "README.md")).read().split("\n\n")
    said = [p for p in paragraphs if p.startswith("**Copying the method")]
    assert len(said) == 1, "README must say, in one paragraph, which files a student copies"
    names = set(re.findall(r"`(\w+\.py)`", said[0].split("(")[0]))         # before the parenthesis: the list
    assert names == set(COPIED), names


@pytest.mark.parametrize("name", COPIED)
def test_the_copied_files_import_nothing_else_of_ours(name):
    ours = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")}
    source = open(os.path.join(ROOT, name)).read()
    imported = {line.split()[1].split(".")[0] for line in source.splitlines() if line.startswith(("import ", "from "))}
    assert imported & ours <= {n[:-3] for n in COPIED}, imported & ours
