"""`predict_files_ray`: `predict_files` on Ray Data, each actor holding one `MultiTaskModel`, for a cluster
(`ray start --head`, then `address="auto"`) or several processes on one machine.

Ray reads the files (read_csv/read_json/read_parquet, with the options the single-process reader uses, so the
values are the same), splits them into blocks of `chunk_size` rows so every actor gets work even from one file,
and the actors answer them (`SoftpromptPredictor`). The driver collects the answered blocks in input order and
writes them with the single-process writer, rather than `ds.write_parquet`/`write_json`: those write a folder of
files in no set order, where this gives the very file `softprompt predict` gives, row for row. The answers are
small beside the model's work, so one writer keeps up. The driver checks every row first (`plan`), as the
single-process path does, so a bad input is one line before any actor starts.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ..errors import SoftpromptError
from .answers import Checkpoints, SoftpromptPredictor
from .inputs import Inputs, read_options
from .job import Written, plan
from .outputs import conform


def predict_files_ray(checkpoints: Checkpoints, input: str | Path, output: str | Path, *, address: str | None = None,
                      concurrency: int = 2, task_column: str | None = None, chunk_size: int = 256,
                      batch_size: int = 32, answer_prefix: str = "", dtype: str | None = None,
                      trust_remote_code: bool = False, base_model: str | None = None,
                      progress: bool = True, device: str | None = "auto") -> Written:
    """As `predict_files` (no resume: Ray's readers cannot start mid-file), on `concurrency` Ray actors of one
    CPU each. Joins the Ray already initialised in this process, else the cluster at `address`, else starts a
    local Ray (and shuts down what it started) with a CPU per actor and one more: Ray Data's own tasks (listing,
    reading, splitting the files) need one, and actors holding every CPU would leave them waiting for ever."""
    try:
        import ray.data  # deferred: the optional ray extra
    except ImportError:
        raise SoftpromptError("Ray is not installed: pip install 'softprompt[ray]'") from None
    if concurrency < 1:
        raise SoftpromptError("--concurrency must be at least 1")
    job = plan(checkpoints, input, output, task_column=task_column, answer_prefix=answer_prefix,
               trust_remote_code=trust_remote_code, chunk_size=chunk_size, batch_size=batch_size)
    started = not ray.is_initialized()
    try:
        if started:
            ray.init(address=address, num_cpus=None if address else concurrency + 1, include_dashboard=False,
                     log_to_driver=False, logging_level=logging.WARNING)
        cpus = ray.cluster_resources().get("CPU", 0)
        if cpus < concurrency + 1:
            raise SoftpromptError(f"the Ray cluster has {cpus:g} CPUs; {concurrency} actors need {concurrency + 1} "
                                  "(one each, and one for reading): lower --concurrency")
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        predictor = {"checkpoints": job.checkpoints, "task_column": task_column, "answer_prefix": answer_prefix,
                     "batch_size": batch_size, "dtype": dtype, "trust_remote_code": trust_remote_code,
                     "base_model": base_model, "device": device}
        with _in_order(ray.data.DataContext.get_current()), job.progress(progress) as bar:
            answered = _read(ray, job.inputs, chunk_size).map_batches(
                SoftpromptPredictor, fn_constructor_kwargs=predictor, batch_size=chunk_size, batch_format="pyarrow",
                num_cpus=1, compute=ray.data.ActorPoolStrategy(size=concurrency))
            for batch in answered.iter_batches(batch_size=None, batch_format="pyarrow"):
                job.output.write(conform(batch, job.schema))
                bar.update(batch.num_rows)
        job.output.finish()
    except SoftpromptError as err:  # an actor's comes wrapped by Ray, its message followed by advice on retries
        raise SoftpromptError(str(err.args[0] if err.args else err).splitlines()[0]) from None
    finally:
        job.output.close()
        if started:
            ray.shutdown()
    return job.written(0)


@contextmanager
def _in_order(context: Any) -> Iterator[None]:
    """Ray Data's settings while this runs, then as they were: rows in input order, no progress bars of its own
    (the driver shows one), an actor's SoftpromptError raised as one (wrapped by Ray, but of its type). Set before
    the dataset is made: a dataset keeps the settings it was made under."""
    options = context.execution_options
    saved = options.preserve_order, context.enable_progress_bars, context.raise_original_map_exception
    options.preserve_order, context.enable_progress_bars, context.raise_original_map_exception = True, False, True
    try:
        yield
    finally:
        options.preserve_order, context.enable_progress_bars, context.raise_original_map_exception = saved


def _read(ray: Any, inputs: Inputs, chunk_size: int) -> Any:
    """The input as a Ray dataset, read as `inputs.read_file` reads it (and no columns made of folder names), in
    blocks of at most `chunk_size` rows, so that even one file feeds every actor."""
    files, common = [str(p.resolve()) for p in inputs.files], {"partitioning": None, "file_extensions": None}
    if inputs.kind == "parquet":
        dataset = ray.data.read_parquet(files, **common)
    elif inputs.kind == "jsonl":
        dataset = ray.data.read_json(files, **common)
    else:
        dataset = ray.data.read_csv(files, **common, **read_options(inputs.kind, inputs.schema.names))
    return dataset.repartition(target_num_rows_per_block=chunk_size)
