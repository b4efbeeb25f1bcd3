"""The doctor's report: a :class:`Finding` per silent failure, and the :class:`DoctorReport`
that prints them as text and as an HTML table (peftlab/doctor/__init__.py runs the checks)."""

from __future__ import annotations

import html
from dataclasses import dataclass, field

SEVERITIES = ("error", "warning")  # error: nothing (or the wrong thing) is learned; warning: much less


@dataclass(frozen=True)
class Finding:
    """One silent failure: what causes it, the numbers that show it, and what to change."""

    check: str  # which check found it (the module docstring's table)
    severity: str  # "error" or "warning" (SEVERITIES)
    cause: str  # what is wrong, in words
    evidence: str  # the numbers that show it
    fix: str  # what to change
    numbers: dict[str, float] = field(default_factory=dict)  # the evidence as values (tests, widgets)

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity={self.severity!r}; expected one of {SEVERITIES}")

    def __str__(self) -> str:
        return f"[{self.severity}] {self.check}: {self.cause}\n    evidence: {self.evidence}\n    fix: {self.fix}"


@dataclass(frozen=True)
class DoctorReport:
    """What :func:`doctor` checked and found; ``ok`` when nothing was found."""

    findings: tuple[Finding, ...]
    checked: tuple[str, ...]  # the checks that ran (a check needing data or lr runs only with them)

    @property
    def ok(self) -> bool:
        return not self.findings

    def of(self, check: str) -> list[Finding]:
        """The findings of one check."""
        return [f for f in self.findings if f.check == check]

    def __str__(self) -> str:
        head = f"peftlab.doctor: checked {', '.join(self.checked)}"
        if self.ok:
            return head + "\nclean bill: no silent failure found."
        return head + f"\n{len(self.findings)} finding(s):\n" + "\n".join(str(f) for f in self.findings)

    __repr__ = __str__

    def _repr_html_(self) -> str:
        checked = html.escape(", ".join(self.checked))
        if self.ok:
            return f"<div><b>peftlab.doctor</b>: clean bill (checked {checked}).</div>"
        rows = "".join(
            f"<tr><td>{'&#9888;' if f.severity == 'warning' else '&#10060;'} {html.escape(f.check)}</td>"
            f"<td>{html.escape(f.cause)}</td><td>{html.escape(f.evidence)}</td><td>{html.escape(f.fix)}</td></tr>"
            for f in self.findings)
        return (f"<div><b>peftlab.doctor</b>: {len(self.findings)} finding(s) (checked {checked})"
                "<table><tr><th>check</th><th>cause</th><th>evidence</th><th>fix</th></tr>"
                f"{rows}</table></div>")



__all__ = ["Finding", "DoctorReport", "SEVERITIES"]
