#!/usr/bin/env python
"""Bad input, tried case by case (the cases: harness/bad_inputs.py): each must give one ``error:`` line naming the
problem and the fix, a non-zero exit, no traceback, and leave every file an earlier run wrote as it was. Prints the
table of the RELIABILITY report; exits 1 when a case is not as expected.

    python bench/bad_inputs.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from harness.bad_inputs import CASES, run_case, train_shared
from harness.reporting import markdown_table


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="bad-inputs-") as tmp:
        root = Path(tmp)
        shared = train_shared(root / "shared")
        rows, tracebacks, lost, failed = [], 0, 0, 0
        for i, case in enumerate(CASES):
            scratch = root / f"case{i:02d}"
            scratch.mkdir()
            o = run_case(case, scratch, shared)
            tracebacks += o.traceback
            lost += len(o.changed)
            failed += not o.passed(case)
            if case.succeeds:
                shown = (o.naming(case) or ["(no warning)"])[0]
            else:
                shown = o.errors[0] if len(o.errors) == 1 else f"({len(o.errors)} error lines)"
            shown = shown.replace(str(root), "$TMP").replace("|", "\\|")
            # a double-backtick code span holds the line's own backticks and <...>
            rows.append([case.name, o.returncode, f"`` {shown} ``", "yes" if o.traceback else "no",
                         len(o.changed), "ok" if o.passed(case) else "FAIL"])
            print(f"{case.name}: {'ok' if o.passed(case) else 'FAIL'}", file=sys.stderr, flush=True)
            if not o.passed(case):
                print(o.output[-3000:], file=sys.stderr, flush=True)
    print(markdown_table(["case", "exit", "error line", "traceback shown", "files changed", "verdict"], rows))
    print(f"\nbad inputs tried: {len(CASES)}; tracebacks shown: {tracebacks}; data lost (files changed): {lost}; "
          f"cases not as expected: {failed}")
    return 1 if failed or tracebacks or lost else 0


if __name__ == "__main__":
    sys.exit(main())
