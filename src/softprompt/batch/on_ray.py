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
from pathlib import Path
from typing import Any

from ..errors import SoftpromptError
from .answers import Checkpoints, SoftpromptPredictor
from .inputs import read_options
from .job import Written, plan
from .outputs import conform


def predict_files_ray(checkpoints: Checkpoints, input: str | Path, output: str | Path, *, address: str | None = None,
                      concurrency: int = 2, task_column: str | None = None, chunk_size: int = 256,
                      batch_size: int = 32, answer_prefix: str = "", dtype: str | None = None,
                      trust_remote_code: bool = False, base_model: str | None = None,
                      progress: bool = True) -> Written:
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
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True
        context.enable_progress_bars = False
        answered = _read(ray, job.inputs.kind, [str(p.resolve()) for p in job.inputs.files],
                         job.inputs.schema.names).repartition(target_num_rows_per_block=chunk_size).map_batches(
            SoftpromptPredictor, batch_size=chunk_size, batch_format="pyarrow", num_cpus=1,
            compute=ray.data.ActorPoolStrategy(size=concurrency),
            fn_constructor_kwargs={"checkpoints": job.checkpoints, "task_column": task_column,
                                   "answer_prefix": answer_prefix, "batch_size": batch_size, "dtype": dtype,
                                   "trust_remote_code": trust_remote_code, "base_model": base_model})
        with job.progress(progress) as bar:
            for batch in answered.iter_batches(batch_size=None, batch_format="pyarrow"):
                job.output.write(conform(batch, job.schema))
                bar.update(batch.num_rows)
        job.output.finish()
    except Exception as err:
        refused = _softprompt_error(err)
        if refused is None:
            raise
        raise refused from None
    finally:
        job.output.close()
        if started:
            ray.shutdown()
    return job.written(0)


def _read(ray: Any, kind: str, files: list[str], columns: list[str]) -> Any:
    """The files as a Ray dataset, read as `inputs.read_file` reads them (no columns made of folder names)."""
    common = {"partitioning": None, "file_extensions": None}
    if kind == "parquet":
        return ray.data.read_parquet(files, **common)
    if kind == "jsonl":
        return ray.data.read_json(files, **common)
    return ray.data.read_csv(files, **common, **read_options(kind, columns))


def _softprompt_error(err: BaseException) -> SoftpromptError | None:
    """The SoftpromptError an actor raised, out of the exceptions Ray wraps it in, as one line."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, SoftpromptError):
            return SoftpromptError(str(seen.args[0]) if seen.args else str(seen))
        seen = getattr(seen, "cause", None) or seen.__cause__
    return None
