"""Ascend specifics the reports need beyond the device seam: capturing torch_npu's CPU-fallback warnings.

An operator without an NPU kernel runs on the CPU, and torch_npu says so with a warning (text from libtorch_npu.so):
"CAUTION: The operator 'aten::NAME' is not currently supported on the NPU backend and will fall back to run on the
CPU. This may have performance implications." `CpuFallbacks` counts them per operator while a run is on npu, so a
report that says "ran on the NPU" also says what did not.
"""

from __future__ import annotations

import collections
import re
import warnings
from typing import Any

from mobilevit_npu import devices

FALLBACK_RE = re.compile(
    r"operator '(?P<op>[^']+)' is not currently supported on the NPU backend and will fall back to run on the CPU"
)
COUNT_NOTE = (
    "counts are the fallback warnings seen; torch_npu may warn once per operator (TORCH_WARN_ONCE), so a count of 1 "
    "can stand for every call"
)


class CpuFallbacks:
    """`with CpuFallbacks(device) as fallbacks:` records the CPU-fallback warnings raised inside (operator -> count)
    when the device is an npu; other warnings are shown as usual. Outside npu it records nothing."""

    def __init__(self, device: devices.Device):
        self.device = device
        self.active = device.type == "npu"
        self.counts: collections.Counter[str] = collections.Counter()
        self._saved = None

    def __enter__(self) -> CpuFallbacks:
        if self.active:
            self._saved = warnings.catch_warnings()
            self._saved.__enter__()
            show = warnings.showwarning
            # "always": the default filters would show one warning per call site and hide the count.
            warnings.filterwarnings("always", message=r".*is not currently supported on the NPU backend")

            def showwarning(message, category, filename, lineno, file=None, line=None):
                match = FALLBACK_RE.search(str(message))
                if match:
                    self.counts[match.group("op")] += 1
                else:
                    show(message, category, filename, lineno, file, line)

            warnings.showwarning = showwarning
        return self

    def __exit__(self, *exc) -> None:
        if self._saved is not None:
            self._saved.__exit__(*exc)
            self._saved = None

    def summary(self) -> dict[str, Any] | None:
        """The report field: None off npu, else the operators that fell back with their counts."""
        if not self.active:
            return None
        return {
            "operators": dict(self.counts.most_common()),
            "operator_count": len(self.counts),
            "warnings": sum(self.counts.values()),
            "note": COUNT_NOTE,
        }

    def line(self) -> str | None:
        """One console line (None off npu)."""
        if not self.active:
            return None
        if not self.counts:
            return f"CPU fallbacks on {self.device}: none (every operator ran on the NPU)"
        ops = ", ".join(f"{op} x{n}" for op, n in self.counts.most_common())
        return f"CPU fallbacks on {self.device}: {len(self.counts)} operator(s) ran on the CPU: {ops}"
