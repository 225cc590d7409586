"""Write deploy/.env.example from the README's settings table (one source for both):

    .venv/bin/python scripts/env_example.py

tests/test_deploy.py checks that the file names every setting the code reads."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = {"IVR_PUBLIC_URL": "https://ivr.example.com", "IVR_MAX_CALLS": "100", "IVR_LOG_FORMAT": "json"}


def plain(text: str) -> str:
    return re.sub(r"\[([^\]]+)\]\([^)]+\)", r"\1", text).replace("`", "")


def main() -> None:
    readme = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\| `([A-Z][A-Z0-9_]+)` \| (.*?) \| (.*?) \|$", readme, flags=re.M)
    lines = [
        "# Every setting of ivr-bridge, for deploy/compose.yaml (env_file) or a .env file beside",
        "# `ivr-bridge serve`. Unset ones take their defaults; the README's settings table says more.",
        "# IVR_DATABASE_URL and IVR_REDIS_URL are set by compose.yaml itself.",
        "POSTGRES_PASSWORD=change-me",
        "",
    ]
    for name, default, meaning in rows:
        first = plain(meaning).split(". ")[0].rstrip(".") + "."
        lines += ["# " + line for line in textwrap.wrap(first, 86)]
        lines.append(f"# default: {plain(default)}")
        lines.append(f"{name}={EXAMPLES[name]}" if name in EXAMPLES else f"#{name}=")
        lines.append("")
    (ROOT / "deploy" / ".env.example").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
