"""One catalogue of paths: dvc.yaml's outs, metrics, plots and deps are the ones loraops.paths names."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import REPO
from loraops.core import paths


def _names(entries: list) -> list[str]:
    return [next(iter(e)) if isinstance(e, dict) else e for e in entries]


def test_dvc_yaml_stage_outputs_are_the_catalogue():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    assert tuple(dvc) == paths.STAGES
    for stage, kinds in paths.STAGE_OUTPUTS.items():
        for kind in ("outs", "metrics", "plots"):
            assert _names(dvc[stage].get(kind, [])) == [str(p) for p in kinds[kind]], f"{stage}.{kind}"
        for name in _names(dvc[stage].get("metrics", [])) + _names(dvc[stage].get("plots", [])):
            entry = next(e for e in dvc[stage].get("metrics", []) + dvc[stage].get("plots", [])
                         if isinstance(e, dict) and name in e)
            assert entry[name] == {"cache": False}, f"{name}: git keeps metrics and plots (dvc exp show reads them)"


def test_dvc_yaml_data_deps_are_the_catalogue():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    for stage, inputs in paths.STAGE_INPUTS.items():
        data_deps = [d for d in dvc[stage]["deps"] if not d.startswith(("src/", "${"))]
        data_deps = [d for d in data_deps if not d.endswith(".jsonl") or d.startswith("data/")]
        assert data_deps == [str(p) for p in inputs], stage


def test_git_keeps_the_metrics_and_plots_dvc_does_not_cache():
    ignored = (REPO / ".gitignore").read_text(encoding="utf-8")
    import subprocess

    for path in paths.RUN_OUTPUTS:
        out = subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=REPO)
        assert out.returncode == 1, f"{path} is git-ignored, so no revision holds it for dvc exp show ({ignored!r})"


def test_no_module_spells_a_catalogued_path():
    """Stage, tracking, lineage and reproduce code take their paths from loraops.core.paths, not string literals."""
    spelled = {str(p) for p in [*paths.RUN_OUTPUTS, paths.ADAPTER_DIR, paths.BASE_DIR, paths.CHECKPOINT_DIR,
                                paths.EVAL_TABLE, paths.EVAL_REPORT, paths.PLOTS_DIR, paths.PREPARED_DIR]}
    package = Path(paths.__file__).parents[1]
    for source in [*package.rglob("*.py"), *(REPO / "flows").glob("*.py")]:
        if source.name == "paths.py":
            continue
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in spelled:
                raise AssertionError(f"{source.relative_to(REPO)}:{node.lineno} spells {node.value!r}; use loraops.paths")


def _imports(source: Path) -> set[str]:
    """The loraops modules a file imports, at module level or inside functions (a lazy import is a dependency too)."""
    found = set()
    for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("loraops."):
            inner = node.module.split(".", 1)[1]
            found |= {inner} | {f"{inner}.{a.name}" for a in node.names}  # from loraops.judge import metrics
        elif isinstance(node, ast.ImportFrom) and node.module == "loraops":
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".", 1)[1] for a in node.names if a.name.startswith("loraops.")}
    return found


def test_no_import_cycle_and_nothing_imports_upward():
    """Module-level imports between loraops modules form no cycle; library code never imports the CLI or flows."""
    package = Path(paths.__file__).parents[1]
    graph: dict[str, set[str]] = {}
    modules = {p.relative_to(package).with_suffix("").as_posix().replace("/", ".").removesuffix(".__init__"): p
               for p in package.rglob("*.py")}
    modules |= {f"flows.{p.stem}".removesuffix(".__init__"): p for p in (REPO / "flows").glob("*.py")}
    for name, source in modules.items():
        graph[name] = {m for m in _imports(source) if m in modules and m != name}
        if not name.startswith(("cli", "flows")):
            upward = {m for m in graph[name] if m.startswith(("cli", "flows"))}
            assert not upward, f"{name} imports {upward}: library code must not import the CLI or the flows"

    def visit(node: str, stack: list[str]) -> None:
        if node in stack:
            raise AssertionError("import cycle: " + " → ".join(stack[stack.index(node):] + [node]))
        for nxt in graph.get(node, ()):
            visit(nxt, stack + [node])

    for name in graph:
        visit(name, [])


LAYERS = {"core": 0, "judge": 1, "modeling": 1, "retrieval": 1, "stages": 2, "registry": 3, "review": 4, "serving": 4,
          "orchestration": 4, "cli": 5, "flows": 5}
"""Each package's layer (docs/where-to-change.md draws them): a module imports only from its own layer or lower ones;
the CLI and the flows sit on top. Siblings at one level (judge · modeling · retrieval; review · serving ·
orchestration) may import each other."""


def test_every_module_is_in_a_layered_package_and_none_imports_a_layer_above_it():
    package = Path(paths.__file__).parents[1]
    upward = []
    for source in package.rglob("*.py"):
        parts = source.relative_to(package).parts
        if parts == ("__init__.py",):
            assert not _imports(source), "loraops/__init__.py imports no loraops module (every stage runs it)"
            continue
        assert len(parts) > 1 and parts[0] in LAYERS, (
            f"src/loraops/{'/'.join(parts)} is in no layer: put it in one of the packages {sorted(LAYERS)} "
            "(tests/test_paths.py LAYERS)")
        layer = parts[0]
        for imported in _imports(source):
            target = imported.split(".")[0]
            if target in LAYERS and LAYERS[target] > LAYERS[layer]:
                upward.append(f"{'/'.join(parts)} ({layer}, level {LAYERS[layer]}) → loraops.{imported} "
                              f"({target}, level {LAYERS[target]})")
    assert not upward, "imports from a layer above: " + "; ".join(sorted(set(upward)))


def test_no_module_uses_a_flat_name_from_before_the_layers():
    """``loraops.MOVED`` keeps old registered models loading; the code itself names the layered modules."""
    import loraops

    package = Path(paths.__file__).parents[1]
    old = []
    for source in [*package.rglob("*.py"), *(REPO / "flows").glob("*.py"), *(REPO / "tests").glob("*.py")]:
        for imported in _imports(source):
            if imported.split(".")[0] in loraops.MOVED:
                old.append(f"{source.relative_to(REPO)} → loraops.{imported}")
    assert not old, "; ".join(old)


def test_a_version_registered_before_the_layers_still_imports_its_model_class():
    """An old version's python_model file runs ``from loraops.serve import LoraQAModel``."""
    import importlib

    from loraops.serving.pyfunc import LoraQAModel

    assert importlib.import_module("loraops.serve").LoraQAModel is LoraQAModel
    assert importlib.import_module("loraops.evaluate").run is importlib.import_module("loraops.stages.evaluate").run


def test_the_shipped_dvc_remote_holds_everything_dvc_lock_and_the_dvc_files_name():
    """A fresh clone's plain `dvc pull` exits 0: the repository's remote holds the data and every cached output of the
    committed dvc.lock (after `make run` changes dvc.lock: `dvc push` and commit dvc-remote/)."""
    import json

    import yaml

    from loraops.core.paths import STAGE_OUTPUTS

    remote = REPO / "dvc-remote" / "files" / "md5"

    def stored(md5: str) -> bool:
        return (remote / md5[:2] / md5[2:]).is_file()

    import subprocess

    def committed(path: str) -> str:  # what a clone gets: `make run` rewrites dvc.lock in the working tree (float noise)
        return subprocess.run(["git", "show", f"HEAD:{path}"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout

    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    wanted = []
    for dvcfile in (name for name in tracked if name.endswith(".dvc")):
        wanted += [(dvcfile, out["md5"]) for out in yaml.safe_load(committed(dvcfile))["outs"]]
    lock = yaml.safe_load(committed("dvc.lock"))
    for stage, entry in lock["stages"].items():
        cached = {str(p) for p in STAGE_OUTPUTS[stage]["outs"]}
        wanted += [(out["path"], out["md5"]) for out in entry.get("outs", []) if out["path"] in cached]
    missing = [(path, md5) for path, md5 in wanted if not stored(md5)]
    for path, md5 in wanted:
        if md5.endswith(".dir") and stored(md5):
            listing = json.loads((remote / md5[:2] / md5[2:]).read_text())
            missing += [(f"{path}/{item['relpath']}", item["md5"]) for item in listing if not stored(item["md5"])]
    assert not missing, f"not in dvc-remote/ (run `dvc push` and commit dvc-remote/): {missing[:5]}"


@pytest.mark.slow
def test_a_stage_log_keeps_dvcs_report_and_drops_its_terminal_advice(tmp_path):
    """`dvc repro`'s lines reach the run's log, except the advice for a person at a terminal (git add, dvc push)."""
    import subprocess
    import sys

    from loraops.orchestration.workspace import run_stage

    dvc = str(Path(sys.executable).parent / "dvc")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([dvc, "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "dvc.yaml").write_text("stages:\n  hello:\n    cmd: echo 안녕 > out.txt\n    outs: [out.txt]\n",
                                       encoding="utf-8")
    raw = subprocess.run([dvc, "repro", "hello"], cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert "git add" in raw and "dvc push" in raw  # what DVC says at a terminal
    (tmp_path / "out.txt").unlink()
    lines: list[str] = []
    assert run_stage("hello", tmp_path, lines.append) is True
    text = "\n".join(lines)
    assert "Running stage 'hello'" in text and "> echo 안녕 > out.txt" in text, text
    assert "git add" not in text and "dvc push" not in text and "autostage" not in text, text
    assert (tmp_path / "out.txt").read_text(encoding="utf-8").strip() == "안녕"


def _dvc_project(folder: Path, stages: str) -> Path:
    import subprocess
    import sys

    dvc = str(Path(sys.executable).parent / "dvc")
    subprocess.run(["git", "init", "-q"], cwd=folder, check=True)
    subprocess.run([dvc, "init", "-q"], cwd=folder, check=True)
    (folder / "dvc.yaml").write_text(stages, encoding="utf-8")
    return folder


@pytest.mark.slow
def test_a_loraops_stage_runs_in_process_records_its_lock_and_fails_naming_its_error(tmp_path):
    """In a flow, DVC runs in-process and a `loraops …` stage command runs through the CLI in the same process: the
    same lock file and skip decisions as `dvc repro`; other commands still run in a shell; a failing command fails
    the stage with its error line and records nothing."""
    import os

    import yaml

    from loraops.core.errors import StageError
    from loraops.orchestration.workspace import run_stage

    root = _dvc_project(tmp_path, "stages:\n  greet:\n    cmd: loraops greet --to 세계\n    outs: [hello.txt]\n"
                                  "  shout:\n    cmd: tr a-z A-Z < hello.txt > loud.txt\n    deps: [hello.txt]\n"
                                  "    outs: [loud.txt]\n")
    calls = []

    def invoke(argv):
        calls.append((argv, Path.cwd(), os.environ.get("DVC_STAGE")))
        Path("hello.txt").write_text(f"hello {argv[-1]}\n", encoding="utf-8")
        print(f"greeted {argv[-1]}")
        return 0

    lines: list[str] = []
    assert run_stage("greet", root, lines.append, in_process=invoke) is True  # in order, as the flows run them
    assert run_stage("shout", root, lines.append, in_process=invoke) is True
    assert calls == [(["greet", "--to", "세계"], root, "greet")], calls
    text = "\n".join(lines)
    assert "Running stage 'greet'" in text and "greeted 세계" in text and "Running stage 'shout'" in text, text
    assert (root / "loud.txt").read_text(encoding="utf-8") == "HELLO 세계\n"  # the shell command ran too
    lock = yaml.safe_load((root / "dvc.lock").read_text(encoding="utf-8"))
    assert lock["stages"]["greet"]["outs"][0]["path"] == "hello.txt" and lock["stages"]["greet"]["outs"][0]["md5"]
    assert run_stage("greet", root, lines.append, in_process=invoke) is False and len(calls) == 1  # up to date
    assert run_stage("shout", root, lines.append, in_process=invoke) is False

    def failing(argv):
        Path("hello.txt").write_text("half\n", encoding="utf-8")
        print("error: data/raw/qa.csv row 3: the answer is empty", file=sys.stderr)
        return 2

    (root / "dvc.yaml").write_text("stages:\n  greet:\n    cmd: loraops greet --to 모두\n    outs: [hello.txt]\n",
                                   encoding="utf-8")
    before = (root / "dvc.lock").read_text(encoding="utf-8")
    with pytest.raises(StageError, match="stage greet failed: error: data/raw/qa.csv row 3: the answer is empty"):
        run_stage("greet", root, lines.append, in_process=failing)
    assert (root / "dvc.lock").read_text(encoding="utf-8") == before


def test_an_in_process_stage_writes_the_lock_file_byte_for_byte_as_dvc_does(tmp_path):
    """The in-process runner reads dvc.lock with YAML's C parser (5x faster than DVC's comment-keeping one): on the
    project's own lock, changed as DVC changes it after a stage, the file written is DVC's, byte for byte; any other
    file (dvc.yaml with a comment) still goes through DVC's reader."""
    from dvc.utils.serialize import modify_yaml

    from loraops.orchestration.workspace import _lock_read_fast

    written = {}
    for name, modify in (("dvc", modify_yaml), ("fast", _lock_read_fast(modify_yaml))):
        lock = tmp_path / name / "dvc.lock"
        lock.parent.mkdir()
        lock.write_bytes((REPO / "dvc.lock").read_bytes())
        with modify(lock) as data:
            data["stages"]["train"]["outs"][0]["md5"] = "0" * 32
            data["stages"]["greet"] = {"cmd": "loraops greet --to 세계", "outs": [{"path": "hello.txt", "size": 6}]}
        written[name] = lock.read_bytes()
        pipeline = tmp_path / name / "dvc.yaml"
        pipeline.write_text("stages:  # the pipeline\n  greet:\n    cmd: loraops greet\n", encoding="utf-8")
        with modify(pipeline) as data:
            data["stages"]["greet"]["cmd"] = "loraops greet --loud"
        assert pipeline.read_text(encoding="utf-8").startswith("stages:  # the pipeline\n"), name
    assert written["fast"] == written["dvc"]
    assert b"0" * 32 in written["fast"] and "세계".encode() in written["fast"]


def test_a_run_asks_dvc_once_whether_anything_changed(tmp_path, monkeypatch):
    """`loraops run` asks before Prefect starts and its flow asks again: a "changed" answer for the same project,
    params and dvc.lock is kept for the second question; other params or another lock are asked anew; an
    "unchanged" answer is never kept."""
    from loraops.core.config import load_params
    from loraops.orchestration import workspace

    asked: list[Path] = []
    answers = iter([None, None, "unchanged: v1", "unchanged: v1"])
    monkeypatch.setattr(workspace, "_FOUND_CHANGED", set())
    monkeypatch.setattr(workspace, "_unchanged", lambda root, params, first: asked.append(root) or next(answers))
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\n", encoding="utf-8")
    params = load_params(REPO / "params.yaml")
    assert workspace.unchanged(tmp_path, params) is None and workspace.unchanged(tmp_path, params) is None
    assert len(asked) == 1
    assert workspace.unchanged(tmp_path, load_params(REPO / "params.yaml", ["train.max_steps=70"])) is None
    assert len(asked) == 2
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n", encoding="utf-8")
    assert [workspace.unchanged(tmp_path, params) for _ in range(2)] == ["unchanged: v1"] * 2 and len(asked) == 4


def test_the_flow_asks_mlflow_before_dvc_and_skips_dvc_for_an_adapter_never_registered(tmp_path, monkeypatch):
    """The flow has MLflow open: an adapter no version was registered from cannot be unchanged, whatever DVC would
    say; one that was registered still needs every stage up to date. `loraops run`'s own check asks DVC first."""
    from loraops.core.config import load_params
    from loraops.core.results import TrainFigures
    from loraops.orchestration import workspace

    asked: list[str] = []
    registered: list[object] = []
    monkeypatch.setattr(TrainFigures, "read", classmethod(lambda cls, root: type("F", (), {"adapter_sha256": "ab"})))
    monkeypatch.setattr(workspace, "_stages_changed", lambda root: asked.append("dvc") or True)
    monkeypatch.setattr(workspace, "_registered_as", lambda root, params, sha: asked.append("mlflow") or registered)
    params = load_params(REPO / "params.yaml")
    assert workspace._unchanged(tmp_path, params, registry_first=True) is None and asked == ["mlflow"]
    registered.append(object())
    asked.clear()
    assert workspace._unchanged(tmp_path, params, registry_first=True) is None and asked == ["mlflow", "dvc"]
    asked.clear()
    assert workspace._unchanged(tmp_path, params, registry_first=False) is None and asked == ["dvc"]


def test_a_checkout_of_other_code_runs_its_stages_in_their_own_process(tmp_path):
    """A worktree of another commit runs its own code, so its stages cannot run in this process."""
    import shutil

    import loraops
    from loraops.orchestration.workspace import runs_this_code

    assert runs_this_code(tmp_path)  # no checkout: the installed package runs either way
    shutil.copytree(Path(loraops.__file__).parent, tmp_path / "src/loraops",
                    ignore=shutil.ignore_patterns("__pycache__"))
    assert runs_this_code(tmp_path)
    (tmp_path / "src/loraops/stages/train.py").write_text("# another commit\n", encoding="utf-8")
    assert not runs_this_code(tmp_path)


def test_the_hook_publishes_the_data_paths_a_commit_changed_and_stays_quiet_otherwise(tmp_path):
    """`loraops data publish --changed-in REV` (what the post-commit hook runs) takes the .dvc files that commit
    changed, names with spaces and Hangul whole; a commit without one publishes nothing; the hook without a Prefect
    server says what to run and never fails the commit."""
    import os

    from loraops.orchestration.publish import HOOK_MARK, changed_in, install_hook

    def git(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=tmp_path, capture_output=True, text=True, env=env, check=True)

    git("init", "-q", "-b", "main")
    git("config", "user.email", "ci@loraops.invalid")
    git("config", "user.name", "ci")
    (tmp_path / "data").mkdir()
    (tmp_path / "data/고객 문의.csv.dvc").write_text("outs:\n- md5: 1\n", encoding="utf-8")
    (tmp_path / "notes.txt").write_text("x\n", encoding="utf-8")
    git("add", ".")
    git("commit", "-qm", "first")
    assert changed_in(tmp_path, "HEAD") == ["data/고객 문의.csv"]
    hook = install_hook(tmp_path)
    assert HOOK_MARK in hook.read_text(encoding="utf-8") and os.access(hook, os.X_OK)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    (tmp_path / "notes.txt").write_text("y\n", encoding="utf-8")
    quiet = git("commit", "-qam", "not data", env=env)
    assert changed_in(tmp_path, "HEAD") == [] and "loraops" not in quiet.stderr
    (tmp_path / "data/고객 문의.csv.dvc").write_text("outs:\n- md5: 2\n", encoding="utf-8")
    told = git("commit", "-qam", "data", env=env)
    assert "set PREFECT_API_URL and run: loraops data publish --changed-in HEAD" in told.stderr
    (hook.parent / "post-commit").write_text("#!/bin/sh\necho theirs\n", encoding="utf-8")
    with pytest.raises(Exception, match="not loraops'"):
        install_hook(tmp_path)
