"""A Check: one result of the verify script on an instance, or one probe of a restore drill.

Pure values. Their JSON (``dataclasses.asdict``) keeps the keys in the order verify.sh
prints its fields: state, check, subject, detail.
"""

from __future__ import annotations

from dataclasses import dataclass

OK = "ok"
FAIL = "FAIL"


@dataclass(frozen=True)
class Check:
    """What was checked (``check`` of ``subject``), whether it held (``state`` ok | FAIL), and what was seen."""

    state: str
    check: str
    subject: str
    detail: str

    @property
    def ok(self) -> bool:
        """Return True when the check held."""
        return self.state == OK

    @classmethod
    def of(cls, held: bool, check: str, subject: str, detail: str) -> Check:
        """Return the check of ``subject``: ok when ``held``, else FAIL."""
        return cls(OK if held else FAIL, check, subject, detail)

    def line(self) -> str:
        """Return the check as one line: what failed and what was seen."""
        return f"{self.check} {self.subject}: {self.detail}"
