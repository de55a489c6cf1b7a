"""`python -m nmke_lightning {fit,validate,test,predict}`: LightningCLI for edit sessions.

``fit`` runs a lifelong edit session; ``validate``/``test`` evaluate a saved one
(``--ckpt_path``); ``predict`` answers prompts with the edited model. The edit-session callbacks
are always present and configured under their own keys (``checkpoint``, ``masks``, ``entropy``,
``summary``, ``progress``).
"""

from __future__ import annotations

import importlib.util
import sys
import warnings

from lightning.pytorch.cli import LightningCLI

from .callbacks import EditCheckpoint, EditProgressBar, EditSummary, EntropyTracker, MaskRecomputation
from .data import EditDataModule
from .module import EditModule
from . import strategies  # noqa: F401  (registers the edit_ddp strategies)

TRAINER_DEFAULTS = {
    "max_epochs": 1,  # one epoch = the rest of the edit stream
    "num_sanity_val_steps": 0,
    "enable_model_summary": False,
    "default_root_dir": "outputs",
    "log_every_n_steps": 1,
}


class EditCLI(LightningCLI):
    def _instantiate_trainer(self, config, callbacks):
        # The default logger: TensorBoard (when installed) and CSV, both under default_root_dir.
        if config.get("logger") in (None, True):
            config["logger"] = default_loggers(config.get("default_root_dir") or "outputs")
        return super()._instantiate_trainer(config, callbacks)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(EditCheckpoint, "checkpoint")
        parser.add_lightning_class_args(MaskRecomputation, "masks")
        parser.add_lightning_class_args(EntropyTracker, "entropy")
        parser.add_lightning_class_args(EditSummary, "summary")
        parser.add_lightning_class_args(EditProgressBar, "progress")


def default_loggers(root: str) -> list:
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    loggers = []
    if importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None:
        loggers.append(TensorBoardLogger(root, name="lightning_logs"))
        loggers.append(CSVLogger(root, name="lightning_logs", version=loggers[0].version))
    else:
        loggers.append(CSVLogger(root, name="lightning_logs"))
    return loggers


def _quiet_known_warnings() -> None:
    # An edit session has no optimizer by design, and an iterable stream has no length.
    for pattern in (
        ".*configure_optimizers.*returned.*None.*",
        ".*does not have many workers.*",
        ".*IterableDataset.*has `__len__`.*",
        ".*Total length of .* across ranks is zero.*",
        ".*isinstance\\(treespec, LeafSpec\\).*",
        ".*module\\(s\\) in eval mode.*",
        ".*LightningCLI's args parameter is intended.*",
        ".*Experiment logs directory .* exists and is not empty.*",  # TensorBoard and CSV share it
    ):
        warnings.filterwarnings("ignore", message=pattern)


def _document_dataclass_fields() -> None:
    """Let --help and --print_config show the docstring under each config dataclass field."""
    try:
        from jsonargparse import set_parsing_settings

        set_parsing_settings(docstring_parse_attribute_docstrings=True)
    except (ImportError, TypeError):  # older jsonargparse
        from jsonargparse import set_docstring_parse_options

        set_docstring_parse_options(attribute_docstrings=True)


def main(args: list[str] | None = None) -> EditCLI:
    _document_dataclass_fields()
    argv = list(sys.argv[1:] if args is None else args)
    # `--print_config` alone prints the config with every option's documentation as comments.
    if importlib.util.find_spec("ruamel") is not None:  # comments need ruamel.yaml
        argv = ["--print_config=comments" if a == "--print_config" else a for a in argv]
    _quiet_known_warnings()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per weight load would bury the session's own output
    return EditCLI(
        EditModule,
        EditDataModule,
        args=argv,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )
