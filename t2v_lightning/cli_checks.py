"""What ``t2v`` checks before any work, so that a run never silently does something else.

* :class:`KeepingConfigSaver`: Lightning saves the merged config of ``fit`` / ``validate`` in the
  log folder; with the logger off that folder is the working folder, where ``config.yaml`` is
  often the user's own file. An existing file is never replaced: the config is then not saved,
  and a warning says so.
* :func:`check_embed_trainer_options`: ``t2v embed`` fits a head for ``max_epochs`` epochs and
  visits every selected example once; the Trainer's other limits (``limit_train_batches``,
  ``max_steps``, ``max_time``...) cannot take effect there and are refused by name.
  ``fast_dev_run`` is a smoke test: see :func:`smoke_test_batches`.
* :func:`check_checkpoint_identity`: a head checkpoint of ``t2v fit`` records the probe and the
  task it was fitted on; asking ``embed`` for another probe or task is refused, naming both.
* :func:`expected_settings` and :func:`settings_difference`: a sweep resumes (skips an existing
  artifact) only when the artifact records the same task and every setting that changes its
  numbers (:data:`RESUME_KEYS`).
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from typing_extensions import override

from t2v_lightning.outputs import OutputExistsError, write_atomically

__all__ = [
    "RESUME_KEYS",
    "argument_defaults",
    "KeepingConfigSaver",
    "check_checkpoint_identity",
    "check_embed_trainer_options",
    "expected_settings",
    "settings_difference",
    "smoke_test_batches",
]

# Trainer options that limit what a training loop does. ``t2v embed`` does not run such a loop
# over the task (it fits the head for max_epochs epochs and visits every example once), so these
# would be silently ignored: they are refused instead (use --data.max_samples to embed fewer
# examples).
_EMBED_REFUSED_LIMITS = (
    "limit_train_batches",
    "limit_val_batches",
    "limit_test_batches",
    "limit_predict_batches",
    "overfit_batches",
    "max_steps",
    "min_steps",
    "min_epochs",
    "max_time",
)

# The artifact's facts that must equal this run's for an existing artifact to count as this
# task's result (resume): the task, the probe and its weights, the method and its estimator,
# the examples, the seeds, and the head.
RESUME_KEYS = (
    "dataset",
    "task_id",
    "task_metadata",
    "max_samples",
    "balanced_sampling",
    "data_seed",
    "probe",
    "probe_fingerprint",
    "skip_layers",
    "method",
    "estimator",
    "mc_samples",
    "variational_epochs",
    "variational_lr",
    "variational_head_lr",
    "variational_beta",
    "seed",
    "batch_size",
    "reset_head",
    "head_epochs",
    "head_optimizer",
    "head_lr",
    "head_weight_decay",
    "checkpoint",
)


class KeepingConfigSaver(SaveConfigCallback):
    """Lightning's config saver that never replaces an existing file.

    The merged config is written (atomically) to ``<log dir>/config.yaml`` unless a file is
    already there; then nothing is written and a warning names the file.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["save_to_log_dir"] = False  # save_config below does the writing
        kwargs["overwrite"] = False
        super().__init__(*args, **kwargs)

    @override
    def save_config(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if not trainer.is_global_zero:
            return
        log_dir = trainer.log_dir
        if log_dir is None:
            return
        path = Path(log_dir) / self.config_filename
        reason = f"{path} exists"
        if not os.path.lexists(path):
            text = self.parser.dump(self.config, skip_none=False)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                write_atomically(
                    path, lambda name: _write_text(name, text), overwrite=False, what="config"
                )
                return
            except OutputExistsError:
                reason = f"{path} appeared meanwhile"
        rank_zero_warn(
            f"the merged config of this run was not saved: {reason}, and t2v does not replace "
            "files it did not write (turn the logger on, or choose --trainer.default_root_dir)"
        )


def _write_text(name: str, text: str) -> None:
    Path(name).write_text(text)


def argument_defaults(function: Any) -> dict[str, Any]:
    """The default value of each argument of ``function`` that has one."""
    return {
        name: parameter.default
        for name, parameter in inspect.signature(function).parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }


def check_embed_trainer_options(trainer: Mapping[str, Any]) -> None:
    """Refuse ``--trainer.*`` limits that ``t2v embed`` could not apply.

    Args:
        trainer: the ``trainer`` section of the parsed config.

    Raises:
        ValueError: naming the first option set to something other than its default.
    """
    from lightning.pytorch import Trainer

    defaults = argument_defaults(Trainer.__init__)
    for name in _EMBED_REFUSED_LIMITS:
        value = trainer.get(name, defaults.get(name))
        if value != defaults.get(name):
            raise ValueError(
                f"--trainer.{name}={value!r} cannot take effect in 't2v embed': the head is fitted "
                "for --trainer.max_epochs epochs and the Fisher pass visits every selected example "
                "once; embed fewer examples with --data.max_samples (or a quick check with "
                "--trainer.fast_dev_run, which writes nothing)"
            )


def smoke_test_batches(fast_dev_run: Any) -> int:
    """How many batches of examples ``--trainer.fast_dev_run`` asks for (0: not a smoke test)."""
    if fast_dev_run is True:
        return 1
    if fast_dev_run is False or fast_dev_run is None:
        return 0
    return int(fast_dev_run)


def check_checkpoint_identity(
    checkpoint: Mapping[str, Any],
    model: dict[str, Any],
    data: Mapping[str, Any],
    source: str,
    defaults: Mapping[str, Any],
) -> None:
    """Take the probe's identity from a ``t2v fit`` checkpoint, refusing conflicts.

    ``model``'s ``probe``, ``pretrained``, ``weights`` and ``head`` are set from the checkpoint;
    one the user set to something else (not its default) is a conflict. The checkpoint's task
    (``name``, ``task_id``, ``classes`` of its data module) must be the one asked for.

    Args:
        checkpoint: the checkpoint read with ``weights_only=True``.
        model: the ``model`` section of the config (updated in place).
        data: the ``data`` section of the config.
        source: how to name the checkpoint (``--ckpt_path 'file'``).
        defaults: the model's argument defaults (a value equal to its default was not chosen).

    Raises:
        ValueError: naming the option, the checkpoint's value and the one asked for.
    """
    stored = checkpoint.get("hyper_parameters") or {}
    for key in ("probe", "pretrained", "weights", "head"):
        if key not in stored:
            continue
        asked = model.get(key, defaults.get(key))
        if asked != defaults.get(key) and asked != stored[key]:
            raise ValueError(
                f"{source} holds a head fitted with --model.{key}={stored[key]!r}, but "
                f"--model.{key}={asked!r} was asked for; drop --model.{key} or use a checkpoint "
                "of that probe"
            )
        model[key] = stored[key]
    fitted = checkpoint.get("datamodule_hyper_parameters") or {}
    for key in ("name", "task_id", "classes"):
        if key in fitted and fitted[key] != data.get(key):
            raise ValueError(
                f"{source} holds a head fitted on --data.{key}={fitted[key]!r}, but "
                f"--data.{key}={data.get(key)!r} was asked for; a head fitted on one task does "
                "not describe another (fit one for this task with 't2v fit')"
            )


def expected_settings(
    model: Any, datamodule: Any, head_epochs: int, checkpoint: str | None
) -> dict[str, Any]:
    """The facts an artifact of this run would record for the task of ``datamodule``.

    Args:
        model: the :class:`~t2v_lightning.probe_classifier.ProbeClassifier`.
        datamodule: the task's data module (built, not set up).
        head_epochs: epochs of head fitting.
        checkpoint: ``--ckpt_path``, if any.
    """
    from t2v_lightning.probe import probe_name

    task = dict(datamodule.task_metadata)
    task["normalize"] = datamodule.normalize
    if datamodule.input_size is not None:
        task["input_size"] = datamodule.input_size
    settings: dict[str, Any] = {
        "dataset": datamodule.dataset_name,
        "task_id": datamodule.task_id,
        "task_metadata": task,
        "max_samples": datamodule.max_samples,
        "balanced_sampling": datamodule.balanced_sampling,
        "data_seed": datamodule.seed,
        "probe": probe_name(model.network),
        "probe_fingerprint": model.probe_fingerprint(),
        "skip_layers": model.skip_layers,
        "method": model.method,
        "seed": model.seed,
        "batch_size": datamodule.batch_size,
        "reset_head": checkpoint is None,
        "head_epochs": 0 if checkpoint is not None else head_epochs,
        "checkpoint": checkpoint,
    }
    if checkpoint is None:
        settings.update(
            head_optimizer=model.head_optimizer,
            head_lr=model.head_lr,
            head_weight_decay=model.head_weight_decay,
        )
    settings.update({name: getattr(model, name) for name in _METHOD_SETTINGS[model.method]})
    return json.loads(json.dumps(settings))  # as the artifact's JSON would read back


_METHOD_SETTINGS: dict[str, tuple[str, ...]] = {
    "montecarlo": ("estimator", "mc_samples"),
    "variational": (
        "variational_epochs",
        "variational_lr",
        "variational_head_lr",
        "variational_beta",
    ),
}
"""``method`` → the model's options that change its numbers, compared on resume."""


def settings_difference(meta: Mapping[str, Any], expected: Mapping[str, Any]) -> str | None:
    """Which settings of an existing artifact differ from this run's, in words (None: none).

    Args:
        meta: the artifact's ``meta``.
        expected: :func:`expected_settings`.
    """
    differences = []
    for key, value in expected.items():
        recorded = meta.get(key, "<not recorded>")
        if isinstance(value, dict) and isinstance(recorded, dict):
            # a description of the task: the facts both sides know must agree
            for inner in sorted(set(value) & set(recorded)):
                if recorded[inner] != value[inner]:
                    differences.append(
                        f"{key}.{inner}: {_short(recorded[inner])} in the file, "
                        f"{_short(value[inner])} now"
                    )
        elif recorded != value:
            differences.append(f"{key}: {_short(recorded)} in the file, {_short(value)} now")
    if not differences:
        return None
    more = f" and {len(differences) - 3} more" if len(differences) > 3 else ""
    return "; ".join(differences[:3]) + more


def _short(value: Any) -> str:
    from t2v_lightning.safety import terminal_text

    text = terminal_text(repr(value))
    return text if len(text) <= 60 else text[:57] + "..."


# A field's width or precision beyond this cannot make a file name (file systems allow 255
# bytes); '{task:>2000000000}' would otherwise build a 2 GB string before any check.
_MAX_FIELD_WIDTH = 255


def check_output_template(template: str, fields: tuple[str, ...]) -> None:
    """Refuse an ``--output`` template whose fields are unknown or absurdly wide, before use.

    Args:
        template: a :meth:`str.format` template, e.g. ``embeddings/{task}.safetensors``.
        fields: the names it may use.

    Raises:
        ValueError: an unknown or positional field, a nested field in a format spec, or a
            width / precision above 255.
    """
    import re
    import string

    known = ", ".join("{" + name + "}" for name in fields)
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as err:
        raise ValueError(
            f"output={template!r} is not a valid template ({err}); the fields are {known}"
        ) from None
    for _, field, spec, _ in parts:
        if field is None:
            continue
        if field not in fields:
            raise ValueError(
                f"output={template!r} is not a valid template (unknown field {{{field}}}); the "
                f"fields are {known}"
            )
        if spec and "{" in spec:
            raise ValueError(
                f"output={template!r}: the format of {{{field}}} may not contain other fields"
            )
        widths = [int(digits) for digits in re.findall(r"\d+", spec or "")]
        if any(width > _MAX_FIELD_WIDTH for width in widths):
            raise ValueError(
                f"output={template!r}: the format of {{{field}}} asks for {max(widths):,} "
                f"characters; a file name holds at most {_MAX_FIELD_WIDTH}"
            )
