"""Copy committed benchmark tables into the README between their markers, so every README number
comes from a results file:

    <!-- results:NAME --> ... <!-- /results:NAME -->   <-  benchmarks/results/NAME/results.md (or NAME.md)

    python benchmarks/update_readme.py
"""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"<!-- results:(?P<name>[\w/-]+) -->\n.*?<!-- /results:(?P=name) -->", re.S)


def table_for(name: str) -> str:
    """benchmarks/results/NAME/results.md, or benchmarks/results/NAME.md (a second table of one benchmark)."""
    path = ROOT / "benchmarks" / "results" / name / "results.md"
    if not path.is_file() and (ROOT / "benchmarks" / "results" / f"{name}.md").is_file():
        path = ROOT / "benchmarks" / "results" / f"{name}.md"
    if not path.is_file():
        return f"Not run yet: `benchmarks/{name.split('/')[0]}.py` writes `benchmarks/results/{name}/results.md`."
    body = path.read_text().strip()
    body = re.sub(r"^# .*\n+", "", body)  # the README section has its own heading
    body = re.sub(r"^## ", "#### ", body, flags=re.M)  # nest sub-headings under the README's ### section
    # images are linked relative to the results file; the README sits at the root
    body = re.sub(r"!\[([^]]*)\]\((?!https?:|/)([^)]+)\)", rf"![\1]({path.parent.relative_to(ROOT)}/\2)", body)
    return f"{body}\n\n(from `{path.relative_to(ROOT)}`)"


def main() -> None:
    readme = ROOT / "README.md"
    text = MARKER.sub(lambda m: f"<!-- results:{m['name']} -->\n{table_for(m['name'])}\n<!-- /results:{m['name']} -->",
                      readme.read_text())
    readme.write_text(text)
    print("updated", readme)


if __name__ == "__main__":
    main()
