"""The GPU check's tables into docs/benchmarks.md, with its targets (issue 31) checked: scripts/gpu_check.sh runs it
on the logs it wrote.

    python benchmarks/gpu_report.py OUT_DIR docs/benchmarks.md

Each run replaces the section between the markers below, dated, with the device's name; the RESULT lines and the
tables are as the benchmarks printed them."""

from __future__ import annotations

import datetime
import re
import sys
from pathlib import Path

START, END = "<!-- gpu_check: start -->", "<!-- gpu_check: end -->"
MODELS = ("smollm2-shape", "llama-1b", "llama-8b")


def _fields(line: str) -> dict[str, str]:
    return dict(re.findall(r"(\w+)=(\S+)", line))


def targets(step_8b: dict[str, str], serve: dict[str, str]) -> list[str]:
    """Each target of issue 31 with what was measured and whether it is met."""
    out = []

    def check(name: str, value: str | None, ok) -> None:
        if value is None:
            out.append(f"- {name}: not measured")
        else:
            out.append(f"- {name}: {value} -> {'met' if ok(float(value)) else 'missed'}")

    check("8B step vs the frozen model's forward+backward (<= 1.05)", step_8b.get("train_vs_base"), lambda x: x <= 1.05)
    check("8B step vs peft prompt tuning's (<= 1.00)", step_8b.get("train_vs_peft"), lambda x: x <= 1.0)
    check("8B share of the bf16 peak (>= 0.40)", step_8b.get("peak_share"), lambda x: x >= 0.4)
    check("64 tasks mixed vs peft switching adapters (>= 3)", serve.get("serve_vs_peft"), lambda x: x >= 3)
    check("64 tasks mixed vs one task (>= 0.9)", serve.get("mixed_vs_single"), lambda x: x >= 0.9)
    return out


def main() -> None:
    out, doc = Path(sys.argv[1]), Path(sys.argv[2])
    lines = [f"## GPU check (`bash scripts/gpu_check.sh`), {datetime.date.today()}", ""]
    step_8b: dict[str, str] = {}
    for model in MODELS:
        log = out / f"step_{model}.log"
        if not log.is_file():
            continue
        text = log.read_text().splitlines()
        lines += [t for t in text if t.startswith(("#", "|"))] + [""]
        for t in text:
            if t.startswith("RESULT gpu") and model == "llama-8b":
                step_8b = _fields(t)
    serve: dict[str, str] = {}
    if (out / "serve.log").is_file():
        text = (out / "serve.log").read_text().splitlines()
        lines += [t for t in text if t.startswith(("#", "|"))] + [""]
        for t in text:
            if t.startswith("RESULT"):
                serve.update(_fields(t))
    lines += ["Targets:", *targets(step_8b, serve), ""]
    results = [t for f in sorted(out.glob("*.log")) for t in f.read_text().splitlines() if t.startswith("RESULT")]
    lines += ["```", *results, "```"]
    section = "\n".join([START, *lines, END])
    current = doc.read_text()
    if START in current:
        current = current[:current.index(START)] + section + current[current.index(END) + len(END):]
    else:
        current = current.rstrip() + "\n\n" + section + "\n"
    doc.write_text(current)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
