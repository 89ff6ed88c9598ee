"""Command-line flags declared on config fields: each option is written once, next to its field.

`option(default, "--flag", help)` is a `dataclasses.field` that also carries its flag; `cli_flags`
reads them back from config classes (flag -> dotted field, type, help), which is all a parser and
the override mapping need. Imports nothing from lmd, so config classes can use it without a cycle.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import field
from typing import Any, NamedTuple

# Annotation names (strings under `from __future__ import annotations`) -> the types config fields use.
FIELD_TYPES: dict[str, type] = {"int": int, "float": float, "bool": bool, "str": str}
_OPTION = "lmd.option"  # the dataclasses.field metadata key of a field's command-line flag


class Flag(NamedTuple):
    """A config field's command-line flag, as `cli_flags` reports it."""

    dotted: str  # the field it sets: mask.end
    kind: type  # int, float, str or bool (a bool is a switch: passing it sets True)
    help: str
    metavar: str | None = None


def option(default: Any, flag: str, help: str, metavar: str | None = None) -> Any:
    """A dataclass field that is also the flag `flag`; ``{default}`` in `help` shows the default."""
    return field(default=default, metadata={_OPTION: (flag, help.format(default=default), metavar)})


def cli_flags(sections: Mapping[str, type]) -> dict[str, Flag]:
    """Flag -> the field it sets, for each field of `sections` declared with `option`; no flag twice."""
    flags: dict[str, Flag] = {}
    for section, cls in sections.items():
        for f in dataclasses.fields(cls):
            if _OPTION not in f.metadata:
                continue
            flag, help, metavar = f.metadata[_OPTION]
            if flag in flags:
                raise TypeError(f"{flag} is declared by both {flags[flag].dotted} and {section}.{f.name}")
            kind = FIELD_TYPES[f.type] if isinstance(f.type, str) else f.type
            flags[flag] = Flag(f"{section}.{f.name}", kind, help, metavar)
    return flags
