"""Training-step time, activation memory and rank-classification throughput: the no-prompt base, a plain
concat, peft prompt tuning and prefix tuning (when installed) and softprompt's prompt and prefix through its
shared-prefix engine, side by side in one run.

    python benchmarks/step_time.py                 # SmolLM2-135M, batch 8, inputs 16/64/256, prompts 20/100
    python benchmarks/step_time.py --quick         # one cell (64/64), for a smoke check
    python benchmarks/step_time.py --model llama-8b --bf16 --lengths 512 --prompts 100   # GPU: a Llama-3.1-8B
                                                   # shape, random weights (also smollm2-shape, llama-1b)

A training step is forward + backward to what trains (the input embeddings for the base) with the LM loss on
every real token a method can predict. Every row takes its loss through softprompt's chunked LM loss
(engine/lm_loss.py: the frozen head chunk by chunk, no logits kept for backward), so each ratio is what the
prompt itself costs rather than a difference in how the loss is taken:

- no prompt: the frozen backbone over the rows' embeddings (made leaves that take a gradient), its final states
  through the chunked loss; it predicts tokens 2..n of each row.
- concat: prompt vectors + the rows' embeddings as one sequence per row through the backbone, then the chunked loss.
- peft: peft's prompt tuning model run as peft runs it (its own forward: prompt concatenated per row), the LM
  head asked for the last column only (`logits_to_keep=1`) and the backbone's final states, caught by a forward
  hook, through the chunked loss.
- softprompt: `DecoderPromptModel.training_loss` (the engine's packed step and its chunked loss).
- peft prefix: peft's prefix tuning (`PrefixTuningConfig`, no projection) the same way as peft: its own forward
  (keys/values copied per row into the cache), final states through the chunked loss.
- softprompt prefix: `PrefixDecoderModel.training_loss` (`method="prefix"`: rows after the prefix's
  keys/values through the engine, its chunked loss).
The first three prompt rows and softprompt's predict every token (the first from the last virtual token); a
prefix has no output state before a row, so the prefix rows, like the base, predict tokens 2..n. Each prompt
row starts from peft's prompt, each prefix row from peft's prefix, and the script stops unless the rows of a
group give the same loss, so every row of a group computes the same thing.

Memory is what autograd keeps for backward, each storage counted once (weights included, since linear layers
save them), through saved-tensor hooks on CPU, and as peak allocated memory on a GPU. Inference is rank
classification of SST-2 dev rows (label words after the template): softprompt's models through
`scoring.score`, peft's through their own forward with the LM head on the last column only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from softprompt import PromptTuningConfig, get_prompt_model
from softprompt.assets import describe_model, load_backbone
from softprompt.config import TaskType
from softprompt.data import load_data
from softprompt.encoding import TaskEncoder, pad
from softprompt.engine.lm_loss import lm_cross_entropy
from softprompt.scoring import score

try:
    import peft
except ImportError:  # peft is optional: its rows are left out
    peft = None

PROMPT_ROWS = ("concat", "peft", "softprompt")  # what each group of rows must agree on: the same loss
PREFIX_ROWS = ("peft prefix", "softprompt prefix")


def saved_mb(fn) -> tuple[float, float]:
    """MB that one call of fn (forward and backward) keeps for backward: saved tensors, each storage counted
    once, on CPU; peak allocated memory on a GPU. Also fn's return value (its loss)."""
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
        value = fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20, value
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        value = fn()
    return total[0] / 2**20, value


def seconds(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(steps: dict, repeats: int) -> dict[str, dict[str, float]]:
    """Per method: median seconds, the median of its per-repeat ratios to every other method, saved MB and its
    loss. Methods take turns within each repeat and ratios pair the calls of one repeat, so a slow spell of
    this shared machine lands on both sides of a ratio rather than on whichever ran during it. Memory comes
    from a separate call, so the hooks that count it do not add to the timed ones."""
    first = {name: saved_mb(fn) for name, fn in steps.items()}  # also the warm-up
    runs: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            runs[name].append(seconds(fn))
    return {name: {"s": statistics.median(times), "mb": first[name][0], "loss": first[name][1],
                   **{f"vs {other}": statistics.median(a / b for a, b in zip(times, runs[other])) for other in runs}}
            for name, times in runs.items()}


def final_states(backbone: torch.nn.Module, run) -> torch.Tensor:
    """The backbone's final states (B, length, d) during `run()`, caught by a forward hook: how a peft model's
    own forward hands them to the chunked loss."""
    caught = []
    handle = backbone.register_forward_hook(lambda module, args, out: caught.append(out.last_hidden_state))
    try:
        run()
    finally:
        handle.remove()
    return caught[-1]


def backward(loss: torch.Tensor) -> float:
    loss.backward()
    return loss.item()


def train_steps(base, ids, mask, p: int, device, dtype):
    """The ways to take one training step, as closures returning the loss (see the module docstring)."""
    labels = ids.masked_fill(mask == 0, -100)
    embed, backbone = base.get_input_embeddings(), base.base_model
    ours = get_prompt_model(base, PromptTuningConfig(num_virtual_tokens=p, task_type="CAUSAL_LM"))
    ours_prefix = get_prompt_model(base, PromptTuningConfig(num_virtual_tokens=p, task_type="CAUSAL_LM",
                                                            method="prefix"))
    scale = ours.engine.logit_scale()

    def step(before: torch.Tensor, targets: torch.Tensor) -> float:
        """The chunked LM loss of `targets` (B, n; -100: none) from the states that predict them, and backward."""
        labelled = targets != -100
        return backward(lm_cross_entropy(before[labelled], base.get_output_embeddings(), targets[labelled], scale))

    def no_prompt():
        x = embed(ids).detach().requires_grad_(True)
        return step(backbone(inputs_embeds=x, attention_mask=mask).last_hidden_state[:, :-1], labels[:, 1:])

    steps = {"no prompt": no_prompt}
    if peft is not None:
        peft_prompt = peft.get_peft_model(base, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=p))
        peft_prefix = peft.get_peft_model(base, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=p))
        with torch.no_grad():  # the same starting point, so each group's rows compute the same loss
            ours.prompt.weight.copy_(peft_prompt.prompt_encoder["default"].embedding.weight)
            ours_prefix.prompt.weight.copy_(peft_prefix.prompt_encoder["default"].embedding.weight)
    else:
        with torch.no_grad():
            ours.prompt.weight.normal_()
            ours_prefix.prompt.weight.normal_()
    ours.to(device=device, dtype=dtype)  # peft wraps `base` without changing it, so all share the weights
    ours_prefix.to(device=device, dtype=dtype)
    prompt = torch.nn.Parameter(ours.prompt.weight.detach().clone())

    def concat():
        x = torch.cat([prompt.unsqueeze(0).expand(ids.shape[0], -1, -1), embed(ids)], dim=1)
        m = torch.cat([mask.new_ones(ids.shape[0], p), mask], dim=1)
        return step(backbone(inputs_embeds=x, attention_mask=m).last_hidden_state[:, p - 1:-1], labels)

    steps["concat"] = concat
    if peft is not None:
        steps["peft"] = lambda: step(final_states(backbone, lambda: peft_prompt(
            input_ids=ids, attention_mask=mask, logits_to_keep=1))[:, p - 1:-1], labels)
    ours.engine.shares(ids.shape[1])  # its one-time check against the concat, outside what is measured
    steps["softprompt"] = lambda: backward(ours.training_loss(input_ids=ids, attention_mask=mask, labels=labels))
    if peft is not None:
        steps["peft prefix"] = lambda: step(final_states(backbone, lambda: peft_prefix(
            input_ids=ids, attention_mask=mask, logits_to_keep=1))[:, :-1], labels[:, 1:])
    prefix_labels = labels.clone()
    prefix_labels[:, 0] = -100  # nothing before a row predicts its first token under a prefix
    ours_prefix.engine.shares(ids.shape[1])
    steps["softprompt prefix"] = lambda: backward(ours_prefix.training_loss(
        input_ids=ids, attention_mask=mask, labels=prefix_labels))
    return steps


def check_losses(cell: dict[str, dict[str, float]], dtype: torch.dtype) -> None:
    """Stop unless the rows of each group computed the same loss (they start from the same prompt or prefix)."""
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    for group in (PROMPT_ROWS, PREFIX_ROWS):
        losses = {name: cell[name]["loss"] for name in group if name in cell}
        if len(losses) > 1 and max(losses.values()) - min(losses.values()) > tolerance * max(losses.values()):
            sys.exit(f"these rows should compute the same loss but do not: {losses}")


def peft_scorer(model, feats, label_ids, pad_id: int, device, batch: int):
    """Rank classification of `feats` by a peft model's own forward, the LM head on the last column only."""
    @torch.inference_mode()
    def run():
        by_length = sorted(feats, key=len)  # batches of similar lengths, as `score` makes for the others
        for i in range(0, len(by_length), batch):
            ids, mask = pad([f.input_ids for f in by_length[i:i + batch]], pad_id, side="left")
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), logits_to_keep=1).logits[:, -1]
            torch.log_softmax(logits.float(), -1)[:, label_ids].argmax(-1)

    return run


def rank_throughput(base, tokenizer, p: int, examples, device, batch: int, rounds: int) -> dict[str, float]:
    """Examples per second of rank classification (template + label words) for each method; the methods take
    turns, `rounds` times, and the median rate is kept."""
    from softprompt.tasks import get_task

    task = get_task("sst2")
    encoder = TaskEncoder(tokenizer, task, TaskType.CAUSAL_LM, 128)
    feats = encoder.encode_all(examples)
    label_ids = [ids[0] for ids in encoder.label_ids]
    build = lambda k, method="prompt": get_prompt_model(  # noqa: E731
        base, PromptTuningConfig(num_virtual_tokens=k, task_type="CAUSAL_LM", method=method)).to(device)
    models = {"no prompt": build(0), "concat": build(p), "softprompt": build(p),
              "softprompt prefix": build(p, "prefix")}
    models["concat"].engine.force_off("benchmark: the concatenated sequence")
    runs = {}
    for name, ours in models.items():
        with torch.no_grad():
            ours.prompt.weight.normal_()
        ours.engine.shares(max(map(len, feats)))  # its one-time check, outside the timed passes
        runs[name] = lambda m=ours: score(m, encoder, feats, batch)
    if peft is not None:
        for name, config in (("peft", peft.PromptTuningConfig), ("peft prefix", peft.PrefixTuningConfig)):
            wrapped = peft.get_peft_model(base, config(task_type="CAUSAL_LM", num_virtual_tokens=p))
            runs[name] = peft_scorer(wrapped, feats, label_ids, tokenizer.pad_token_id, device, batch)
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            rates[name].append(len(feats) / (time.perf_counter() - start))
    return {name: statistics.median(r) for name, r in rates.items()}


SHAPES = {  # decoders built from configs with random weights: timing needs the shape, not the training
    "smollm2-shape": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
    "llama-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
}


def shaped(name: str, device: str, dtype: torch.dtype):
    """A Llama-architecture decoder of one of SHAPES (SmolLM2-135M, Llama-3.2-1B, Llama-3.1-8B), random weights,
    built on `device` in `dtype`; no tokenizer (the training rows are random ids)."""
    config = LlamaConfig(max_position_embeddings=4096, rope_theta=500000.0, pad_token_id=0, **SHAPES[name])
    with torch.device(device):
        return LlamaForCausalLM._from_config(config, torch_dtype=dtype).eval().requires_grad_(False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m",
                        help=f"a built-in model, or a shape with random weights: {', '.join(SHAPES)}")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--prompts", type=int, nargs="+", default=[20, 100])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--glue", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"))
    parser.add_argument("--infer-examples", type=int, default=128, help="SST-2 dev examples to classify (0: none)")
    parser.add_argument("--rounds", type=int, default=3, help="inference passes per method (median kept)")
    parser.add_argument("--bf16", action="store_true", help="bf16 weights (the GPU setting)")
    parser.add_argument("--quick", action="store_true", help="one cell (64/64), 64 inference examples")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="the GPU's dense bf16 peak, for the share of it a step uses (H100/H200 SXM: 989)")
    args = parser.parse_args()
    if args.quick:
        args.lengths, args.prompts, args.infer_examples, args.repeats = [64], [64], 64, 5
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    tokenizer = None
    if args.model in SHAPES:
        base = shaped(args.model, device, dtype)
    else:
        backbone = load_backbone(describe_model(args.model), TaskType.CAUSAL_LM)
        base, tokenizer = backbone.model.to(device=device, dtype=dtype), backbone.tokenizer
    params = sum(p.numel() for p in base.parameters())
    where = f"{device} ({torch.cuda.get_device_name() if device == 'cuda' else f'{torch.get_num_threads()} threads'})"
    print(f"# {args.model} ({params / 1e9:.2f}B parameters) {str(dtype)[6:]} on {where}, batch {args.batch}, median "
          f"of {args.repeats} repeats; 'vs no prompt' is the median of the per-repeat ratios; memory: "
          f"{'peak allocated' if device == 'cuda' else 'saved for backward'}")
    print("| input | prompt | method | step s | tokens/s | vs no prompt | bound (Bn+p)/Bn | memory MB |")
    print("|---|---|---|---|---|---|---|---|")
    results = {}
    cells = [(n, p) for n in args.lengths for p in args.prompts]
    if not args.quick and (64, 64) not in cells and device == "cpu":
        cells.append((64, 64))  # the cell the CPU RESULT lines report
    for n, p in cells:
        ids = torch.randint(100, base.config.vocab_size - 100, (args.batch, n), device=device)
        mask = torch.ones_like(ids)
        cell = measure(train_steps(base, ids, mask, p, device, dtype), args.repeats)
        check_losses(cell, dtype)
        bound = f"{(args.batch * n + p) / (args.batch * n):.3f}"
        for name, m in cell.items():  # the bound is a prompt's run once per step; a prefix runs no tokens
            print(f"| {n} | {p} | {name} | {m['s']:.3f} | {args.batch * n / m['s']:.0f} | {m['vs no prompt']:.2f} | "
                  f"{'-' if name in PREFIX_ROWS else bound} | {m['mb']:.0f} |")
        results[(n, p)] = cell
        sys.stdout.flush()
    if device == "cuda":
        gpu_results(results, args, params)
        return
    examples = []
    glue = Path(args.glue)
    if (glue / "SST-2").is_dir() and tokenizer is not None and args.infer_examples:
        examples = load_data(str(glue), "sst2").dev
        examples = examples[: args.infer_examples]
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
        print(f"\n# inference throughput skipped: no SST-2 at {glue}, or a shape without a tokenizer")
        tput = {}
    cell = results[(64, 64)]
    fmt = lambda x: "na" if x is None else f"{x:.3f}"  # noqa: E731

    def ratios(ours: str, theirs: str) -> tuple[float, float | None, float | None, float | None, float | None]:
        """Our row against the base and peft's row: step time, peft's only, and inference."""
        has_peft = theirs in cell
        return (cell[ours]["vs no prompt"], cell[ours][f"vs {theirs}"] if has_peft else None,
                cell[ours]["mb"] / cell[theirs]["mb"] if has_peft else None,
                tput[ours] / tput["no prompt"] if tput else None,
                tput[ours] / tput[theirs] if tput and theirs in tput else None)

    train, train_peft, _, infer, infer_peft = ratios("softprompt", "peft")
    print(f"RESULT train_vs_base={fmt(train)} train_vs_peft={fmt(train_peft)} "
          f"infer_vs_base={fmt(infer)} infer_vs_peft={fmt(infer_peft)}")
    train, train_peft, saved, infer, infer_peft = ratios("softprompt prefix", "peft prefix")
    print(f"RESULT prefix_train_vs_base={fmt(train)} prefix_train_vs_peft={fmt(train_peft)} "
          f"prefix_saved_vs_peft={fmt(saved)} prefix_infer_vs_base={fmt(infer)} prefix_infer_vs_peft={fmt(infer_peft)}")


def gpu_results(results: dict, args, params: int) -> None:
    """The GPU's RESULT line, for each cell: our step against the frozen model's forward and backward to the input
    embeddings and against peft's, and the share of the GPU's bf16 peak our step uses, counting its useful work as
    4 x parameters x tokens (a forward, and a backward to the activations only: the frozen weights take no
    gradient)."""
    for (n, p), cell in results.items():
        ours = cell["softprompt"]
        share = 4 * params * args.batch * n / ours["s"] / (args.peak_tflops * 1e12)
        vs_peft = ours["vs peft"] if "peft" in cell else float("nan")
        print(f"RESULT gpu model={args.model} input={n} prompt={p} train_vs_base={ours['vs no prompt']:.3f} "
              f"train_vs_peft={vs_peft:.3f} peak_share={share:.3f} step_s={ours['s']:.4f} "
              f"tokens_per_s={args.batch * n / ours['s']:.0f} memory_mb={ours['mb']:.0f} "
              f"peft_memory_mb={cell['peft']['mb'] if 'peft' in cell else float('nan'):.0f}")


if __name__ == "__main__":
    main()
