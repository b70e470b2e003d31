"""What the libraries print: quiet by default (``logging.verbose=false``), so that rank 0's console
shows the run (its progress bar, messages and held-out table) and other ranks only their failures."""

from __future__ import annotations

import logging
import os
import warnings

# Loggers of the libraries a run loads, held at WARNING (ERROR on ranks other than 0).
LIBRARY_LOGGERS = ("vllm", "transformers", "torch.distributed", "torch._dynamo", "torch._inductor", "datasets",
                   "huggingface_hub", "filelock", "urllib3", "wandb")
# Read by the libraries when they start: set here unless the environment already says.
QUIET_ENV = {
    "VLLM_LOGGING_LEVEL": "WARNING",  # vLLM configures its logger at import
    "NCCL_DEBUG": "WARN",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "warning",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}


def quiet_libraries(verbose: bool, is_main: bool, environ=os.environ) -> None:
    """Before any library starts: vLLM, NCCL, transformers and Hugging Face logs at WARNING, no
    model-loading bars, each deprecation warning once; ranks other than 0 print only errors (their
    failures still raise and print). ``verbose``: leave every library as it is."""
    if verbose:
        return
    for key, value in QUIET_ENV.items():
        environ.setdefault(key, value if is_main or key == "NCCL_DEBUG" else _quieter(key, value))
    level = logging.WARNING if is_main else logging.ERROR
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(level)
    _quiet_transformers(level)
    if is_main:  # a warning raised again after every save (or every step) is printed once
        for category in (DeprecationWarning, FutureWarning, UserWarning):
            warnings.filterwarnings("once", category=category)
    else:  # the same program as rank 0, whose warnings say it all
        warnings.simplefilter("ignore")


def _quieter(key: str, value: str) -> str:
    return {"VLLM_LOGGING_LEVEL": "ERROR", "TRANSFORMERS_VERBOSITY": "error"}.get(key, value)


def _quiet_transformers(level: int) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity(level)
    hf_logging.disable_progress_bar()
