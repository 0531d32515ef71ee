"""Generate the Python code for protos/ (grpcio-tools), or check that the committed code matches.

    python -m posemesh.devstack.codegen           # regenerate clients/python/posemesh/v1/*_pb2*.py(i)
    python -m posemesh.devstack.codegen --check   # exit 1 when the committed code is stale

The generated modules are committed so that `pip install posemesh` needs no protoc; the check runs in
the test suite so they can never drift from the protos.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT_PACKAGE = "posemesh/v1"
# The generated package lives in the client distribution; the server imports it from there.
CLIENT_ROOT = ROOT / "clients" / "python"


def generate(out_root: Path) -> list[Path]:
    import grpc_tools
    from grpc_tools import protoc  # dev dependency: only needed to regenerate

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / OUT_PACKAGE).glob("*.proto"))
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed: " + " ".join(args))
    return sorted(p for p in (out_root / OUT_PACKAGE).iterdir() if p.suffix in (".py", ".pyi"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    target = CLIENT_ROOT / OUT_PACKAGE
    with tempfile.TemporaryDirectory() as tmp:
        generated = generate(Path(tmp))
        if args.check:
            stale = [p.name for p in generated if not (target / p.name).exists()
                     or not filecmp.cmp(p, target / p.name, shallow=False)]
            if stale:
                print("stale generated code (run `python -m posemesh.devstack.codegen`):", ", ".join(stale))
                return 1
            print(f"generated code matches protos ({len(generated)} files)")
            return 0
        target.mkdir(parents=True, exist_ok=True)
        for p in generated:
            shutil.copyfile(p, target / p.name)
        print(f"wrote {len(generated)} files to {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
