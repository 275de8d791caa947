"""``imgcls <step> ...``: one command for every job; ``python -m jobs.<step>`` runs the same code.

    imgcls prepare --source ~/photos --out data/photos
    imgcls train-local --set data.format=parquet --set data.root=data/photos
    imgcls predict --model runs/local/model.pt ~/photos/new/

``imgcls <step> ARGS`` calls ``jobs.<module>.main(ARGS)`` and exits with its status;
``imgcls <step> --help`` shows the step's own options.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import sys
from pathlib import Path

# step -> module under jobs/, in the order of the pipeline
STEPS = {
    "prepare": "prepare",
    "train-local": "train_local",
    "train": "train",
    "tune": "tune",
    "register": "register",
    "promote": "promote",
    "deploy": "deploy",
    "predict": "predict",
    "export": "export",
    "compress": "compress",
    "distill": "distill",
    "submit": "submit",
}


def summary(module: str) -> str:
    """The first line of a job's docstring, read without importing it (some import torch)."""
    spec = importlib.util.find_spec(f"jobs.{module}")
    doc = ast.get_docstring(ast.parse(Path(spec.origin).read_text())) if spec and spec.origin else None
    return (doc or "").split("\n", 1)[0]


def usage() -> str:
    width = max(map(len, STEPS))
    lines = [
        "usage: imgcls <step> [--help] [ARGS ...]",
        "",
        "Image classification on Ray: from a folder of images to a served endpoint.",
        "",
        "steps:",
        *(f"  {step:<{width}}  {summary(module)}" for step, module in STEPS.items()),
        "",
        "`imgcls <step> --help` lists a step's options; `python -m jobs.<module>` is the same command",
        "(modules: " + ", ".join(STEPS.values()) + ").",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] == "--version":
        from importlib.metadata import version

        print(f"imgcls {version('imgcls')}")
        return 0
    step, rest = argv[0], argv[1:]
    module = STEPS.get(step) or STEPS.get(step.replace("_", "-"))
    if module is None:
        close = difflib.get_close_matches(step, list(STEPS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        print(f"imgcls: unknown step {step!r}{hint} Choose from {', '.join(STEPS)} (imgcls --help)", file=sys.stderr)
        return 2
    from jobs.common import run_main

    # The step's main() reports its own failures; this reports one that stops it from loading
    # (a package missing from this environment, say) in the same one line.
    return run_main(lambda: importlib.import_module(f"jobs.{module}").main(rest), what=f"imgcls {step}")


if __name__ == "__main__":
    sys.exit(main())
