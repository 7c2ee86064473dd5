"""lm-evaluation-harness as an outside judge: a SmolLM2 SST-2 prompt, exported as a peft adapter, scored by the
harness (`--model hf --model_args pretrained=<local SmolLM2>,peft=<adapter>`) and by softprompt on the same dev rows.

    pip install lm-eval                                        # once
    python benchmarks/lm_eval_check.py --limit 100             # a quick check: trains 60 steps, scores 100 rows
    python benchmarks/lm_eval_check.py                         # all 872 dev rows
    python benchmarks/lm_eval_check.py --checkpoint runs/sst2/best   # a prompt trained before (SmolLM2, SST-2)

Prints `RESULT lm_eval_acc=<a> softprompt_acc=<b>`; exits 1 when they differ by more than 0.5 points. Offline:
the harness reads a local task config (written here) over the dev rows as softprompt reads them (SST-2's
Treebank text as natural text, in file order), its prompt is the checkpoint's template with the label words as
the choices (`target_delimiter` empty: the words carry their own space), in fp32. peft prepends the prompt to
the harness's right-padded rows and counts positions from 0, which is softprompt's layout for a decoder
(peft_interop.py), and the harness drops peft's virtual-token logits itself. Skips (exit 0) when the GLUE data
or lm-eval is absent.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GLUE = ROOT.parent / "shared" / "data" / "glue"
TASK_NAME = "sst2_softprompt"
TOLERANCE = 0.5  # accuracy points


def harness_task(template: str, fields: tuple[str, ...], choices: tuple[str, ...], data: Path) -> dict:
    """The harness's task config: softprompt's template (`{field}` -> Jinja's `{{field}}`) and label words."""
    for name in fields:
        template = template.replace("{" + name + "}", "{{" + name + "}}")
    return {"task": TASK_NAME, "dataset_path": "json", "dataset_kwargs": {"data_files": {"validation": str(data)}},
            "validation_split": "validation", "output_type": "multiple_choice", "doc_to_text": template,
            "doc_to_choice": list(choices), "target_delimiter": "", "doc_to_target": "{{label}}",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}


def harness_scores(model_path: Path, adapter: Path, task_dir: Path, output: Path, batch_size: int
                   ) -> tuple[float, dict[int, list[float]]]:
    """The harness's accuracy, and its log-likelihood of each choice per row (doc_id)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args",
           f"pretrained={model_path},peft={adapter},dtype=float32", "--tasks", TASK_NAME, "--include_path",
           str(task_dir), "--batch_size", str(batch_size), "--device", "cpu", "--output_path", str(output),
           "--log_samples"]
    subprocess.run(cmd, env=env, check=True)
    newest = lambda pattern: max(output.rglob(pattern), key=lambda p: p.stat().st_mtime)  # noqa: E731
    accuracy = json.loads(newest("results_*.json").read_text())["results"][TASK_NAME]["acc,none"]
    samples = [json.loads(line) for line in newest(f"samples_{TASK_NAME}_*.jsonl").read_text().splitlines()]
    return accuracy, {s["doc_id"]: [float(r[0]) for r in s["filtered_resps"]] for s in samples}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="a SmolLM2 SST-2 checkpoint (CAUSAL_LM); default: train one")
    parser.add_argument("--max-steps", type=int, default=60, help="training steps when no checkpoint is given")
    parser.add_argument("--limit", type=int, help="score the first N dev rows only")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--output", default="runs/lm_eval_check")
    args = parser.parse_args()
    if not (GLUE / "SST-2" / "dev.tsv").is_file():
        print(f"SKIP: no SST-2 data at {GLUE / 'SST-2'}")
        return 0
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        print("SKIP: lm-evaluation-harness is not installed (pip install lm-eval)")
        return 0

    from softprompt.assets import smollm2_path
    from softprompt.config import TaskType
    from softprompt.metrics import compute_metrics
    from softprompt.peft_interop import export_peft
    from softprompt.pipeline import PromptedTask
    from softprompt.scoring import predictions
    from softprompt.training import TrainConfig, load_splits, train

    out = Path(args.output).resolve()
    checkpoint = args.checkpoint or train(TrainConfig(
        model="smollm2-135m", data=str(GLUE), task="sst2", max_steps=args.max_steps, bf16=False,
        max_eval_examples=200, eval_test=False, progress=False, output=str(out / "run"))).best_checkpoint
    prompted = PromptedTask.from_pretrained(checkpoint)
    spec = prompted.spec
    if spec.task_type is not TaskType.CAUSAL_LM or spec.bf16:
        print(f"error: {checkpoint} must score label words (CAUSAL_LM) in fp32; it is {spec.task_type.value}"
              f"{' in bf16' if spec.bf16 else ''}", file=sys.stderr)
        return 2
    rows = load_splits(str(GLUE), spec.task).dev[:args.limit]
    scores = prompted.scores(rows)  # each label word's log-likelihood, as the harness scores a choice
    softprompt_acc = compute_metrics(["accuracy"], predictions(scores), [e.label for e in rows])["accuracy"]
    if prompted.encoder.truncated:
        print(f"note: {prompted.encoder.truncated} rows were cut to --max-length {spec.max_length}; the harness "
              "reads them whole")

    adapter, note = export_peft(checkpoint, out / "peft")
    print(note)
    task_dir = out / "task"
    task_dir.mkdir(parents=True, exist_ok=True)
    data = task_dir / "dev.jsonl"
    data.write_text("".join(json.dumps({**spec.task.input_fields(e.fields), "label": e.label}) + "\n" for e in rows))
    config = harness_task(spec.task.template, spec.task.fields, spec.task.verbalizer, data)
    (task_dir / f"{TASK_NAME}.yaml").write_text(json.dumps(config, indent=2))  # JSON is YAML
    lm_eval_acc, theirs = harness_scores(smollm2_path(), adapter, task_dir, out / "lm_eval", args.batch_size)

    differ = sum(int(scores[i].argmax()) != max(range(len(ll)), key=ll.__getitem__) for i, ll in theirs.items())
    gap = max(abs(float(scores[i][c]) - ll[c]) for i, ll in theirs.items() for c in range(len(ll)))
    print(f"{len(rows)} SST-2 dev rows, checkpoint {checkpoint}: the two predict differently on {differ} rows; "
          f"largest log-likelihood gap {gap:.2e}")
    print(f"RESULT lm_eval_acc={lm_eval_acc:.4f} softprompt_acc={softprompt_acc:.4f}")
    return 0 if abs(lm_eval_acc - softprompt_acc) * 100 <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
