"""The layout README's "Files" promises: one sitting per file, the method free of machinery, imports that point
one way, and a student's path through one training step short (README "Reading guide")."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROGRAMS = {"train", "eval_linear", "bench", "supervised", "show_masks"}    # the files with a __main__
METHOD = ("train.py", "adios.py", "encoders.py", "losses.py", "masker.py")  # the student's path runs here
REPLAY = ("as_released", "deferred_statistics", "apply_statistics", "released_order")
LIMITS = {"adios.py": 400, "encoders.py": 200, "train.py": 300}


def sources(folder=ROOT):
    return sorted(f for f in os.listdir(folder) if f.endswith(".py"))


def parse(name):
    return ast.parse(open(os.path.join(ROOT, name)).read())


def test_every_file_within_one_sitting():
    files = [os.path.join(ROOT, f) for f in sources()] + [os.path.join(ROOT, "tests", f) for f in sources(
        os.path.join(ROOT, "tests"))]
    long = {os.path.relpath(p, ROOT): n for p in files
            if (n := len(open(p).read().splitlines())) > LIMITS.get(os.path.basename(p), 450)}
    assert not long, long


def test_the_method_files_hold_no_machinery():
    for name in ("adios.py", "encoders.py"):
        text = open(os.path.join(ROOT, name)).read()
        found = [w for w in ("deferred_statistics", "apply_statistics", "released_order", "torch.distributed",
                             "nn.parallel") if w in text]
        assert not found, (name, found)


def imports():
    ours = {f[:-3] for f in sources()}
    graph = {}
    for f in sources():
        names = set()
        for node in ast.walk(parse(f)):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module.split(".")[0])
        graph[f[:-3]] = names & ours
    return graph


def test_imports_point_one_way():
    graph = imports()

    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for dep in graph[todo.pop()]:
                if dep not in seen:
                    seen.add(dep)
                    todo.append(dep)
        return seen

    assert not [m for m in graph if m in reach(m)]                    # no circle
    # No library imports a program; bench.py and its --world part time train.py's own step (the exception).
    libraries = {m for m in graph if m not in PROGRAMS and not m.startswith("test_") and m != "conftest"}
    wrong = {m: graph[m] & PROGRAMS for m in libraries if graph[m] & PROGRAMS and m != "bench_world"}
    assert not wrong and graph["bench_world"] & PROGRAMS == {"train"}
    for m in PROGRAMS:
        assert graph[m] & PROGRAMS <= ({"train"} if m == "bench" else set()), m
        assert "__main__" in open(os.path.join(ROOT, m + ".py")).read()


def test_the_only_test_at_the_top_is_test_adios():
    assert [f for f in sources() if f.startswith("test_")] == ["test_adios.py"]


def student_path():
    """{(file, function): its lines} reached by calls from train.py:adios_step in the method files; batchnorm.py
    counts only through the lines that call its doors. A call of a module held in a variable (f(x), net(x),
    masker(x)) reaches InferenceModel.forward and Masker.forward."""
    defs = {}
    for f in METHOD:
        for node in ast.walk(parse(f)):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                defs.setdefault(node.name, []).append((f, node))
    forwards = [(f, m) for cls in ("InferenceModel", "Masker") for f, n in defs[cls] for m in n.body
                if isinstance(m, ast.FunctionDef) and m.name == "forward"]
    seen, todo = {}, [d for d in defs["adios_step"] if d[0] == "train.py"]
    while todo:
        f, node = todo.pop()
        if (f, node.name, node.lineno) in seen:
            continue
        seen[(f, node.name, node.lineno)] = node
        for call in (c for c in ast.walk(node) if isinstance(c, ast.Call)):
            fn = call.func
            name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", None)
            if isinstance(fn, ast.Name) and name in ("f", "net", "M", "masker", "module"):
                todo += forwards
            todo += [d for d in defs.get(name, []) if isinstance(d[1], ast.FunctionDef) and d[0] != "train.py"]
    return seen


def test_the_students_path_is_short_and_nearly_free_of_batchnorm_replay():
    path = student_path()
    lines = {key: node.end_lineno - node.lineno + 1 for key, node in path.items()}
    text = {f: open(os.path.join(ROOT, f)).read().splitlines() for f in METHOD}
    replay = sum(any(word in line for word in REPLAY) for (f, _, _), node in path.items()
                 for line in text[f][node.lineno - 1:node.end_lineno])
    names = {name for _, name, _ in path}
    assert {"adios_step", "encoder_loss", "masker_loss", "sparsity_penalty", "simclr_loss", "occlude"} <= names
    assert sum(lines.values()) <= 360, sum(lines.values())
    assert replay <= 5, replay
