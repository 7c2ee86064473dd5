"""The paper's own experiments (Lester, Al-Rfou & Constant, 2021) at 22M-135M parameters: prompt length,
initialisation, prompt ensembles and robustness to a change of data, each beside what the paper reports.

    python benchmarks/paper.py                        # all four; rows already in docs/paper.json are kept
    python benchmarks/paper.py --quick                # every path in about 15 minutes (to /tmp, not docs/)

Every run is softprompt's prompt tuning, `softprompt train` with its defaults but for the one factor varied,
from a base setting (20 virtual tokens, the resolver's init, seed 0) on SST-2 (GLUE's train -> dev): MiniLM-L6
with a classification head, SmolLM2-135M-Instruct scoring label words. Budgets are optimizer steps (MiniLM-L6
500, SmolLM2-135M 100, batch 16), so a row means the same on any machine; SmolLM2 runs its frozen weights in
bf16, as its time-budgeted runs do where the CPU's timed probe says bf16 pays. The transfer rows train on Rotten
Tomatoes (softprompt's built-in set) or SST-2 and score both; peft LoRA (benchmarks/glue.py's row, at the same
steps, batch and precision) stands in for the paper's model tuning.

Checkpoints stay under --workdir: the ensemble scores them together in one batched forward (MultiTaskModel) and
the transfer rows score them on the other set; a row whose checkpoint is gone is trained again. docs/paper.md is
rewritten from docs/paper.json after every row, so the command resumes where a stopped sitting left off.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import transformers

from softprompt import MultiTaskModel, PromptedTask, describe_model, get_task, resolve
from softprompt.data import Example
from softprompt.training import TrainConfig, load_splits, train

sys.path.insert(0, str(Path(__file__).resolve().parent))
import glue  # noqa: E402  (the sibling benchmark: our row's settings and peft's LoRA row)

ROOT = Path(__file__).resolve().parents[1]
STEPS = {"minilm-l6": 500, "smollm2-135m": 100}
LENGTHS = (1, 5, 20, 100, 150)
INITS = ("random", "vocab", "class_labels", "text")
ENSEMBLE_SEEDS = (0, 1, 2, 3, 4)
EXPERIMENTS = ("length", "init", "ensemble", "transfer")
SETS = {"sst2": "SST-2 dev", "rotten_tomatoes": "Rotten Tomatoes test"}
UNSEEN = " unseen"  # a scored set less the texts that either set's training texts contain
# what the paper reports for each experiment (T5, SuperGLUE dev; section 3.2, figure 3, tables 1-3)
PAPER = {
    "length": "Figure 3(a): more than one token matters most for the smaller models (T5-Small to -Large), and going "
              "beyond 20 tokens gives only marginal gains; T5-XXL does well even with a single token.",
    "init": "Figure 3(b): class-label init is best, and random uniform init the worst, with sampled vocabulary "
            "between; the gaps are large for the smaller models and vanish at T5-XXL.",
    "ensemble": "Table 3, T5-XXL, five prompts of one task: SuperGLUE 90.5 for the average prompt, 90.8 for the "
                "best, 91.1 for the ensemble by majority vote.",
    "transfer": "Tables 1 and 2: trained on one QA set (SQuAD) or one paraphrase set (QQP, MRPC) and tested on "
                "others, prompt tuning loses less than model tuning on most shifts (by about 12 F1 points on "
                "TextbookQA) and stays level on the rest.",
}


@dataclass(frozen=True)
class Run:
    """One training run: the base setting with one factor changed."""
    model: str
    init: str  # explicit, the resolver's default included, so the base row and the init row it equals are one
    source: str = "sst2"  # the training set: sst2 or rotten_tomatoes
    method: str = "prompt"  # prompt (ours) or lora (peft's, the stand-in for model tuning)
    length: int = 20
    seed: int = 0

    def key(self, steps: int) -> str:
        return f"{self.model}/{self.source}/{self.method}/{self.length}/{self.init}/{self.seed}/{steps}"


class Paper:
    """The rows (docs/paper.json), the checkpoints (--workdir) and the sets every run is scored on."""

    def __init__(self, store: Path, workdir: Path, steps: dict[str, int], eval_limit: int | None):
        self.store, self.workdir, self.steps, self.eval_limit = store, workdir, steps, eval_limit
        self.rows: dict[str, dict] = json.loads(store.read_text()) if store.is_file() else {}
        sst2 = load_splits(str(glue.GLUE / get_task("sst2").glue_folder), "sst2")
        rotten = load_splits("rotten_tomatoes", "rotten_tomatoes")
        self.train_texts = {"sst2": sst2.train, "rotten_tomatoes": rotten.train}
        self.sets = {"sst2": sst2.dev[:eval_limit], "rotten_tomatoes": rotten.test[:eval_limit]}
        trained = [e for rows in self.train_texts.values() for e in rows]
        self.sets.update({name + UNSEEN: unseen(self.sets[name], trained) for name in SETS})

    def config(self, run: Run) -> TrainConfig:
        """Our row's settings for `run`: those of benchmarks/glue.py's rows, on `run.source`."""
        steps = self.steps[run.model]
        out = self.workdir / run.key(steps).replace("/", "_")
        cfg = glue.train_config("prompt", run.model, "sst2", glue.Budget("steps", steps), run.length, None, run.seed,
                                out)
        if run.source != "sst2":
            cfg = replace(cfg, data=run.source, task=run.source)
        # a text init reads the task's instruction, as a decoder's default does (a head's default has no text)
        text = get_task(run.source).instruction.strip() if run.init == "text" else None
        return replace(cfg, init=run.init, init_text=text, bf16=True if run.model == "smollm2-135m" else None)

    def default_init(self, model: str) -> str:
        """The init the resolver picks for the base setting (vocab for a head, the instruction's text for label
        words)."""
        cfg = replace(self.config(Run(model, "vocab")), init=None)
        return resolve(cfg, describe_model(model), get_task("sst2")).prompt.init.value

    def scores(self, run: Run, sets: tuple[str, ...], keep: bool = False) -> dict[str, dict[str, float]]:
        """`run`'s metrics on each of `sets`, trained (and scored) only where the rows lack them; `keep`: its
        checkpoint must be on disk as well."""
        key = run.key(self.steps[run.model])
        row = self.rows.get(key, {})
        checkpoint = Path(self.config(run).output) / "best"
        missing = [name for name in sets if name not in row.get("scores", {})]
        if not missing and (not keep or checkpoint.is_dir()):
            return row["scores"]
        if run.method == "lora":
            row = self._lora(run, sets)
        else:
            if "scores" not in row or not checkpoint.is_dir():
                print(f"training {key}", flush=True)
                result = train(self.config(run), log=lambda _: None)
                row = {"run": asdict(run), "steps": result.step, "seconds": round(result.seconds, 1), "scores": {}}
                if run.source == "sst2" and self.eval_limit is None:  # the run's own dev score: the same set
                    row["scores"]["sst2"] = result.dev
            prompted = PromptedTask.from_pretrained(checkpoint, device="cpu")
            for name in [name for name in sets if name not in row["scores"]]:
                row["scores"][name] = prompted.evaluate(self.as_task(name, prompted.task), batch_size=64)
        row["date"] = time.strftime("%Y-%m-%d")
        self.rows[key] = row
        print(json.dumps({key: row["scores"]}), flush=True)
        self.save()
        return row["scores"]

    def _lora(self, run: Run, sets: tuple[str, ...]) -> dict:
        """peft LoRA trained on `run.source` at our row's batch size and precision, scored on every set."""
        print(f"training {run.key(self.steps[run.model])}", flush=True)
        trained = glue.peft_train("lora", self.config(run), glue.Budget("steps", self.steps[run.model]))
        return {"run": asdict(run), "steps": trained.row["steps"], "seconds": round(trained.row["seconds"], 1),
                "scores": {name: trained.score(self.as_task(name, trained.encoder.task)) for name in sets}}

    def as_task(self, name: str, task) -> list[Example]:
        """Set `name`'s examples under `task`'s field name: both sets are one text with the same two labels."""
        source = get_task(name.removesuffix(UNSEEN))
        if source.labels != task.labels or len(task.fields) != 1:
            raise ValueError(f"{name} and {task.name} do not share one text field and their labels")
        return [Example({task.fields[0]: e.fields[source.fields[0]]}, e.label) for e in self.sets[name]]

    def save(self) -> None:
        self.store.write_text(json.dumps(self.rows, indent=1))


def length(paper: Paper, models: list[str]) -> dict:
    return {model: {n: paper.scores(Run(model, paper.default_init(model), length=n), ("sst2",))["sst2"]["accuracy"]
                    for n in LENGTHS} for model in models}


def init(paper: Paper, models: list[str]) -> dict:
    return {model: {name: paper.scores(Run(model, name), ("sst2",))["sst2"]["accuracy"] for name in INITS}
            for model in models}


def ensemble(paper: Paper, models: list[str]) -> dict:
    """Five seeds of the base setting, scored together: each member, the mean probability and the vote."""
    out = {}
    for model in models:
        runs = [Run(model, paper.default_init(model), seed=seed) for seed in ENSEMBLE_SEEDS]
        key = "ensemble:" + ",".join(run.key(paper.steps[model]) for run in runs)
        if key not in paper.rows:
            for run in runs:
                paper.scores(run, ("sst2",), keep=True)
            paths = [str(Path(paper.config(run).output) / "best") for run in runs]
            together = MultiTaskModel.from_pretrained({"sst2": paths}, device="cpu")
            scored = together.evaluate("sst2", paper.as_task("sst2", get_task("sst2")))
            paper.rows[key] = {"members": [m["accuracy"] for m in scored["members"].values()],
                               "alone": [paper.scores(run, ("sst2",))["sst2"]["accuracy"] for run in runs],
                               "mean_probability": scored["mean_probability"]["accuracy"],
                               "majority_vote": scored["majority_vote"]["accuracy"], "date": time.strftime("%Y-%m-%d")}
            paper.save()
        out[model] = paper.rows[key]
    return out


def transfer(paper: Paper, models: list[str]) -> dict:
    """Each of prompt tuning and LoRA trained on each set, scored on both."""
    return {model: {f"{method}:{source}": paper.scores(Run(model, paper.default_init(model), source=source,
                                                       method=method), tuple(name + UNSEEN for name in SETS))
                    for method in ("prompt", "lora") for source in SETS} for model in models}


def unseen(rows: list[Example], trained: list[Example]) -> list[Example]:
    """`rows` less those whose text (lower-cased, letters and digits only) is among the `trained` texts: SST's
    sentences were drawn from the same Rotten Tomatoes snippets, so a transfer score on a text the model trained
    on would measure memory, not transfer."""
    def norm(e: Example) -> str:
        return re.sub(r"[^a-z0-9]", "", next(iter(e.fields.values())).lower())

    seen = {norm(e) for e in trained}
    return [e for e in rows if norm(e) not in seen]


def _seen(paper: Paper, name: str) -> str:
    total, kept = len(paper.sets[name]), len(paper.sets[name + UNSEEN])
    return f"{total - kept:,} of {total:,}"


def pts(value: float) -> str:
    return f"{100 * value:.2f}"


def write(path: Path, results: dict, paper: Paper, yardstick: dict[str, float | None], command: str) -> None:
    """docs/paper.md: each experiment's table, the paper's finding beside it and whether it holds here."""
    steps = ", ".join(f"{model} {n:,}" for model, n in paper.steps.items())
    lines = ["# The paper's experiments at our scale", "",
             f"Written by `{command}` from docs/paper.json. Lester, Al-Rfou & Constant (2021) tuned prompts for T5 "
             "models of 60M to 11B parameters on SuperGLUE; these rows tune them for MiniLM-L6 (22M, a "
             "classification head) and SmolLM2-135M-Instruct (label words) on SST-2, one factor at a time from a "
             f"base setting (20 tokens, the resolver's init, seed 0), for a fixed number of optimizer steps ({steps}; "
             "batch 16) on 2 CPU cores. Accuracy on SST-2 dev (872 sentences) unless said otherwise. Unlike the "
             "paper's T5, MiniLM-L6 trains a classification head beside its prompt (the resolver's default for an "
             "encoder), so what the prompt alone contributes is harder to see in its rows; SmolLM2 reads the label "
             "words as T5 did.", "",
             "What counts as a difference: the five seeds of the base setting (the ensemble below) give each model's "
             "seed-to-seed standard deviation; a gap smaller than it is called level, since every other row is a "
             "single run. " + "; ".join(f"{model}: {pts(sd)} points" for model, sd in yardstick.items()
                                        if sd is not None) + ".", ""]
    findings: list[str] = []
    if "length" in results:
        lines += _sweep("Prompt length", "length", [], LENGTHS, [f"{n} tokens" for n in LENGTHS],
                        results["length"], _length_finding, yardstick, findings)
    if "init" in results:
        note = ["random: uniform in [-0.5, 0.5], the paper's; vocab: embeddings of tokens sampled from the 5,000 "
                "most frequent in the training texts (the paper: T5's 5,000 most common); class_labels: the label "
                "words' embeddings, the rest sampled vocabulary, the paper's; text: the task's instruction "
                "('Sentiment analysis of movie reviews.'), peft's addition.", ""]
        lines += _sweep("Initialisation (20 tokens)", "init", note, INITS, list(INITS), results["init"],
                        _init_finding, yardstick, findings)
    if "ensemble" in results:
        lines += ["## Prompt ensembles (five seeds, one batched forward)", "", f"Paper: {PAPER['ensemble']}", "",
                  "| model | members | mean ± sd | best | ensemble, mean probability | ensemble, majority vote |",
                  "|---|---|---|---|---|---|"]
        for model, row in results["ensemble"].items():
            members = row["members"]
            lines.append(f"| {model} | {', '.join(pts(m) for m in members)} | {pts(statistics.fmean(members))} ± "
                         f"{pts(statistics.stdev(members))} | {pts(max(members))} | {pts(row['mean_probability'])} "
                         f"| {pts(row['majority_vote'])} |")
            findings.append(_ensemble_finding(model, row))
        alone = {model: row["alone"] for model, row in results["ensemble"].items() if row.get("alone")}
        lines += ["", "Members are scored in one shared batch (`MultiTaskModel.evaluate`); each member's score from "
                  "its own run, scored alone (`PromptedTask.evaluate`): " +
                  "; ".join(f"{model} {', '.join(pts(a) for a in scores)}" for model, scores in alone.items()) +
                  ". SmolLM2's prompts run in bf16, whose rounding can move a sentence that sits on the boundary."]
        lines.append("")
    if "transfer" in results:
        lines += ["## Robustness to a change of data: Rotten Tomatoes <-> SST-2", "", f"Paper: {PAPER['transfer']}",
                  "", "Both sets are one-sentence movie-review sentiment, negative or positive; SST's sentences were "
                  "drawn from the same Rotten Tomatoes snippets (SST-2 as Treebank tokens, lower-cased, Rotten "
                  "Tomatoes as written), so this shift is smaller than the paper's, and many texts are in both: "
                  f"{_seen(paper, 'sst2')} SST-2 dev sentences and {_seen(paper, 'rotten_tomatoes')} Rotten "
                  "Tomatoes test snippets are among one set's training texts (letters and digits compared). This "
                  "table scores only the others, texts neither model trained on. LoRA is "
                  "peft's (r=8 on query and value, its head trained too) at peft's learning rate, the same steps, "
                  "batch and precision as the prompt.", "",
                  "The shift's cost is read on one scored set at a time (the two sets differ in difficulty): the "
                  "score of the model trained on that set's own training texts less the score of the one trained "
                  "on the other set's.", "",
                  "| model | method | scored on (unseen texts) | trained on its own set | trained on the other | "
                  "the shift costs |", "|---|---|---|---|---|---|"]
        for model, row in results["transfer"].items():
            for method in ("prompt", "lora"):
                for target in SETS:
                    own, other = _shifted(row, method, target)
                    lines.append(f"| {model} | {'prompt tuning' if method == 'prompt' else 'peft LoRA'} | "
                                 f"{SETS[target]} | {pts(own)} | {pts(other)} | {pts(own - other)} |")
            findings.append(_transfer_finding(model, row, yardstick.get(model)))
        lines.append("")
    lines += ["## What holds at 22M-135M parameters", ""] + [f"- {f}" for f in findings] + [""]
    path.write_text("\n".join(lines))


def _sweep(title: str, experiment: str, note: list[str], values: tuple, headers: list[str], rows: dict,
           finding, yardstick: dict[str, float | None], findings: list[str]) -> list[str]:
    """One factor's table (a model per row, a value of the factor per column); each model's finding is added to
    `findings`."""
    lines = [f"## {title}", "", f"Paper: {PAPER[experiment]}", "", *note,
             "| model | " + " | ".join(headers) + " |", "|---|" + "---|" * len(values)]
    for model, row in rows.items():
        lines.append(f"| {model} | " + " | ".join(pts(row[value]) for value in values) + " |")
        findings.append(finding(model, row, yardstick.get(model)))
    return lines + [""]


def _level(gap: float, sd: float | None) -> bool:
    return sd is not None and abs(gap) <= sd


def _length_finding(model: str, row: dict, sd: float | None) -> str:
    short, base, long_ = row[1] - row[20], max(row[100], row[150]) - row[20], row[150] - row[20]
    first = ("one token is level with 20" if _level(short, sd) else
             f"one token is {pts(abs(short))} points {'under' if short < 0 else 'over'} 20")
    beyond = ("longer prompts than 20 add nothing beyond one seed's spread" if _level(base, sd) or base < 0 else
              f"the best longer prompt adds {pts(base)} points to 20 tokens")
    worst = min((100, 150), key=lambda length: row[length])
    if row[worst] < row[20] and not _level(row[worst] - row[20], sd):
        beyond += f", though {worst} tokens, one run, falls {pts(row[20] - row[worst])} points under 20"
    holds = (short < 0 and not _level(short, sd)) and (_level(base, sd) or base < 0)
    return (f"Length, {model}: {first}; {beyond} (150 tokens: {pts(long_):s} against 20). "
            f"{'Holds' if holds else 'Does not hold as stated'}: the paper has more than one token matter at small "
            "scale and little gained past 20.")


def _init_finding(model: str, row: dict, sd: float | None) -> str:
    order = sorted(INITS, key=lambda name: -row[name])
    gap = row["class_labels"] - row["random"]
    holds = gap > 0 and not _level(gap, sd)
    return (f"Initialisation, {model}: {' > '.join(f'{name} {pts(row[name])}' for name in order)}; class labels "
            f"against random {pts(gap)} points. {'Holds' if holds else 'Does not hold'}: the paper has class labels "
            "ahead of random by a wide margin at small scale.")


def _ensemble_finding(model: str, row: dict) -> str:
    members, best = row["members"], max(row["members"])
    average = statistics.fmean(members)
    verdict = ("Holds" if row["majority_vote"] > best else
               "Holds in part" if max(row["mean_probability"], row["majority_vote"]) > average else "Does not hold")
    return (f"Ensembles, {model}: the vote {pts(row['majority_vote'])} and mean probability "
            f"{pts(row['mean_probability'])} against the average member {pts(average)} and the best {pts(best)}. "
            f"{verdict}: the paper's vote beats both the average and the best prompt.")


def _shifted(row: dict, method: str, target: str) -> tuple[float, float]:
    """`method`'s accuracy on `target`'s unseen texts: trained on `target`'s own set, and on the other set."""
    other = next(name for name in SETS if name != target)
    return (row[f"{method}:{target}"][target + UNSEEN]["accuracy"],
            row[f"{method}:{other}"][target + UNSEEN]["accuracy"])


def _transfer_finding(model: str, row: dict, sd: float | None) -> str:
    parts, wins, ahead = [], 0, 0
    for target in SETS:
        (own_p, other_p), (own_l, other_l) = _shifted(row, "prompt", target), _shifted(row, "lora", target)
        gap = (own_l - other_l) - (own_p - other_p)
        wins += gap > 0 and not _level(gap, sd)
        ahead += other_p > other_l and not _level(other_p - other_l, sd)
        parts.append(f"on {SETS[target]} the shift costs prompt tuning {pts(own_p - other_p)} points and LoRA "
                     f"{pts(own_l - other_l)}, and from the other set prompt tuning scores {pts(other_p)} against "
                     f"LoRA's {pts(other_l)}")
    verdict = ("Holds" if wins == len(SETS) else "Holds on one of the two sets" if wins else "Does not hold here")
    return (f"Transfer, {model}: {'; '.join(parts)}. {verdict}: the paper has prompt tuning lose less to the shift "
            f"than tuning the model (here prompt tuning is ahead out of domain on {ahead} of {len(SETS)} sets).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "paper"), help="checkpoints (ensemble, transfer)")
    parser.add_argument("--results", default=str(ROOT / "docs" / "paper.json"),
                        help="rows are kept here, and the .md beside it is rewritten")
    parser.add_argument("--quick", action="store_true", help="10 steps, 64 examples scored, to /tmp")
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    if not glue.GLUE.is_dir():
        sys.exit(f"no GLUE data at {glue.GLUE}: this benchmark reads SST-2 in the original GLUE layout")
    steps = {model: 10 for model in STEPS} if args.quick else dict(STEPS)
    if args.quick:
        args.workdir, args.results = "/tmp/paper-quick", "/tmp/paper-quick/paper.json"
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    paper = Paper(Path(args.results), Path(args.workdir), steps, 64 if args.quick else None)
    command = "python benchmarks/paper.py" + (" --quick" if args.quick else "")
    plan = {"length": (length, list(STEPS)), "init": (init, ["minilm-l6"]), "ensemble": (ensemble, list(STEPS)),
            "transfer": (transfer, ["minilm-l6"])}
    # the ensemble first: its five seeds are the yardstick every other table is read against
    order = sorted(EXPERIMENTS, key=lambda name: name != "ensemble")
    results: dict = {}
    for name in order:
        run, models = plan[name]
        results[name] = run(paper, models)
        yardstick = {model: statistics.stdev(row["members"]) if len(row["members"]) > 1 else None
                     for model, row in results.get("ensemble", {}).items()}
        write(Path(args.results).with_suffix(".md"), {k: results[k] for k in EXPERIMENTS if k in results}, paper,
              yardstick, command)
        print(f"RESULT experiment={name} " + json.dumps(results[name], default=str), flush=True)


if __name__ == "__main__":
    main()
