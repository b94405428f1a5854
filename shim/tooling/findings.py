"""What `check` reports: a finding (error, warning, or what could not be told here)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

ERROR, WARNING, CANNOT = "error", "warning", "cannot tell"


@dataclass
class Finding:
    level: str        # ERROR, WARNING or CANNOT
    what: str
    fix: str = ""

    def __str__(self) -> str:
        if not self.fix:
            return f"{self.level}: {self.what}"
        return f"{self.level}: {self.what}\n    {'to tell' if self.level == CANNOT else 'fix'}: {self.fix}"


def last(section: Dict[str, List[str]], key: str) -> Optional[str]:
    values = section.get(key)
    return values[-1] if values else None
