"""Rank classification with many multi-token label strings against two one-token ones, per input token: a
rank-loss training step (forward + backward to the prompt) and an evaluation scoring pass, on the same inputs.

    flock /tmp/bench.lock nice -n -10 env OMP_NUM_THREADS=2 python benchmarks/label_scoring.py
    python benchmarks/label_scoring.py --labels dotted    # the 20 newsgroups' own names (3-10 tokens)
    python benchmarks/label_scoring.py --length 200       # long texts, as a news or forum post would be

The two tasks share their template and inputs (SST-2 dev sentences and RTE training premises, the rows whose
input comes closest to `--length` tokens), so the ratio of their times is the ratio per input token. "bound" is
what exact scoring must run per row at least, (n + trie nodes) / n: a label string's token j is predicted by
the state after its first j tokens, so every distinct proper prefix of the label strings runs once per row (the
LM head over those states comes on top). Tasks and steps take turns within each repeat; each ratio is the median
of the per-repeat ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from softprompt import PromptTuningConfig, get_prompt_model
from softprompt.assets import describe_model, load_backbone
from softprompt.config import PromptInit, TaskType
from softprompt.data import Example, load_data
from softprompt.encoding import Feature, TaskEncoder
from softprompt.scoring import label_scores, score
from softprompt.tasks import TaskSpec, natural_text

TEMPLATE = "Text: {text}\nLabel:"
# the 20 newsgroups as plain category names, 2-6 SmolLM2 tokens each
NAMED = ("atheism and religion", "computer graphics", "microsoft windows operating system", "ibm pc hardware",
         "apple macintosh computer hardware", "x window system for unix", "things for sale", "cars and automobiles",
         "motorcycles and bikes", "baseball games", "ice hockey", "cryptography and security",
         "electronics and circuits", "medicine and health", "space and astronomy", "christianity", "gun politics",
         "politics of the middle east", "politics in general", "religion in general")
DOTTED = ("alt.atheism", "comp.graphics", "comp.os.ms-windows.misc", "comp.sys.ibm.pc.hardware",
          "comp.sys.mac.hardware", "comp.windows.x", "misc.forsale", "rec.autos", "rec.motorcycles",
          "rec.sport.baseball", "rec.sport.hockey", "sci.crypt", "sci.electronics", "sci.med", "sci.space",
          "soc.religion.christian", "talk.politics.guns", "talk.politics.mideast", "talk.politics.misc",
          "talk.religion.misc")


def task(name: str, labels: tuple[str, ...]) -> TaskSpec:
    return TaskSpec(name, ("text",), labels, ("accuracy",), template=TEMPLATE)


def inputs(tokenizer, glue: Path, rows: int, length: int) -> list[Example]:
    """The texts whose templated input comes closest to `length` tokens: SST-2 dev sentences, and RTE's training
    premises for the long inputs that SST-2 lacks."""
    texts = [e.fields["sentence"] for e in load_data(str(glue / "SST-2"), "sst2").dev]
    texts += [e.fields["sentence1"] for e in load_data(str(glue / "RTE"), "rte").train]
    sentences = [natural_text(t) for t in texts]
    size = {s: len(tokenizer(TEMPLATE.format(text=s))["input_ids"]) for s in sentences}
    chosen = sorted(sentences, key=lambda s: abs(size[s] - length))[:rows]
    return [Example({"text": s}, i % 2) for i, s in enumerate(chosen)]


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=60, help="input tokens per row (template included), about")
    parser.add_argument("--prompt", type=int, default=20, help="virtual tokens")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--labels", choices=["named", "dotted"], default="named",
                        help="the 20 labels: plain category names (2-6 tokens) or the newsgroups' dotted names")
    parser.add_argument("--glue", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"))
    args = parser.parse_args()
    torch.manual_seed(0)
    backbone = load_backbone(describe_model("smollm2-135m"), TaskType.CAUSAL_LM)
    base, tokenizer = backbone.model, backbone.tokenizer
    examples = inputs(tokenizer, Path(args.glue), args.batch, args.length)
    many = NAMED if args.labels == "named" else DOTTED
    encoders = {"two": TaskEncoder(tokenizer, task("two", ("negative", "positive")), TaskType.CAUSAL_LM, 256),
                "many": TaskEncoder(tokenizer, task("many", many), TaskType.CAUSAL_LM, 256)}
    features: dict[str, list[Feature]] = {name: enc.encode_all(examples) for name, enc in encoders.items()}
    assert [f.input_ids for f in features["two"]] == [f.input_ids for f in features["many"]], "the same inputs"
    model = get_prompt_model(base, PromptTuningConfig(num_virtual_tokens=args.prompt, task_type=TaskType.CAUSAL_LM,
                                                      init=PromptInit.VOCAB), tokenizer,
                             generator=torch.Generator().manual_seed(0))
    tokens = sum(len(f.input_ids) for f in features["two"])
    gold = torch.tensor([e.label for e in examples])

    def train(name: str) -> None:
        model.train()
        loss = torch.nn.functional.cross_entropy(label_scores(model, encoders[name], features[name]).float(),
                                                 gold % len(encoders[name].label_ids))
        loss.backward()
        model.zero_grad(set_to_none=True)

    def evaluate(name: str) -> None:
        score(model, encoders[name], features[name], batch_size=args.batch)

    runs = {(name, kind): (lambda n=name, f=fn: f(n)) for name in encoders for kind, fn in
            (("train", train), ("eval", evaluate))}
    for run in runs.values():  # warm-up, and the engine's one-time probe
        run()
    times: dict[tuple[str, str], list[float]] = {key: [] for key in runs}
    for _ in range(args.repeats):
        for key, run in runs.items():
            times[key].append(seconds(run))

    print(f"# smollm2-135m float32 on cpu ({torch.get_num_threads()} threads), batch {args.batch}, "
          f"{tokens / args.batch:.1f} input tokens per row, {args.prompt} virtual tokens, "
          f"median of {args.repeats} repeats")
    print("| labels | label tokens | trie nodes | bound | train step s | train tokens/s | eval s | eval tokens/s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, enc in encoders.items():
        lengths = [len(ids) for ids in enc.label_ids]
        nodes = len({tuple(ids[:j]) for ids in enc.label_ids for j in range(1, len(ids))})  # proper prefixes
        train_s, eval_s = (statistics.median(times[name, kind]) for kind in ("train", "eval"))
        print(f"| {len(lengths)} | {min(lengths)}-{max(lengths)} (sum {sum(lengths)}) | {nodes} | "
              f"{(tokens + args.batch * nodes) / tokens:.2f} | {train_s:.3f} | {tokens / train_s:.0f} | "
              f"{eval_s:.3f} | {tokens / eval_s:.0f} |")
    ratio = {kind: statistics.median(m / t for m, t in zip(times["many", kind], times["two", kind]))
             for kind in ("train", "eval")}
    print(f"RESULT many_vs_two_train={ratio['train']:.2f} many_vs_two_eval={ratio['eval']:.2f}")


if __name__ == "__main__":
    main()
