"""Training-step time, activation memory and rank-classification throughput: the no-prompt base, a plain
concat, peft prompt tuning (when installed) and softprompt's shared-prefix engine, side by side in one run.

    python benchmarks/step_time.py                 # SmolLM2-135M, batch 8, inputs 16/64/256, prompts 20/100
    python benchmarks/step_time.py --quick         # one cell, for a smoke check
    python benchmarks/step_time.py --model llama-1b --bf16   # GPU: a Llama-3.2-1B-shaped decoder, random weights

A training step is forward + backward to the prompt (to the input embeddings for the base) with the LM
loss on every real token; the first real token is predicted by the last virtual token in every method.
Memory is what autograd keeps for backward, each storage counted once (weights included, since linear
layers save them), through saved-tensor hooks on CPU, and as peak allocated memory on a GPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from softprompt import PromptTuningConfig, get_prompt_model
from softprompt.assets import describe_model, load_backbone
from softprompt.config import TaskType
from softprompt.data import load_data
from softprompt.encoding import TaskEncoder, pad
from softprompt.scoring import score

try:
    import peft
except ImportError:  # peft is optional: its rows are left out
    peft = None


def saved_mb(fn) -> float:
    """MB that one call of fn (forward and backward) keeps for backward: saved tensors, each storage counted
    once, on CPU; peak allocated memory on a GPU."""
    total, seen = [0], set()

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:  # a weight saved by every layer call is still one tensor in memory
            seen.add(storage.data_ptr())
            total[0] += storage.nbytes()
        return t

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0] / 2**20


def seconds(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(steps: dict, repeats: int) -> dict[str, dict[str, float]]:
    """Per method: median seconds, the median of its per-repeat ratios to every other method, and saved MB.
    Methods take turns within each repeat and ratios pair the calls of one repeat, so a slow spell of this
    shared machine lands on both sides of a ratio rather than on whichever ran during it. Memory comes from
    a separate call, so the hooks that count it do not add to the timed ones."""
    memory = {name: saved_mb(fn) for name, fn in steps.items()}  # also the warm-up
    runs: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            runs[name].append(seconds(fn))
    return {name: {"s": statistics.median(times), "mb": memory[name],
                   **{f"vs {other}": statistics.median(a / b for a, b in zip(times, runs[other])) for other in runs}}
            for name, times in runs.items()}


def train_steps(base, ids, mask, p: int, device, dtype):
    """The four ways to take one training step, as closures."""
    labels = ids.masked_fill(mask == 0, -100)
    embed = base.get_input_embeddings()
    prompt = torch.nn.Parameter(torch.rand(p, embed.embedding_dim, device=device, dtype=dtype) - 0.5)

    def no_prompt():
        x = embed(ids).detach().requires_grad_(True)
        base(inputs_embeds=x, attention_mask=mask, labels=labels).loss.backward()

    def concat():
        x = torch.cat([prompt.unsqueeze(0).expand(ids.shape[0], -1, -1), embed(ids)], dim=1)
        m = torch.cat([mask.new_ones(ids.shape[0], p), mask], dim=1)
        lab = torch.cat([labels.new_full((ids.shape[0], p), -100), labels], dim=1)
        base(inputs_embeds=x, attention_mask=m, labels=lab).loss.backward()

    steps = {"no prompt": no_prompt, "concat": concat}
    if peft is not None:
        peft_model = peft.get_peft_model(base, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=p))
        steps["peft"] = lambda: peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    ours = get_prompt_model(base, PromptTuningConfig(num_virtual_tokens=p, task_type="CAUSAL_LM"))
    ours.to(device=device, dtype=dtype)  # peft wraps `base` without changing it, so both share the weights
    ours.engine.shares(ids.shape[1])  # its one-time check against the concat, outside what is measured
    steps["softprompt"] = lambda: ours.training_loss(input_ids=ids, attention_mask=mask, labels=labels).backward()
    return steps


def rank_throughput(base, tokenizer, p: int, examples, device, batch: int, rounds: int) -> dict[str, float]:
    """Examples per second of rank classification (template + label words) for each method; the methods take
    turns, `rounds` times, and the median rate is kept."""
    from softprompt.tasks import get_task

    task = get_task("sst2")
    encoder = TaskEncoder(tokenizer, task, TaskType.CAUSAL_LM, 128)
    feats = encoder.encode_all(examples)
    label_ids = [ids[0] for ids in encoder.label_ids]
    zero = get_prompt_model(base, PromptTuningConfig(num_virtual_tokens=0, task_type="CAUSAL_LM"))
    ours = get_prompt_model(base, PromptTuningConfig(num_virtual_tokens=p, task_type="CAUSAL_LM"))
    concat = get_prompt_model(base, PromptTuningConfig(num_virtual_tokens=p, task_type="CAUSAL_LM"))
    concat.engine.force_off("benchmark: the concatenated sequence")
    ours.to(device).engine.shares(max(map(len, feats)))  # its one-time check, outside the timed passes
    runs = {name: (lambda m=model: score(m.to(device), encoder, feats, batch))
            for name, model in (("no prompt", zero), ("concat", concat), ("softprompt", ours))}
    if peft is not None:
        peft_model = peft.get_peft_model(base, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=p))

        @torch.inference_mode()
        def peft_run():
            by_length = sorted(feats, key=len)  # batches of similar lengths, as `score` makes for the others
            for i in range(0, len(by_length), batch):
                ids, mask = pad([f.input_ids for f in by_length[i:i + batch]], tokenizer.pad_token_id, side="left")
                ids, mask = ids.to(device), mask.to(device)
                logits = peft_model(input_ids=ids, attention_mask=mask).logits[:, -1]
                torch.log_softmax(logits.float(), -1)[:, label_ids].argmax(-1)

        runs["peft"] = peft_run
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            rates[name].append(len(feats) / (time.perf_counter() - start))
    return {name: statistics.median(r) for name, r in rates.items()}


def llama_1b(device: str, dtype: torch.dtype):
    """A Llama-3.2-1B-shaped decoder with random weights (timing needs the shape, not the training), and
    SmolLM2's tokenizer, whose ids all fall inside its vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_backbone(describe_model("smollm2-135m"), TaskType.CAUSAL_LM).tokenizer
    config = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval().requires_grad_(False)
    return model, tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="a built-in model, or llama-1b (random weights)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--prompts", type=int, nargs="+", default=[20, 100])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--glue", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"))
    parser.add_argument("--infer-examples", type=int, default=128, help="SST-2 dev examples to classify (0: all)")
    parser.add_argument("--rounds", type=int, default=3, help="inference passes per method (median kept)")
    parser.add_argument("--bf16", action="store_true", help="bf16 weights (the GPU setting)")
    parser.add_argument("--quick", action="store_true", help="one cell (64/64), 64 inference examples")
    args = parser.parse_args()
    if args.quick:
        args.lengths, args.prompts, args.infer_examples, args.repeats = [64], [64], 64, 5
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    if args.model == "llama-1b":
        base, tokenizer = llama_1b(device, dtype)
    else:
        backbone = load_backbone(describe_model(args.model), TaskType.CAUSAL_LM)
        base, tokenizer = backbone.model, backbone.tokenizer
    base = base.to(device=device, dtype=dtype)
    where = f"{device} ({torch.cuda.get_device_name() if device == 'cuda' else f'{torch.get_num_threads()} threads'})"
    print(f"# {args.model} {str(dtype)[6:]} on {where}, batch {args.batch}, median of {args.repeats} "
          "repeats; 'vs no prompt' is the median of the per-repeat ratios")
    print("| input | prompt | method | step s | vs no prompt | bound (Bn+p)/Bn | saved MB |")
    print("|---|---|---|---|---|---|---|")
    results = {}
    cells = [(n, p) for n in args.lengths for p in args.prompts]
    if (64, 64) not in cells:
        cells.append((64, 64))  # the cell the RESULT line reports
    for n, p in cells:
        ids = torch.randint(100, base.config.vocab_size - 100, (args.batch, n), device=device)
        mask = torch.ones_like(ids)
        steps = train_steps(base, ids, mask, p, device, dtype)
        cell = measure(steps, args.repeats)
        bound = (args.batch * n + p) / (args.batch * n)
        for name, m in cell.items():
            print(f"| {n} | {p} | {name} | {m['s']:.3f} | {m['vs no prompt']:.2f} | {bound:.3f} | {m['mb']:.0f} |")
        results[(n, p)] = cell
        sys.stdout.flush()
    examples = []
    glue = Path(args.glue)
    if (glue / "SST-2").is_dir():
        examples = load_data(str(glue), "sst2").dev
        examples = examples[: args.infer_examples] if args.infer_examples else examples
    infer_p = max(args.prompts)
    if examples:
        tput = rank_throughput(base, tokenizer, infer_p, examples, device, 32, args.rounds)
        print(f"\n# rank classification, SST-2 dev ({len(examples)} examples), {infer_p} virtual tokens, "
              f"median of {args.rounds} passes")
        print("| method | examples/s | vs no prompt |")
        print("|---|---|---|")
        for name, rate in tput.items():
            print(f"| {name} | {rate:.1f} | {rate / tput['no prompt']:.2f} |")
    else:
        print(f"\n# no SST-2 at {glue}: inference throughput skipped")
        tput = {}
    cell = results[(64, 64)]
    fmt = lambda x: "na" if x is None else f"{x:.3f}"  # noqa: E731
    train_vs_base = cell["softprompt"]["vs no prompt"]
    train_vs_peft = cell["softprompt"]["vs peft"] if "peft" in cell else None
    infer_vs_base = tput["softprompt"] / tput["no prompt"] if tput else None
    infer_vs_peft = tput["softprompt"] / tput["peft"] if tput and "peft" in tput else None
    print(f"RESULT train_vs_base={fmt(train_vs_base)} train_vs_peft={fmt(train_vs_peft)} "
          f"infer_vs_base={fmt(infer_vs_base)} infer_vs_peft={fmt(infer_vs_peft)}")


if __name__ == "__main__":
    main()
