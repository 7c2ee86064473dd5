"""Batch prediction over files of rows: streamed chunk by chunk into one output file, resumable after a kill,
in one process (`predict_files`) or on Ray Data actors (`predict_files_ray`, `SoftpromptPredictor` for a
`map_batches` of one's own). docs/serving.md#batch-inference says how to run it."""

from .answers import SoftpromptPredictor
from .job import Written, predict_files
from .on_ray import predict_files_ray

__all__ = ["predict_files", "predict_files_ray", "SoftpromptPredictor", "Written"]
