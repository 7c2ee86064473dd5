"""Task specs: input fields, label names, metrics, and the template and verbalizer for text-to-text.

Label names are in the index order the Hugging Face hub uses, so integer labels from the hub, string
labels from the original GLUE files and 0/1 columns all map onto the same indices.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .errors import SoftpromptError


@dataclass
class TaskSpec:
    name: str
    fields: tuple[str, ...]  # input fields, as the template names them
    labels: tuple[str, ...]  # label names by index; empty for regression
    metrics: tuple[str, ...]  # the first one selects the best checkpoint
    template: str = ""  # text-to-text input with {field} slots; the label goes at {label}, or at the end
    verbalizer: tuple[str, ...] = ()  # the words each label is generated as
    hub: tuple[str, str | None] | None = None  # (dataset id, config) on the Hugging Face hub
    hub_splits: tuple[str, ...] = ("train", "validation", "test")
    glue_folder: str | None = None  # folder name in the original GLUE distribution
    glue_files: tuple[str, ...] = ("train.tsv", "dev.tsv", "test.tsv")
    columns: dict[str, tuple[str, ...]] = field(default_factory=dict)  # field/"label" -> accepted column names
    positions: dict[str, int] = field(default_factory=dict)  # for header-less files (CoLA)
    instruction: str = ""  # text that starts the prompt under init='text' when no init text is given
    detokenize: bool = False  # inputs come Penn-Treebank-tokenized and lowercased (SST-2): see natural_text

    def __post_init__(self) -> None:
        self.fields, self.labels, self.metrics = tuple(self.fields), tuple(self.labels), tuple(self.metrics)
        self.verbalizer = tuple(self.verbalizer)
        self.hub = (self.hub[0], self.hub[1]) if self.hub else None
        self.hub_splits, self.glue_files = tuple(self.hub_splits), tuple(self.glue_files)
        self.columns = {k: tuple(v) for k, v in self.columns.items()}
        if not self.template:
            self.template = "\n".join(f"{f.capitalize()}: {{{f}}}" for f in self.fields) + "\nAnswer:"
        if self.labels and not self.verbalizer:
            self.verbalizer = tuple(f" {label}" for label in self.labels)
        if self.labels and len(self.verbalizer) != len(self.labels):
            raise SoftpromptError(f"task {self.name}: {len(self.labels)} labels but {len(self.verbalizer)} label words")
        prefix = self.template.split("{label}", 1)[0]
        missing = [f for f in self.fields if "{" + f + "}" not in prefix]
        if missing:
            raise SoftpromptError(f"template {self.template!r} must place {', '.join('{' + f + '}' for f in missing)} "
                                  "before its {label} slot")
        try:
            self.render({f: "" for f in self.fields})
        except (KeyError, IndexError, ValueError) as err:
            raise SoftpromptError(f"template {self.template!r} does not fit fields {', '.join(self.fields)} ({err!r}); "
                                  "use {field} slots and double any literal braces") from None

    @property
    def is_regression(self) -> bool:
        return not self.labels

    def column_names(self, key: str) -> tuple[str, ...]:
        return self.columns.get(key, ()) + (key,)

    def render(self, fields: dict[str, str]) -> str:
        """The input text: the template up to its {label} slot (the end, when it has none).

        Text after the slot cannot change the label's likelihood under a causal LM, and an
        encoder-decoder generates the label on the decoder side, so only the part before it is kept."""
        return self.template.split("{label}", 1)[0].format(**fields)

    def input_fields(self, fields: dict[str, str]) -> dict[str, str]:
        """An example's fields as the model reads them: the task's own fields detokenized where it says so."""
        return {**fields, **{f: natural_text(fields[f]) for f in self.fields}} if self.detokenize else fields

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TaskSpec":
        return cls(**d)


def label_instruction(labels: tuple[str, ...]) -> str:
    """An instruction naming the labels, for data that brings none (a user's file): it starts a text-to-text
    prompt as a built-in task's instruction does (docs/recipe.md, "Custom data")."""
    names = [label.replace("_", " ") for label in labels]
    return f"Classify the text as {', '.join(names[:-1])} or {names[-1]}.\n\n"


# "does n't" -> "doesn't", "it 's" -> "it's"; "ca n't" and "wo n't" come out right by the same join
_CLITIC = re.compile(r" (n't|'s|'re|'ve|'ll|'d|'m)\b")
_BEFORE_SPACE = re.compile(r" (\.\.\.|[.,:;?!)%])")  # punctuation that attaches to the word before it


def natural_text(text: str) -> str:
    """Penn-Treebank-tokenized, lowercased text (SST-2: "it 's a charming journey . ") as a writer would type
    it ("It's a charming journey."). A pretrained LM read the latter, and scores it better zero-shot
    (docs/recipe.md, "SST-2 inputs as natural text"). Natural text passes through unchanged apart from its
    first letter's case."""
    text = _CLITIC.sub(r"\1", text.strip())
    text = _BEFORE_SPACE.sub(r"\1", text).replace("( ", "(").replace("`` ", '"').replace(" ''", '"')
    return text[:1].upper() + text[1:]


GLUE = "nyu-mll/glue"
SUPER_GLUE = "aps/super_glue"
PAIR = ("sentence1", "sentence2")
YES_NO = (" no", " yes")


MNLI = TaskSpec("mnli", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"), ("accuracy",),
                "Premise: {premise}\nHypothesis: {hypothesis}\nDoes the premise imply the hypothesis? Answer:",
                (" yes", " maybe", " no"), hub=(GLUE, "mnli"),
                hub_splits=("train", "validation_matched", "test_matched"), glue_folder="MNLI",
                glue_files=("train.tsv", "dev_matched.tsv", "test_matched.tsv"),
                columns={"premise": ("sentence1",), "hypothesis": ("sentence2",), "label": ("gold_label",)})


def _builtin() -> dict[str, TaskSpec]:
    tasks = [
        TaskSpec("cola", ("sentence",), ("unacceptable", "acceptable"), ("mcc", "accuracy"),
                 "Sentence: {sentence}\nIs this sentence grammatically correct? Answer:", YES_NO,
                 hub=(GLUE, "cola"), glue_folder="CoLA", positions={"sentence": 3, "label": 1}),
        TaskSpec("sst2", ("sentence",), ("negative", "positive"), ("accuracy",),
                 "Movie review: {sentence}\nThe sentiment of this review is", (" negative", " positive"),
                 hub=(GLUE, "sst2"), glue_folder="SST-2", detokenize=True),
        TaskSpec("mrpc", PAIR, ("not_equivalent", "equivalent"), ("accuracy", "f1"),
                 "Sentence 1: {sentence1}\nSentence 2: {sentence2}\nDo both sentences say the same thing? Answer:",
                 YES_NO, hub=(GLUE, "mrpc"), glue_folder="MRPC",
                 columns={"sentence1": ("#1 String",), "sentence2": ("#2 String",), "label": ("Quality",)}),
        TaskSpec("qqp", ("question1", "question2"), ("not_duplicate", "duplicate"), ("accuracy", "f1"),
                 "Question 1: {question1}\nQuestion 2: {question2}\nDo both questions ask the same thing? Answer:",
                 YES_NO, hub=(GLUE, "qqp"), glue_folder="QQP", columns={"label": ("is_duplicate",)}),
        TaskSpec("stsb", PAIR, (), ("pearson", "spearman"),
                 "Sentence 1: {sentence1}\nSentence 2: {sentence2}\nSimilarity:",
                 hub=(GLUE, "stsb"), glue_folder="STS-B", columns={"label": ("score",)}),
        MNLI,
        replace(MNLI, name="mnli-mm", hub_splits=("train", "validation_mismatched", "test_mismatched"),
                glue_files=("train.tsv", "dev_mismatched.tsv", "test_mismatched.tsv")),
        TaskSpec("qnli", ("question", "sentence"), ("entailment", "not_entailment"), ("accuracy",),
                 "Question: {question}\nSentence: {sentence}\nDoes the sentence answer the question? Answer:",
                 (" yes", " no"), hub=(GLUE, "qnli"), glue_folder="QNLI"),
        TaskSpec("rte", PAIR, ("entailment", "not_entailment"), ("accuracy",),
                 "{sentence1}\nQuestion: {sentence2} True or False?\nAnswer:", (" True", " False"),
                 hub=(GLUE, "rte"), glue_folder="RTE"),
        TaskSpec("wnli", PAIR, ("not_entailment", "entailment"), ("accuracy",),
                 "{sentence1}\nQuestion: {sentence2} True or False?\nAnswer:", (" False", " True"),
                 hub=(GLUE, "wnli"), glue_folder="WNLI"),
        TaskSpec("boolq", ("passage", "question"), ("False", "True"), ("accuracy",),
                 "Passage: {passage}\nQuestion: {question}?\nAnswer:", YES_NO, hub=(SUPER_GLUE, "boolq")),
        TaskSpec("cb", ("premise", "hypothesis"), ("entailment", "contradiction", "neutral"),
                 ("accuracy", "macro_f1"),
                 "{premise}\nQuestion: {hypothesis} True, False, or Neither?\nAnswer:",
                 (" True", " False", " Neither"), hub=(SUPER_GLUE, "cb")),
        TaskSpec("superglue-rte", ("premise", "hypothesis"), ("entailment", "not_entailment"), ("accuracy",),
                 "{premise}\nQuestion: {hypothesis} True or False?\nAnswer:", (" True", " False"),
                 hub=(SUPER_GLUE, "rte")),
        TaskSpec("wic", ("sentence1", "sentence2", "word"), ("False", "True"), ("accuracy",),
                 "Sentence 1: {sentence1}\nSentence 2: {sentence2}\n"
                 "Is '{word}' used with the same meaning in both sentences? Answer:", YES_NO,
                 hub=(SUPER_GLUE, "wic")),
        TaskSpec("rotten_tomatoes", ("text",), ("negative", "positive"), ("accuracy",),
                 "Movie review: {text}\nThe sentiment of this review is", (" negative", " positive")),
    ]
    instructions = {
        "cola": "Grammar check.\n\n", "sst2": "Sentiment analysis of movie reviews.\n\n",
        "mrpc": "Paraphrase detection.\n\n", "qqp": "Duplicate question detection.\n\n",
        "mnli": "Natural language inference.\n\n", "mnli-mm": "Natural language inference.\n\n",
        "qnli": "Question answering inference.\n\n", "rte": "Textual entailment.\n\n",
        "wnli": "Textual entailment.\n\n", "boolq": "Yes/no questions about a passage.\n\n",
        "cb": "Textual entailment.\n\n", "superglue-rte": "Textual entailment.\n\n",
        "wic": "Word sense disambiguation.\n\n", "rotten_tomatoes": "Sentiment analysis of movie reviews.\n\n",
    }
    for t in tasks:
        t.instruction = instructions.get(t.name, "")
    return {t.name: t for t in tasks}


TASKS: dict[str, TaskSpec] = _builtin()


def get_task(name: str) -> TaskSpec:
    try:
        return TaskSpec.from_dict(TASKS[name.lower()].to_dict())  # a copy: callers may change template/verbalizer
    except KeyError:
        raise SoftpromptError(f"unknown task {name!r}; built-in tasks: {', '.join(TASKS)}") from None
