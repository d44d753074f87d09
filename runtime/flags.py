"""Command-line flags from a typed dataclass, for the scripts (train.py, tools/mine.py): each
field's trailing comment is its flag's help, and a `typing.Literal` type its choices, so
argparse rejects a bad value naming the flag and the choices. Importing this file does
nothing."""
import dataclasses
import inspect
import re
import typing


def field_help(cls) -> dict[str, str]:
    """Each field's trailing comment in the dataclass sources (base classes first): its flag's
    help. A comment line whose '#' stands in the same column as the one above continues it."""
    helps, field, column = {}, None, -1
    lines = [line for c in cls.__mro__[::-1] if dataclasses.is_dataclass(c)
             for line in inspect.getsource(c).splitlines()]
    for line in lines:
        m = re.match(r"\s+(\w+): [^#]*=[^#]*(#)\s*(.*)", line)
        if m:
            field, column = m[1], m.start(2)
            helps[field] = m[3]
        elif field and line[:column].isspace() and line[column:column + 1] == "#":
            helps[field] += " " + line[column + 1:].strip()
        else:
            field = None
    return helps


def choices(field_type) -> list | None:
    """The values a Literal[...] field allows; None for any other type."""
    return list(typing.get_args(field_type)) if typing.get_origin(field_type) is typing.Literal \
        else None
