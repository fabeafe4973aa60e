"""What pip installs: a base with torch and numpy, one extra per GPU backend, a license, and only
the packages a user runs (no benchmarks, tests, results or notes)."""

import glob
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
tomllib = pytest.importorskip("tomllib")  # Python >= 3.11


def project():
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]


def closure(extra: str, extras: dict) -> set:
    """Every requirement name an extra pulls, following fa3py[...] self-references."""
    names = set()
    for req in extras[extra]:
        name = re.match(r"[A-Za-z0-9_.-]+", req).group(0)
        if name == "fa3py":
            for sub in re.search(r"\[(.*?)\]", req).group(1).split(","):
                names |= closure(sub.strip(), extras)
        else:
            names.add(name)
    return names


def test_base_install_has_no_gpu_wheels():
    base = {re.match(r"[A-Za-z0-9_.-]+", r).group(0) for r in project()["dependencies"]}
    assert base == {"torch", "numpy"}


def test_extras_match_the_backends():
    extras = project()["optional-dependencies"]
    assert closure("triton", extras) == {"triton"}
    assert {"nvidia-cutlass-dsl", "apache-tvm-ffi", "triton"} <= closure("hopper", extras)
    assert closure("all", extras) == closure("hopper", extras) | closure("triton", extras)
    # The README's commands set everything up: CI compiles the cute kernels and runs Triton's
    # interpreter; the benchmark compares every backend.
    assert closure("all", extras) | {"pytest"} <= closure("test", extras)
    assert closure("all", extras) | {"matplotlib"} <= closure("bench", extras)


def test_dispatch_names_each_extra():
    from fa3py import dispatch

    extras = project()["optional-dependencies"]
    assert set(dispatch._EXTRAS.values()) <= set(extras)


def test_license_is_an_spdx_expression_with_its_file():
    p = project()
    assert p["license"] == "BSD-3-Clause" and p["license-files"] == ["LICENSE"]
    with open(os.path.join(REPO, "LICENSE")) as f:
        assert f.readline().strip() == "BSD 3-Clause License"


def test_readme_install_section_names_the_extras():
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    for extra in ("[hopper]", "[triton]", "[all]"):
        assert extra in readme
    assert 'pip install "torch==2.13.0" && pip install -e ".[test]" && python -m pytest -q -p no:cacheprovider' \
        in readme
    with open(os.path.join(REPO, ".ci", "run")) as f:
        ci = f.read().replace(" -q", "")
    assert 'pip install "torch==2.13.0" && pip install -e ".[test]" && python -m pytest -p no:cacheprovider' in ci


def test_wheel_ships_only_the_packages(tmp_path):
    import setuptools

    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip("building needs setuptools >= 77 (license expressions)")
    src = tmp_path / "src"  # a copy: an in-tree build would leave build/ and egg-info in the checkout
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__",
                                                             "bench_out", ".device", ".peers"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "deprecat" not in done.stderr.lower(), done.stderr
    (wheel,) = glob.glob(str(tmp_path / "dist" / "*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"fa3py", "cute_kernels", "triton_fallback", "fa3py-0.1.0.dist-info"}
    assert "fa3py-0.1.0.dist-info/licenses/LICENSE" in names
    assert [n for n in names if not n.endswith(".py") and ".dist-info/" not in n] == []  # no notes, no results


def test_kernel_packages_do_not_import_benchmarks():
    """The measuring tools live in benchmarks/ (not shipped); the shipped packages never need it."""
    for package in ("fa3py", "cute_kernels", "triton_fallback"):
        for path in glob.glob(os.path.join(REPO, package, "**", "*.py"), recursive=True):
            with open(path) as f:
                text = f.read()
            assert not re.search(r"^\s*(from|import) benchmarks\b", text, re.M), path


def test_docs_are_not_a_diary_and_stay_in_the_repository():
    """README, notes and result READMEs say what is, not who measured what in which session, and
    send readers to no path outside the repository."""
    docs = ["README.md", "benchmarks/README.md", "cute_kernels/NOTES.md", "triton_fallback/NOTES.md",
            *glob.glob("benchmarks/results/**/*.md", root_dir=REPO, recursive=True)]
    for doc in docs:
        with open(os.path.join(REPO, doc)) as f:
            text = f.read()
        assert not re.search(r"\bsession \d|\bnext (time|session)\b|\.\./shared", text, re.I), doc
    for notes in ("cute_kernels/NOTES.md", "triton_fallback/NOTES.md"):
        assert os.path.getsize(os.path.join(REPO, notes)) < 12_000, notes
