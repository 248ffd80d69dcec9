"""What a verdict is: a kind, a subject, how sure, one sentence and the evidence (the rules
that make verdicts are in verdicts.py, and the loss rules in loss.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

SURE, LIKELY, UNSURE = "sure", "likely", "unsure"


@dataclass(frozen=True, slots=True)
class Verdict:
    kind: str
    subject: str
    confidence: str
    summary: str
    evidence: tuple[str, ...] = field(default_factory=tuple)

    def as_json(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "subject": self.subject,
            "confidence": self.confidence,
            "summary": self.summary,
            "evidence": list(self.evidence),
        }
