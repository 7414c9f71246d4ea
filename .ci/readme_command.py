"""Print command N (1-based) of the first code block under README's '## Quickstart'.

CI runs the README's test command through this, so the two can never drift apart.
"""

import re
import sys
from pathlib import Path


def quickstart_commands(readme: str) -> list[str]:
    """The non-comment lines of the first fenced code block after '## Quickstart'."""
    section = readme.split("## Quickstart", 1)[1]
    block = re.search(r"```[a-z]*\n(.*?)```", section, re.S).group(1)
    return [line.strip() for line in block.splitlines() if line.strip() and not line.strip().startswith("#")]


if __name__ == "__main__":
    text = Path(__file__).resolve().parent.parent.joinpath("README.md").read_text()
    print(quickstart_commands(text)[int(sys.argv[1]) - 1])
