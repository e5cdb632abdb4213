"""The fixed choices of ``deltatune train``'s keys that name other libraries' options, written out so that checking a
config never imports transformers (tests keep them in step with the installed transformers)."""

from __future__ import annotations

from importlib.util import find_spec

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# transformers' SchedulerType values but reduce_lr_on_plateau (it needs an eval metric each step), written
# out so that checking a config never imports transformers; tests/test_cli_speed.py keeps them in step.
LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "cosine_with_min_lr",
    "cosine_warmup_with_min_lr",
    "warmup_stable_decay",
    "greedy",
)
# transformers' report_to integrations (INTEGRATION_TO_CALLBACK) but kubeflow (set up by its platform, not a
# package): the modules each needs, and their pip packages. Written out so that checking a config never
# imports transformers; tests/test_first_hour.py keeps them in step.
REPORTERS: dict[str, tuple[tuple[str, ...], str]] = {
    "tensorboard": (("tensorboard",), "tensorboard"),
    "wandb": (("wandb",), "wandb"),
    "mlflow": (("mlflow",), "mlflow"),
    "trackio": (("trackio",), "trackio"),
    "comet_ml": (("comet_ml",), "comet_ml"),
    "clearml": (("clearml",), "clearml"),
    "neptune": (("neptune",), "neptune"),
    "dagshub": (("dagshub", "mlflow"), "dagshub mlflow"),
    "dvclive": (("dvclive",), "dvclive"),
    "swanlab": (("swanlab",), "swanlab"),
    "codecarbon": (("codecarbon",), "codecarbon"),
    "azure_ml": (("azureml.core.run",), "azureml-core"),
    "flyte": (("flytekit", "flytekitplugins.deck"), "flytekit flytekitplugins-deck-standard"),
}


def installed(modules: tuple[str, ...]) -> bool:
    """Whether every module of ``modules`` can be imported (found, not imported)."""
    for module in modules:
        try:
            if find_spec(module) is None:
                return False
        except (ImportError, ValueError):  # a missing parent package of a dotted name
            return False
    return True
