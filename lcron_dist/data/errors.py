"""The one error type of the data path: bad input, located precisely enough to fix it."""

from __future__ import annotations

import datetime as dt
import os


class DataError(ValueError):
    """Input data that breaks a rule of the RecFlow or converted layout.

    The message names the file, the day, the column (or field) and the rule that was violated, so a
    user can find the problem without reading the code.
    """

    def __init__(
        self,
        rule: str,
        *,
        file: str | os.PathLike | None = None,
        day: dt.date | str | None = None,
        column: str | None = None,
    ) -> None:
        self.rule = rule
        self.file = None if file is None else os.fspath(file)
        self.day = None if day is None else str(day)
        self.column = column
        where = [
            f"{name} {value}"
            for name, value in (("file", self.file), ("day", self.day), ("column", self.column))
            if value is not None
        ]
        super().__init__(f"{', '.join(where)}: {rule}" if where else rule)

    def __reduce__(self):
        # Keep the located fields when the error crosses a process boundary (parallel conversion).
        return _rebuild, (self.rule, self.file, self.day, self.column)


def _rebuild(rule: str, file: str | None, day: str | None, column: str | None) -> DataError:
    return DataError(rule, file=file, day=day, column=column)
