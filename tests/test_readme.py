"""README and the docs/*.md pages it links cannot rot: every command in them runs or is validated, every
code name in them exists."""
import ast
import importlib
import pathlib
import re
import shlex
import subprocess
import sys

import pytest
import torch
from PIL import Image

import bench
import eval_linear
import recipes
import show_masks
import supervised
import train

ROOT = pathlib.Path(__file__).parent.parent                     # the repository
README = (ROOT / "README.md").read_text()
PAGES = [README] + [page.read_text() for page in sorted((ROOT / "docs").glob("*.md"))]
DOCS = "\n".join(PAGES)                                       # README first, then each docs/ page


def command_lines():
    """Every line of the pages' bash blocks, and every `python ...` in inline code (the tables)."""
    lines = [line for block in re.findall(r"```bash\n(.*?)```", DOCS, flags=re.S) for line in block.splitlines()]
    return lines + re.findall(r"`(python3? [^`]+)`", DOCS)


def commands():
    """(program, argv) for every `python X.py ...` or `torchrun ... X.py ...` command in README."""
    found = []
    for line in command_lines():
        words = shlex.split(line, comments=True)
        scripts = [i for i, w in enumerate(words) if w.endswith(".py")]
        if words and words[0] in ("python", "python3", "torchrun") and scripts and words[1] not in ("-m", "-c"):
            command = (words[scripts[0]], words[scripts[0] + 1:])
            if command not in found:
                found.append(command)
    return found


@pytest.mark.parametrize("line", [line for line in command_lines() if line.startswith("python -c")])
def test_readme_python_snippet(line):
    words = shlex.split(line)
    words[0] = sys.executable                                 # the interpreter running the tests, not PATH's
    result = subprocess.run(words, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_readme_has_the_commands_users_type():
    programs = {p for p, _ in commands()}
    assert {"train.py", "eval_linear.py", "bench.py"} <= programs
    assert ("train.py", []) in commands()                      # the quickstart


@pytest.fixture(scope="module")
def shapes_checkpoint(tmp_path_factory):
    """A real two-iteration checkpoint of the quickstart's model, for README's shapes evaluations."""
    out = tmp_path_factory.mktemp("quickstart")
    train.main(["--max_steps", "2", "--output_dir", str(out), "--workers", "0", "--num_images", "128"])
    return out / "checkpoint.pth"


@pytest.mark.parametrize("program, argv", commands(), ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_readme_command(program, argv, tmp_path, request):
    args = recipes.get_args_parser().parse_args(argv) if program == "train.py" else None
    if program == "train.py" and args.dataset == "shapes":
        # On the embedded data: a real run, two iterations, on a smaller set and batch.
        log = train.main([*argv, "--max_steps", "2", "--output_dir", str(tmp_path), "--workers", "0",
                          "--num_images", "32", "--batch_size", "16"])
        assert log["step"] == 2
    elif program == "train.py":
        resolved = train.main([*argv, "--dry_run"])             # validates every flag, needs no data
        assert resolved["dataset"] == args.dataset
    elif program == "eval_linear.py":
        parsed = eval_linear.get_args_parser().parse_args(argv)
        if parsed.dataset == "shapes" and parsed.ckpt:            # evaluate a real two-iteration checkpoint
            ckpt = str(request.getfixturevalue("shapes_checkpoint"))
            result = eval_linear.main([*argv, "--ckpt", ckpt, "--epochs", "1", "--num_images", "128",
                                       "--workers", "0", "--output", str(tmp_path / "e.json")])
            assert 0 <= result["top1"] <= 100
    elif program == "show_masks.py":
        parsed = show_masks.get_args_parser().parse_args(argv)
        if parsed.ckpt.endswith(".pth") and "shapes" in parsed.ckpt:   # a real checkpoint, on two made-up photos
            photos = [tmp_path / "a.png", tmp_path / "b.jpg"]
            for k, path in enumerate(photos):
                Image.new("RGB", (48 + 16 * k, 40), (40 * k, 200, 90)).save(path)
            ckpt = str(request.getfixturevalue("shapes_checkpoint"))
            out = show_masks.main(["--ckpt", ckpt, "--out", str(tmp_path / "m"), *map(str, photos)])
            assert torch.load(pathlib.Path(out) / "masks.pt", weights_only=True)["masks"].shape[0] == 2
    elif program == "bench.py":
        bench.get_args_parser().parse_args(argv)
    elif program == "supervised.py":
        supervised.parse_args(argv)                             # validates every flag (test_supervised.py runs it)
    else:
        pytest.fail(f"README runs {program}, which no test checks")


def test_reading_guide_names_exist():
    names = set(re.findall(r"`(\w+)\.py:([\w.]+)`", DOCS))
    assert len(names) > 20
    for module, path in names:
        obj = importlib.import_module(module)
        for part in path.split("."):
            assert hasattr(obj, part), f"README names {module}.py:{path}, which does not exist"
            obj = getattr(obj, part)


def test_ci_installs_and_tests_what_readme_says():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install -r requirements.txt pytest tensorboard" in README
    assert "pip install -q -r requirements.txt pytest tensorboard" in ci
    assert "python3 -m pytest -q" in README and "python3 -m pytest -q" in ci


def test_docs_pages_are_linked_from_readme():
    for page in (ROOT / "docs").glob("*.md"):
        assert f"(docs/{page.name})" in README, f"README does not link docs/{page.name}"


def test_readme_is_short_and_every_file_points_to_it():
    assert len(README.splitlines()) <= 400                    # the front door; details live in docs/*.md
    for path in ROOT.glob("*.py"):
        if not path.name.startswith(("test_", "conftest")):
            doc = ast.get_docstring(ast.parse(path.read_text()))
            assert doc and "README" in doc, f"{path.name}'s docstring does not point to README"


def test_gpu_check_script_commands_parse():
    """.ci/gpu_check is run only on a lent GPU: its commands must still parse here, so it cannot rot."""
    lines = (ROOT / ".ci" / "gpu_check").read_text().splitlines()
    found = 0
    for line in lines:
        words = shlex.split(line, comments=True)
        if "python3" in words and words[words.index("python3") + 1].endswith(".py"):
            i = words.index("python3") + 1
            parser = {"bench.py": bench.get_args_parser, "train.py": recipes.get_args_parser}[words[i]]()
            parser.parse_args(words[i + 1:])
            found += 1
    assert found == 6
