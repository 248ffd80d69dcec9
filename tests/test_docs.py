"""The repository documents itself: the README is short and leads to every docs/ page, links
lead somewhere, and no file refers to a file outside the repository or to a machine path."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"

# Built from parts so this file does not match itself.
OUTSIDE = re.compile(
    "|".join(
        [
            re.escape("../" + "shared"),
            r"\b(?:CONTRACT|NOTES|STYLE)" + re.escape(".md"),
            r"(?<![\w.$-])/" + "work/",
            r"(?<![\w.$-])/" + "root/",
            r"(?<![\w.$-])/" + r"home/\w",
        ]
    )
)


SKIPPED_DIRS = {".git", ".venv", "node_modules", "__pycache__", ".mypy_cache", ".ruff_cache", "test-artefacts"}


def repository_files() -> list[str]:
    """The repository's files (git's view when there is one, else a walk of the tree)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True,
    )
    if listed.returncode == 0:
        return [name for name in listed.stdout.decode().split("\0") if name]
    return [
        str(path.relative_to(ROOT))
        for path in ROOT.rglob("*")
        if path.is_file() and not SKIPPED_DIRS & set(path.relative_to(ROOT).parts)
    ]


def tracked_text_files() -> list[Path]:
    files = []
    for name in repository_files():
        path = ROOT / name
        if not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" not in data[:8192]:
            files.append(path)
    return files


def outside_references(text: str) -> list[str]:
    return [m[0] for m in OUTSIDE.finditer(text)]


def test_no_file_refers_to_a_file_outside_the_repository() -> None:
    files = tracked_text_files()
    assert any(f.name == "requirements.lock" for f in files) and any(f.suffix == ".py" for f in files)
    found = {}
    for path in files:
        hits = outside_references(path.read_text(errors="replace"))
        if hits:
            found[str(path.relative_to(ROOT))] = sorted(set(hits))
    assert not found, f"references to files outside the repository or to machine paths: {found}"


@pytest.mark.parametrize(
    "text",
    [
        "the specification is ../" "shared/CONTRACT" ".md",
        "as NOTES" ".md says",
        "# at the versions in (/" "work/venv)",
        "cache in /" "root/.cache",
        "see /" "home/someone/notes",
    ],
)
def test_the_outside_reference_check_can_fail(text: str) -> None:
    assert outside_references(text)


def test_paths_of_the_image_and_the_pod_are_not_outside_references() -> None:
    assert not outside_references("/var/run/secrets/kubernetes.io/serviceaccount /usr/bin/chromium $HOME/.cache")


# --- README and docs/ --------------------------------------------------------------------------

LINK = re.compile(r"\]\(([^)\s]+)\)")


def links(path: Path) -> list[str]:
    return [m[1] for m in LINK.finditer(path.read_text())]


def test_readme_is_short_and_starts_with_the_two_commands() -> None:
    text = README.read_text()
    assert len(text.splitlines()) < 250
    headings = re.findall(r"^## (.+)$", text, re.M)
    assert headings[0] == "Two commands", headings
    section = text.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    assert blocks[-1].strip() == "bash .ci/run", "the test command is exactly what CI runs"
    assert "Deploy with kustomize" in headings and "Deploy with Helm" in headings
    helm = text.split("## Deploy with Helm", 1)[1].split("\n## ", 1)[0]
    assert "helm upgrade --install kubenurse charts/kubenurse" in helm and "(docs/helm.md)" in helm


def test_every_docs_page_is_reachable_from_the_readme() -> None:
    linked = {(ROOT / link.split("#")[0]).resolve() for link in links(README) if not link.startswith("http")}
    pages = set(DOCS.glob("*.md"))
    assert pages, "no docs/ pages"
    unreached = sorted(p.name for p in pages if p.resolve() not in linked)
    assert not unreached, f"docs pages the README does not link to: {unreached}"


#: docs page -> what it documents (both arrive in the same change).
COMPANION = {"helm.md": "charts/kubenurse", "real-components.md": ".ci/components"}


def _heading_anchors(path: Path) -> set[str]:
    anchors = set()
    for heading in re.findall(r"^#+ (.+)$", path.read_text(), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


def test_every_relative_link_leads_somewhere() -> None:
    broken = []
    for page in [README, *DOCS.glob("*.md")]:
        for link in links(page):
            if re.match(r"[a-z]+:", link):
                continue
            target, _, anchor = link.partition("#")
            path = (page.parent / target).resolve() if target else page
            # Pages written together with what they describe: required once that exists.
            if path.name in COMPANION and not (ROOT / COMPANION[path.name]).exists():
                continue
            if not path.exists():
                broken.append(f"{page.name}: {link}")
            elif anchor and path.suffix == ".md" and anchor not in _heading_anchors(path):
                broken.append(f"{page.name}: {link} (no such heading)")
    assert not broken, broken


def test_docs_say_where_the_daemonset_runs_as_its_tolerations_do() -> None:
    """'Every node' would be false: the DaemonSet tolerates only the control-plane taints."""
    daemonset = yaml.safe_load((ROOT / "k8s" / "base" / "daemonset.yaml").read_text())
    tolerations = daemonset["spec"]["template"]["spec"]["tolerations"]
    tolerates_everything = any("key" not in t and t.get("operator") == "Exists" for t in tolerations)
    keys = {t.get("key") for t in tolerations}
    for page in [README, DOCS / "deploy.md"]:
        text = " ".join(page.read_text().split())
        if not tolerates_everything:
            assert not re.search(r"on every node(?! with| untainted)", text), f"{page.name} claims every node"
            assert "control-plane" in text and "untainted" in text, page.name
    assert "node-role.kubernetes.io/control-plane" in keys
