"""softprompt: prompt tuning (Lester et al., 2021) for frozen Hugging Face transformers.

Low level, as in peft::

    model = get_prompt_model(hf_model, PromptTuningConfig(num_virtual_tokens=20, task_type="CAUSAL_LM"), tokenizer)
    loss = model(input_ids, attention_mask, labels=labels).loss   # only model.prompt (and a head) train
    model.save_pretrained("my-prompt");  PromptModel.from_pretrained(hf_model, "my-prompt")

A whole job::

    result = train(TrainConfig(model="smollm2-135m", data="rotten_tomatoes", max_time=300))
    PromptedTask.from_pretrained(result.best_checkpoint).predict(["a gorgeous, moving film"])

What a run will do, every default decided (and why), before it runs::

    spec = resolve(TrainConfig(model="minilm-l6", data="glue/sst2"), describe_model("minilm-l6"), get_task("sst2"))

Many tasks (and prompt ensembles) on one frozen model, in mixed batches::

    model = MultiTaskModel.from_pretrained({"sentiment": "runs/a/best", "nli": ["runs/b/best", "runs/c/best"]})
    model.predict([("sentiment", "a gorgeous film"), ("nli", {"sentence1": "...", "sentence2": "..."})])

Every row of files (CSV/TSV/JSONL/Parquet), streamed into one output, resumable; on Ray Data actors too::

    predict_files({"sentiment": "runs/a/best", "nli": "runs/b/best"}, "rows.parquet", "answers.parquet")
    ds.map_batches(SoftpromptPredictor, fn_constructor_kwargs={"checkpoints": {...}}, batch_format="pyarrow")

Several runs and a report::

    sweep(TrainConfig(max_time=120, output="runs/sweep"), {"prompt_length": [8, 20], "lr": [3e-2, 0.1]})
    write_report(["runs/sweep"], "runs/sweep/report.html")
"""

from .assets import ModelInfo, describe_model
from .batch import SoftpromptPredictor, predict_files
from .checkpoint import Checkpoint, read_checkpoint, save_checkpoint
from .config import PromptInit, PromptTuningConfig, TaskType
from .data import Example, Splits, load_data, to_examples
from .errors import SoftpromptError
from .interpret import Neighbour, nearest_tokens, prompt_similarity
from .metrics import compute_metrics
from .multitask import BaseMismatch, MultiTaskModel, TaskInfo, UnknownTask
from .models import DecoderPromptModel, EncoderPromptModel, PromptModel, Seq2SeqPromptModel, get_prompt_model
from .pipeline import PromptedTask
from .report import write_report
from .spec import RunSpec, TrainConfig, resolve
from .sweep import sweep
from .tasks import TASKS, TaskSpec, get_task
from .tracking import RunLog, read_metrics
from .training import Trainer, TrainingInterrupted, TrainResult, train
from .version import __version__

# the built-in prompt methods register themselves (methods/__init__.py) when imported
from .methods.prompt import method as _prompt  # noqa: E402,F401  isort: skip
from .methods.ptuning import method as _ptuning  # noqa: E402,F401  isort: skip
from .methods.prefix import method as _prefix  # noqa: E402,F401  isort: skip

__all__ = [
    "PromptTuningConfig", "TaskType", "PromptInit", "get_prompt_model", "PromptModel", "EncoderPromptModel",
    "DecoderPromptModel", "Seq2SeqPromptModel", "PromptedTask", "TrainConfig", "RunSpec", "resolve", "ModelInfo",
    "describe_model", "Trainer", "TrainResult", "TrainingInterrupted", "train", "TaskSpec", "TASKS", "get_task",
    "Example", "Splits", "load_data", "to_examples", "compute_metrics", "Checkpoint", "read_checkpoint",
    "save_checkpoint", "SoftpromptError", "RunLog", "read_metrics", "sweep", "write_report", "nearest_tokens",
    "prompt_similarity", "Neighbour", "MultiTaskModel", "TaskInfo", "UnknownTask", "BaseMismatch", "predict_files",
    "SoftpromptPredictor", "__version__",
]
