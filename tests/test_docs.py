"""The documents a newcomer reads point where they say: every citation of docs/DESIGN.md names a section it has, and
bench/README.md lists every script in bench/."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_design_citation_resolves():
    design = (ROOT / "docs" / "DESIGN.md").read_text()
    sections = {int(n) for n in re.findall(r"^## (\d+)\. ", design, re.MULTILINE)}
    files = [*ROOT.glob("lgd_ray/*.py"), *(p for p in ROOT.glob("tests/*.py") if p.name != "test_docs.py"), *ROOT.glob("bench/*.py"), *ROOT.glob("*.md"),
             *ROOT.glob("docs/*.md"), *ROOT.glob("configs/*.yaml")]
    cited = []
    for f in files:
        text = f.read_text()
        assert not re.search(r"(?<!docs/)(?<!shared/)DESIGN\.md", text), f"{f}: a citation without docs/"
        for first, last in re.findall(r"docs/DESIGN\.md sections? (\d+)(?:-(\d+))?", text):
            cited += [(f.name, n) for n in range(int(first), int(last or first) + 1)]
    assert cited and all(n in sections for _, n in cited), [c for c in cited if c[1] not in sections]


def test_bench_readme_lists_every_script():
    listed = (ROOT / "bench" / "README.md").read_text()
    scripts = sorted(p.name for p in (ROOT / "bench").glob("*.py"))
    assert scripts and [s for s in scripts if f"`{s}`" not in listed] == []
    shells = sorted(p.name for p in (ROOT / "docs").glob("*.sh"))
    assert [s for s in shells if f"`{s}`" not in listed] == []
