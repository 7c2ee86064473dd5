"""Recipe defaults chosen by measurement: class-balanced losses (the weights, the weighted loss against a
hand-built one, when `auto` applies), mean pooling for sentence-embedding models, fitted head starts
(siamese cosine, ridge readout) and learning rates per head kind."""
import json
import random
import shutil

import pytest
import torch
from transformers import LlamaForSequenceClassification, RobertaConfig, RobertaForSequenceClassification

from softprompt import PromptTuningConfig, SoftpromptError, TrainConfig, get_prompt_model, get_task
from softprompt.encoding import collate
from softprompt.scoring import label_scores
from softprompt.assets import ModelInfo, describe_model, pools_by_mean
from softprompt.config import PromptInit
from softprompt.models.base import PromptModel
from softprompt.spec import resolve
from softprompt.training import Trainer, class_weights, prepare

from .conftest import _llama_config, labelled_csv
from .test_checkpoint import legacy_run


@pytest.fixture
def skewed_csv(tmp_path) -> str:
    """Three positive rows to every negative one."""
    return labelled_csv(tmp_path / "skewed.csv", [("the film was good", "positive", 60),
                                                  ("the film was bad", "negative", 20)])


def _trainer(model_dir: str, data: str, tmp_path, **options) -> Trainer:
    return prepare(TrainConfig(model=model_dir, data=data, prompt_length=4, output=str(tmp_path / "run"),
                               progress=False, **options), log=lambda _: None)


def _expected_weights(trainer: Trainer) -> torch.Tensor:
    labels = [e.label for e in trainer.splits.train]
    counts = torch.tensor([labels.count(c) for c in range(len(trainer.splits.task.labels))], dtype=torch.float)
    assert counts.min() < counts.max()  # the split is skewed, so weighting changes the loss
    return len(labels) / (len(counts) * counts)


def _weighted_ce(logits: torch.Tensor, labels: list[int], weights: torch.Tensor) -> torch.Tensor:
    per_row = -torch.log_softmax(logits.float(), -1)[torch.arange(len(labels)), labels]
    w = weights[labels]
    return (w * per_row).sum() / w.sum()


@pytest.mark.parametrize("model", ["bert", "llama"])
def test_balanced_loss_equals_a_hand_weighted_cross_entropy(tiny_dirs, skewed_csv, tmp_path, model):
    trainer = _trainer(tiny_dirs[model], skewed_csv, tmp_path, class_weights="balanced")
    weights = _expected_weights(trainer)
    torch.testing.assert_close(trainer.class_weights, weights)
    features = trainer.encoder.encode_all(trainer.splits.train[:12])
    labels = [f.label for f in features]
    assert len(set(labels)) == 2
    trainer.model.eval()  # no dropout, so the hand-built logits are the trainer's
    with torch.no_grad():
        if trainer.encoder.text_to_text:
            logits = label_scores(trainer.model, trainer.encoder, features)
        else:
            batch = collate(features, trainer.encoder)
            batch.pop("labels")
            logits = trainer.model(**batch).logits
        loss = trainer.loss(features)
        unweighted = torch.nn.functional.cross_entropy(logits.float(), torch.tensor(labels))
    torch.testing.assert_close(loss, _weighted_ce(logits, labels, weights), rtol=1e-5, atol=1e-6)
    assert abs(float(loss) - float(unweighted)) > 1e-4  # the weights really changed it


def test_auto_balances_mcc_tasks_only(skewed_csv):
    train = [type("E", (), {"label": label})() for label in [0] * 10 + [1] * 30]
    cola, sst2 = get_task("cola"), get_task("sst2")
    decoder = ModelInfo("m", "m", None, "decoder")

    def mode(task, **options) -> str:
        return resolve(TrainConfig(**options), decoder, task).class_weights

    assert mode(cola) == "balanced"
    torch.testing.assert_close(class_weights(train, cola.labels), torch.tensor([2.0, 2.0 / 3.0]))
    assert mode(sst2) == "none"
    assert mode(cola, loss="lm") == "none"  # the LM loss is unweighted
    assert mode(cola, class_weights="none", task_type="SEQ_CLS") == "none"


def test_balanced_weights_refuse_what_they_cannot_weight(tiny_dirs, skewed_csv, tmp_path):
    with pytest.raises(SoftpromptError, match="--loss rank"):
        _trainer(tiny_dirs["llama"], skewed_csv, tmp_path, class_weights="balanced", loss="lm")
    with pytest.raises(SoftpromptError, match="auto, none or balanced"):
        TrainConfig(class_weights="inverse")


def test_sentence_embedding_models_pool_by_the_mean_by_default(tiny_dirs, tmp_path):
    folder = tmp_path / "sentence-model"
    shutil.copytree(tiny_dirs["bert"], folder)
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    sst2, mrpc, stsb = get_task("sst2"), get_task("mrpc"), get_task("stsb")

    def prompt(model, task, **options):
        return resolve(TrainConfig(model=model, task_type="SEQ_CLS", **options), describe_model(model), task).prompt

    def pooling(model, task, **options):
        return prompt(model, task, **options).pooling

    assert pooling(str(folder), sst2) == "mean"
    assert pooling(str(folder), mrpc) == "siamese"  # a classified pair: each text pooled apart, then compared
    assert pooling(str(folder), stsb) == "siamese"  # a scored pair too: its head starts at the pair's cosine
    assert pooling(tiny_dirs["bert"], sst2) == pooling(tiny_dirs["bert"], mrpc) == "cls"  # no pooling config
    assert pooling(str(folder), sst2, pooling="cls") == "cls"  # what the user asks for wins
    assert pools_by_mean("minilm-l6")  # the embedded all-MiniLM-L6-v2 is such a model
    pair = prompt(str(folder), mrpc)
    assert (pair.init, pair.init_text) == (PromptInit.TEXT, ".")  # a pair's prompt starts as punctuation
    assert prompt(str(folder), sst2).init is PromptInit.VOCAB
    assert prompt(str(folder), mrpc, init="vocab").init is PromptInit.VOCAB


def _pair_folder(tmp_path, name: str, label) -> str:
    folder = tmp_path / name
    folder.mkdir()
    for split, n in (("train", 40), ("dev", 8)):
        rows = [f"{i}\tthe cat sat on the mat {i}\t{'the cat sat' if i % 2 else 'a dog ran far away'}\t{label(i)}"
                for i in range(n)]
        (folder / f"{split}.tsv").write_text("\n".join([f"index\tsentence1\tsentence2\t{label(None)}"] + rows))
    return str(folder)


@pytest.mark.parametrize("task", ["rte", "stsb"])
def test_siamese_head_starts_as_the_pair_cosine_fitted_to_the_labels(tiny_dirs, tmp_path, task):
    """Before the first step the head is w_c * cos(u, v) + b_c: the cross-entropy minimum over (w, b) for
    classes, the least-squares line for a score; nothing else of [u, v, |u - v|, u * v] is read yet."""
    label = ({"rte": lambda i: "label" if i is None else ("entailment", "not_entailment")[i % 3 == 0],
              "stsb": lambda i: "score" if i is None else f"{(i * 7) % 6:.1f}"})[task]
    trainer = _trainer(tiny_dirs["bert"], _pair_folder(tmp_path, task, label), tmp_path, task=task,
                       pooling="siamese", task_type="SEQ_CLS")
    model, features = trainer.model, trainer.encoder.encode_all(trainer.splits.train)
    trainer._start_head(features)
    model.eval()
    with torch.no_grad():
        inputs = collate(features, trainer.encoder)
        u, v = model.pair_embeddings(inputs["input_ids"], inputs["attention_mask"], inputs["pair_ids"],
                                     inputs["pair_mask"])
        logits = model(**inputs).logits.double()
    cos, head = (u * v).sum(-1).double(), model.head
    w, b = head.weight[:, -32:].double(), head.bias.detach().double()
    assert not head.weight[:, :-32].any() and torch.equal(w, w[:, :1].expand_as(w))
    torch.testing.assert_close(logits, cos[:, None] * w[:, 0] + b, atol=1e-5, rtol=0)
    labels = inputs["labels"]
    if task == "stsb":
        design = torch.stack([cos, torch.ones_like(cos)], 1)
        want = torch.linalg.lstsq(design, labels.double()[:, None]).solution[:, 0]
        torch.testing.assert_close(torch.stack([w[0, 0], b[0]]), want, atol=1e-4, rtol=0)
    else:
        params = torch.cat([w[:, 0], b]).requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(cos[:, None] * params[:2] + params[2:], labels)
        (grad,) = torch.autograd.grad(loss, params)
        assert grad.abs().max() < 1e-4  # the fitted start is the minimum of the loss over (w, b)
        assert loss < torch.nn.functional.cross_entropy(torch.zeros_like(logits), labels)


@pytest.mark.parametrize("head_init", ["cosine", "fit", "random"])
def test_training_starts_the_siamese_head_by_head_init(tiny_dirs, tmp_path, monkeypatch, head_init):
    label = lambda i: "label" if i is None else ("entailment", "not_entailment")[i % 2]  # noqa: E731
    trainer = _trainer(tiny_dirs["bert"], _pair_folder(tmp_path, "rte", label), tmp_path, task="rte",
                       pooling="siamese", task_type="SEQ_CLS", max_steps=1, eval_every=1, head_init=head_init)
    calls = []
    for start in ("start_head_at_cosine", "start_head_at_readout"):
        monkeypatch.setattr(trainer.model, start, lambda inputs, labels, start=start: calls.append(start) or 0.0)
    trainer.train()
    assert calls == {"cosine": ["start_head_at_cosine"], "fit": ["start_head_at_readout"], "random": []}[head_init]
    with pytest.raises(SoftpromptError, match="--head-init must be cosine, fit or random"):
        TrainConfig(head_init="zeros")


def test_head_init_defaults_and_errors(tiny_dirs, tiny_csv, tmp_path):
    """Decoder heads start fitted, a siamese head at the cosine, other encoder heads random (as measured)."""
    assert _trainer(tiny_dirs["llama"], tiny_csv, tmp_path, task_type="SEQ_CLS").spec.head_init == "fit"
    assert _trainer(tiny_dirs["bert"], tiny_csv, tmp_path).spec.head_init == "random"
    label = lambda i: "label" if i is None else ("entailment", "not_entailment")[i % 2]  # noqa: E731
    siamese = _trainer(tiny_dirs["bert"], _pair_folder(tmp_path, "rte", label), tmp_path, task="rte",
                       pooling="siamese", task_type="SEQ_CLS")
    assert siamese.spec.head_init == "cosine"
    assert _trainer(tiny_dirs["llama"], tiny_csv, tmp_path).spec.head_init == "fit"  # a user's file: a head
    words = _trainer(tiny_dirs["llama"], tiny_csv, tmp_path, task_type="CAUSAL_LM")
    assert words.spec.head_init is None  # label words: no head
    with pytest.raises(SoftpromptError, match="--head-init starts a classification or regression head"):
        _trainer(tiny_dirs["llama"], tiny_csv, tmp_path, head_init="fit", task_type="CAUSAL_LM")
    with pytest.raises(SoftpromptError, match="--head-init cosine starts a siamese head"):
        _trainer(tiny_dirs["bert"], tiny_csv, tmp_path, head_init="cosine")


@pytest.mark.parametrize("family", ["bert", "llama", "roberta"])
def test_readout_start_recovers_a_linear_rule(tiny_bert, tokenizer, family):
    """Inputs whose score is an exact linear function (through 0 for Llama's bias-free head) are fitted to
    within the ridge's small shrinkage; classes split by a hyperplane are mostly read off, at a sharpened scale.
    RoBERTa's head is dense + tanh + out_proj: the fit sets out_proj, from what out_proj reads."""
    torch.manual_seed(0)
    base = {"bert": lambda: tiny_bert,
            "llama": lambda: LlamaForSequenceClassification(_llama_config(tokenizer, num_labels=2)),
            "roberta": lambda: RobertaForSequenceClassification(RobertaConfig(
                vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                intermediate_size=64, max_position_embeddings=128)),
            }[family]()
    model = get_prompt_model(base, PromptTuningConfig(num_virtual_tokens=2, task_type="SEQ_CLS"))

    def install(outputs: int) -> torch.nn.Linear:
        layer = torch.nn.Linear(32, outputs, bias=family != "llama")
        if family == "roberta":
            model.head.out_proj = layer
        else:
            setattr(model.base, model.head_name, layer)
        assert model.readout is layer
        return layer

    inputs = torch.randn(300, 32) * torch.linspace(0.1, 10, 32) + 3.0  # uneven scales and a common offset
    rule = torch.randn(32)
    score = inputs @ rule + (0.0 if family == "llama" else 2.5)
    single = install(1)
    error = model.start_head_at_readout(inputs, score)
    with torch.no_grad():
        torch.testing.assert_close(single(inputs)[:, 0], score, rtol=0, atol=1e-2 * score.std().item())
    assert error < 1e-3 * score.var()
    pair = install(2)
    labels = (score > score.median()).long()
    model.start_head_at_readout(inputs, labels)
    with torch.no_grad():
        logits = pair(inputs)
    assert (logits.argmax(-1) == labels).float().mean() > 0.9  # least squares on one-hot targets, not logistic
    flat = torch.nn.functional.cross_entropy(logits / logits.abs().max(), labels)  # the same rule, unsharpened
    assert torch.nn.functional.cross_entropy(logits, labels) < flat


def test_decoder_head_starts_as_a_readout_of_its_last_token_states(tiny_dirs, tmp_path, monkeypatch):
    """The fit sees what the head reads under the starting prompt, row by row in the sample's order: the
    batched shared-prefix states equal each row run alone through the concatenated sequence."""
    label = lambda i: "score" if i is None else f"{(i * 7) % 6:.1f}"  # noqa: E731
    trainer = _trainer(tiny_dirs["llama"], _pair_folder(tmp_path, "stsb", label), tmp_path, task="stsb",
                       task_type="SEQ_CLS")
    model, features = trainer.model, trainer.encoder.encode_all(trainer.splits.train)
    seen = {}
    monkeypatch.setattr(model, "start_head_at_readout",
                        lambda inputs, labels: seen.update(inputs=inputs, labels=labels) or 0.0)
    trainer._start_head(features)
    sample = sorted(random.Random(trainer.spec.seed).sample(features, len(features)), key=len)
    assert seen["labels"].tolist() == [f.label for f in sample]
    model.eval()
    for i in (0, len(sample) // 2, len(sample) - 1):
        batch = collate([sample[i]], trainer.encoder)
        batch.pop("labels")
        alone = []
        hook = model.head.register_forward_hook(lambda m, args, out: alone.append(args[0]))
        with torch.no_grad():
            PromptModel.forward(model, **batch)  # the plain concatenation, one row
        hook.remove()
        # transformers' own head scores every position of the row; its last is the one pooled
        torch.testing.assert_close(seen["inputs"][i], alone[0][0, -1], atol=1e-5, rtol=0)


def test_the_head_steps_at_its_own_learning_rate(tiny_dirs, tiny_csv, tmp_path):
    """AdamW's first step moves every weight with a gradient by its group's lr (times 1 - lr * decay for the
    decay), so the head's largest move is --head-lr and the prompt's is --lr."""
    trainer = _trainer(tiny_dirs["llama"], tiny_csv, tmp_path, task_type="SEQ_CLS", residual_reparam=0,
                       lr=3e-2, head_lr=1e-3, warmup=0, max_steps=1, eval_every=1, eval_test=False,
                       head_init="random")  # no fitted start: `before` is the head the step moves
    head, prompt = trainer.model.head.weight, trainer.model.prompt.weight
    before = head.detach().clone(), prompt.detach().clone()
    trainer.train()  # loads the best (only) checkpoint back: the weights after the step
    for after, start, lr in ((head, before[0], 1e-3), (prompt, before[1], 3e-2)):
        assert abs(float((after.detach() - start).abs().max()) - lr) < lr * 0.01
    with pytest.raises(SoftpromptError, match="--head-lr must be > 0"):
        TrainConfig(head_lr=0)


def test_decoder_heads_default_to_slower_prompt_and_head_lrs(tiny_dirs, tiny_csv, tmp_path):
    for model, prompt_lr, head_lr in (("llama", 1e-2, 3e-3), ("bert", 3e-2, 3e-2)):
        trainer = _trainer(tiny_dirs[model], tiny_csv, tmp_path, task_type="SEQ_CLS")
        assert [g["lr"] for g in trainer.optimizer.param_groups] == pytest.approx([prompt_lr, head_lr])
        assert trainer.prompted.checkpoint().to_dict()["spec"]["head_lr"] == pytest.approx(head_lr)  # resume sees it
    trainer = _trainer(tiny_dirs["llama"], tiny_csv, tmp_path, task_type="SEQ_CLS", lr=0.1)
    assert [g["lr"] for g in trainer.optimizer.param_groups] == pytest.approx([0.1, 0.03])
    label_words = _trainer(tiny_dirs["llama"], tiny_csv, tmp_path, task_type="CAUSAL_LM")
    assert len(label_words.optimizer.param_groups) == 1 and label_words.spec.head_lr is None


def test_runs_record_their_lr_and_head_start_and_older_runs_still_resume(tiny_dirs, tiny_csv, tmp_path):
    """The chosen lr and head start go into the run's folder; a folder written before `--head-init fit`
    existed (head_init 'cosine' recorded for every head) resumes instead of failing the siamese check."""
    from softprompt.training import train

    out = tmp_path / "run"
    cfg = TrainConfig(model=tiny_dirs["bert"], data=tiny_csv, prompt_length=4, output=str(out), max_steps=1,
                      eval_every=1, progress=False)
    train(cfg, log=lambda _: None)
    spec = json.loads((out / "last" / "softprompt.json").read_text())["spec"]
    assert (spec["lr"], spec["head_init"]) == (pytest.approx(3e-2), "random")
    old = legacy_run(tmp_path / "old", "minilm", data=tiny_csv)
    meta_path = old / "last" / "softprompt.json"
    meta = json.loads(meta_path.read_text())
    meta["training"]["head_init"] = "cosine"
    meta_path.write_text(json.dumps(meta))
    result = train(TrainConfig(output=str(old), max_steps=4, progress=False), resume=True, log=lambda _: None)
    assert result.step == 4


def test_a_decoder_head_run_saved_before_runs_recorded_their_lr_resumes_at_the_lr_it_began_with(
        tiny_dirs, tiny_csv, tmp_path):
    from softprompt.training import train

    out = tmp_path / "run"
    train(TrainConfig(model=tiny_dirs["llama"], data=tiny_csv, task_type="SEQ_CLS", prompt_length=4, output=str(out),
                      max_steps=1, eval_every=1, progress=False), log=lambda _: None)
    assert json.loads((out / "last" / "softprompt.json").read_text())["spec"]["lr"] == pytest.approx(1e-2)  # today's
    old = legacy_run(tmp_path / "old", "llama_head", data=tiny_csv, base_model=tiny_dirs["llama"])
    meta_path = old / "last" / "softprompt.json"
    meta = json.loads(meta_path.read_text())
    assert meta["format"] == 1 and meta["training"]["lr"] == pytest.approx(1e-2)
    meta["training"]["lr"] = None
    meta_path.write_text(json.dumps(meta))
    train(TrainConfig(output=str(old), max_steps=2, progress=False), resume=True, log=lambda _: None)
    assert json.loads(meta_path.read_text())["spec"]["lr"] == pytest.approx(3e-2)  # the default it began with
