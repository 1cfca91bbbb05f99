"""The README's layout section lists every module of the packages, and nothing that is gone."""

import re

from tests.conftest import ROOT


def _layout_entries():
    text = (ROOT / "README.md").read_text()
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    entries, stack = set(), []
    for line in block.splitlines():
        m = re.match(r"( *)(\S+)", line)
        if not m:
            continue
        depth, name = len(m.group(1)) // 2, m.group(2)
        stack = stack[:depth] + [name.rstrip("/")]
        if not name.endswith("/"):
            entries.add("/".join(stack))
    return entries


def test_every_module_is_listed_and_every_listed_module_exists():
    listed = _layout_entries()
    modules = {str(p.relative_to(ROOT)) for pkg in ("model", "sharding", "trainer", "launch")
               for p in (ROOT / pkg).rglob("*") if p.is_file() and p.suffix in (".py", ".sh", ".sbatch")
               and p.name != "__init__.py" and "__pycache__" not in p.parts}
    assert modules - listed == set(), "modules missing from the README's layout section"
    assert {e for e in listed if e.split("/")[0] in ("model", "sharding", "trainer", "launch")} - modules == set(), \
        "the README's layout section lists files that do not exist"
