"""The documented defaults are the code's: every row of docs/serving.md's options table whose
default is a value (a number, or a word in backquotes) names the default of the setting its
environment variable sets."""

import re
from pathlib import Path

from server.config import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parent.parent


def _rows():
    text = (ROOT / "docs" / "serving.md").read_text(encoding="utf-8")
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[1].startswith(f"`{ENV_PREFIX}"):
            env = re.match(rf"`{ENV_PREFIX}([A-Z_]+)", cells[1]).group(1)
            yield env.lower(), cells[2]


def test_every_value_default_in_the_serving_docs_is_the_settings_default():
    fields = Settings.__dataclass_fields__
    checked = 0
    for field, shown in _rows():
        assert field in fields, f"docs/serving.md documents {ENV_PREFIX}{field.upper()}, which is no setting"
        default = fields[field].default
        if shown.startswith("`") and shown.endswith("`"):
            assert shown.strip("`") == str(default), f"{field}: documented {shown}, code {default}"
        elif re.fullmatch(r"-?[0-9.]+", shown):
            assert float(shown) == float(default), f"{field}: documented {shown}, code {default}"
        elif shown in ("on", "off"):
            assert (shown == "on") == bool(default), f"{field}: documented {shown}, code {default}"
        else:
            continue
        checked += 1
    assert checked >= 15
