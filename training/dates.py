"""The built-in seq2seq task: normalise dates written many ways to ISO 8601.

    "the 3rd of March, 2021", "03/03/21", "Wed, Mar 3 2021", "3.3.2021" -> "2021-03-03"

Pairs are generated on the fly, so there is nothing to download. Conventions that keep every
source unambiguous: slashes are month/day/year (US), dots and dashes with a numeric month are
day.month.year (European), and years run 1950-2049 so two-digit years have one reading.
"""

from __future__ import annotations

import calendar
import datetime as dt
import random

FIRST = dt.date(1950, 1, 1).toordinal()
LAST = dt.date(2049, 12, 31).toordinal()
MONTHS = list(calendar.month_name)[1:]
MONTHS_ABBR = list(calendar.month_abbr)[1:]
DAYS = list(calendar.day_name)
DAYS_ABBR = list(calendar.day_abbr)


def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _forms(d: dt.date, rng: random.Random) -> list[str]:
    m = rng.choice((MONTHS, MONTHS_ABBR))[d.month - 1]
    wd = rng.choice((DAYS, DAYS_ABBR))[d.weekday()]
    y, yy, mo, day = d.year, f"{d.year % 100:02d}", d.month, d.day
    return [
        f"{m} {day}, {y}",
        f"{m} {day} {y}",
        f"{m} {ordinal(day)}, {y}",
        f"{wd}, {m} {day}, {y}",
        f"{day} {m} {y}",
        f"{ordinal(day)} {m} {y}",
        f"the {ordinal(day)} of {m}, {y}",
        f"{wd} {day} {m} {y}",
        f"{day}-{m[:3]}-{y}",
        f"{m} {day}, '{yy}",
        f"{mo:02d}/{day:02d}/{y}",
        f"{mo}/{day}/{y}",
        f"{mo:02d}/{day:02d}/{yy}",
        f"{mo}/{day}/{yy}",
        f"{day:02d}.{mo:02d}.{y}",
        f"{day}.{mo}.{y}",
        f"{day:02d}-{mo:02d}-{y}",
        f"{y}/{mo:02d}/{day:02d}",
        f"{y}{mo:02d}{day:02d}",
        d.isoformat(),
    ]


def date_pair(rng: random.Random) -> tuple[str, str]:
    """One (source, target) pair: a random date in a random surface form, and its ISO form."""
    d = dt.date.fromordinal(rng.randint(FIRST, LAST))
    src = rng.choice(_forms(d, rng))
    case = rng.random()
    if case < 0.1:
        src = src.lower()
    elif case < 0.15:
        src = src.upper()
    return src, d.isoformat()


ASKS = (
    "Write {} in ISO 8601.",
    "What is {} as an ISO date?",
    "Normalise this date: {}",
    "{} in YYYY-MM-DD, please.",
)


def date_chat(rng: random.Random) -> dict:
    """The task as one conversation in OpenAI's fine-tuning format (gpt-train --data *.jsonl):
    a user asks for a date in ISO form, in one of a few phrasings, and the assistant answers with
    the date alone; a third of them open with a system message."""
    src, iso = date_pair(rng)
    messages = [
        {"role": "user", "content": rng.choice(ASKS).format(src)},
        {"role": "assistant", "content": iso},
    ]
    if rng.random() < 1 / 3:
        messages.insert(0, {"role": "system", "content": "You convert dates to ISO 8601."})
    return {"messages": messages}


def main(argv: list[str] | None = None) -> int:
    """python -m training.dates --chats N --out FILE: N date conversations, one JSON line each."""
    import argparse
    import json
    import sys

    p = argparse.ArgumentParser(prog="python -m training.dates", description=main.__doc__)
    p.add_argument("--chats", type=int, required=True, metavar="N", help="how many conversations")
    p.add_argument("--out", required=True, metavar="FILE", help="the .jsonl file to write")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.chats < 1:
        print("python -m training.dates: --chats must be at least 1", file=sys.stderr)
        return 2
    rng = random.Random(args.seed)
    lines = "".join(json.dumps(date_chat(rng)) + "\n" for _ in range(args.chats))
    try:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(lines)
    except OSError as e:
        print(f"python -m training.dates: cannot write {args.out}: {e.strerror}", file=sys.stderr)
        return 2
    print(f"wrote {args.chats} conversations to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
