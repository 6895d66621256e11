"""Dockerfile and .dockerignore, checked statically (no Docker engine needed)."""

from __future__ import annotations

import fnmatch
import json
import re

from tests.deploy.helpers import REPO

DOCKERFILE = REPO / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_multi_stage_pinned_base():
    ins = _instructions()
    args = {rest.split("=", 1)[0]: rest.split("=", 1)[1] for op, rest in ins if op == "ARG" and "=" in rest}
    froms = [rest for op, rest in ins if op == "FROM"]
    assert len(froms) >= 2, "multi-stage build expected"
    for base in froms:
        image = base.split()[0]
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        name, _, tag = image.rpartition(":")
        assert name and re.match(r"\d+\.\d+\.\d+", tag), f"base image {image} is not pinned to a full version"
    assert any(" AS " in f.upper() for f in froms)


def test_cpu_torch_by_default_cuda_by_build_arg():
    ins = _instructions()
    args = {rest.split("=", 1)[0]: rest.split("=", 1)[1] for op, rest in ins if op == "ARG" and "=" in rest}
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    runs = " ".join(rest for op, rest in ins if op == "RUN")
    assert '--index-url "${TORCH_INDEX_URL}"' in runs and "torch==${TORCH_VERSION}" in runs
    makefile_torch = re.search(r"TORCH_SPEC \?= torch==([\w.]+)", (REPO / "Makefile").read_text())
    assert makefile_torch and args["TORCH_VERSION"] == makefile_torch.group(1), "same torch as `make setup`"


def test_non_root_entrypoint_and_baked_model():
    ins = _instructions()
    final = ins[max(i for i, (op, _) in enumerate(ins) if op == "FROM") :]
    users = [rest for op, rest in final if op == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}, "the image must run as a non-root user"
    assert re.fullmatch(r"\d+(:\d+)?", users[-1]), "numeric USER lets runAsNonRoot verify it"
    entrypoint = [json.loads(rest) for op, rest in final if op == "ENTRYPOINT"]
    assert entrypoint == [["iotad"]]
    runs = " ".join(rest for op, rest in ins if op == "RUN")
    assert "DEFAULT_MODEL_DIR" in runs, "the build checks that the default model is installed"
    copies = " ".join(rest for op, rest in ins if op == "COPY")
    assert "models" in copies


def test_dockerignore_keeps_the_sources_and_model():
    lines = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()]
    rules = [ln for ln in lines if ln and not ln.startswith("#")]

    def included(path: str) -> bool:
        keep = True
        for rule in rules:
            negate = rule.startswith("!")
            pattern = rule.lstrip("!")
            if fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(path, pattern.replace("**/", "")):
                keep = negate
        return keep

    for path in ("pyproject.toml", "pipeline/cli.py", "connectors/influx.py", "models/default/model.json"):
        assert included(path), f"{path} must be in the build context"
    for path in (".venv/bin/python", ".git/config", ".env", "tests/conftest.py", "pipeline/__pycache__/x.pyc"):
        assert not included(path), f"{path} must not be in the build context"
