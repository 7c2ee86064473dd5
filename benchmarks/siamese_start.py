"""Where a siamese head starts: dev metrics of the head fitted to the pair's cosine (before any step), per
prompt init, with MiniLM-L6 and 20 virtual tokens. The init that disturbs each text's embedding least starts
closest to the model's own cosine.

    python benchmarks/siamese_start.py --task rte      # or mrpc, stsb (reads ../shared/data/glue)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import transformers

from softprompt.training import TrainConfig, prepare

GLUE = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"
FOLDERS = {"rte": "RTE", "mrpc": "MRPC", "stsb": "STS-B"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="rte", choices=list(FOLDERS))
    parser.add_argument("--prompt-length", type=int, default=20)
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    k = args.prompt_length
    cfg = TrainConfig(model="minilm-l6", data=str(GLUE / FOLDERS[args.task]), task=args.task, prompt_length=k,
                      init="vocab", residual_reparam=0, output=tempfile.mkdtemp(), progress=False)
    trainer = prepare(cfg, log=lambda _: None)
    assert trainer.spec.head_init == "cosine"  # siamese pooling for a pair on a sentence-embedding model
    features = trainer.encoder.encode_all(trainer.splits.train)
    table = trainer.model.base.get_input_embeddings().weight.detach()
    tokenizer = trainer.encoder.tokenizer

    def repeated(text: str) -> torch.Tensor:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return table[(ids * k)[:k]]

    inits = {"sampled vocabulary": trainer.model.prompt.weight.detach().clone(),
             "[SEP] x k": table[[tokenizer.sep_token_id] * k], "[PAD] x k": table[[tokenizer.pad_token_id] * k],
             "'.' x k": repeated("."), "zero vectors": torch.zeros(k, table.shape[1]),
             "'are these two sentences about the same thing?'": repeated("are these two sentences about the same "
                                                                          "thing?")}
    for name, prompt in inits.items():
        with torch.no_grad():
            trainer.model.prompt.weight.copy_(prompt)
        start = time.perf_counter()
        trainer._start_head(features)
        fitted = time.perf_counter() - start
        metrics = ", ".join(f"{m}={v:.4f}" for m, v in trainer.evaluate(trainer.splits.dev).items())
        print(f"{name:<50} dev {metrics}  (fit {fitted:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
