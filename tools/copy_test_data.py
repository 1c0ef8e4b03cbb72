#!/usr/bin/env python3
"""Copy the shared test material the suites need into the project (run once; the copies are committed).

Sources (see ../shared/README.md for origins and licences):
- ../shared/fhir-r4/examples -> conformance_tests/data/r4-examples (HL7 FHIR R4 4.0.1 examples, CC0)
- ../shared/fhir-r4/definitions/search-parameters.json -> conformance_tests/data/ (the official SearchParameters, CC0)
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"

COPIES = [
    (SHARED / "fhir-r4" / "examples", ROOT / "conformance_tests" / "data" / "r4-examples"),
]
FILES = [
    (SHARED / "fhir-r4" / "definitions" / "search-parameters.json", ROOT / "conformance_tests" / "data" / "search-parameters.json"),
]


def main() -> int:
    for src, dst in COPIES:
        if not src.is_dir():
            print(f"missing {src}", file=sys.stderr)
            return 2
        dst.mkdir(parents=True, exist_ok=True)
        n = 0
        for f in sorted(src.iterdir()):
            if f.is_file():
                shutil.copyfile(f, dst / f.name)
                n += 1
        print(f"copied {n} files to {dst.relative_to(ROOT)}")
    for src, dst in FILES:
        shutil.copyfile(src, dst)
        print(f"copied {dst.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
