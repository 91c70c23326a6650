"""Loading the base model and its tokenizer: an HF id or a local path, the same code for both."""

from __future__ import annotations

import os

import torch
from torch import nn

from fedsim.config import Config, resolve_model_path
from fedsim.errors import UsageError
from fedsim.seeds import derive_seed

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(config: Config):
    from transformers import AutoTokenizer

    path = resolve_model_path(config.model.name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise UsageError(f"model.name: cannot load a tokenizer from '{config.model.name}' ({_first_line(error)}); give an HF id or a local model folder") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _model_class(config: Config):
    """``AutoModelForCausalLM`` for ``model.task: causal-lm``, else ``AutoModelForSequenceClassification``."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForCausalLM if config.model.task == "causal-lm" else AutoModelForSequenceClassification


def load_model(config: Config, num_labels: int, device: str = "cpu") -> nn.Module:
    """The base model: for classification with its new head seeded by ``config.seed`` (so every worker
    builds the same one); for ``causal-lm`` the LM as pretrained (no new head; ``num_labels`` unused)."""
    path = resolve_model_path(config.model.name)
    torch.manual_seed(derive_seed(config.seed, "head-init"))
    causal = config.model.task == "causal-lm"
    kwargs = {} if causal else {"num_labels": num_labels, "ignore_mismatched_sizes": True}
    try:
        if config.model.dropout is not None:
            kwargs.update(_config_dropouts(path, config.model.dropout))
        # use_kernels=False: transformers >= 5.25 otherwise swaps layers (RMSNorm, activations, rotary) for kernels fetched
        # from the Hugging Face Hub at load time, and again at every train()/eval(): code outside the lock, a download on
        # a GPU node, and on the way it drops any forward a caller set on such a layer.
        model = _model_class(config).from_pretrained(path, dtype=DTYPES[config.model.dtype], use_kernels=False, **kwargs)
    except (OSError, ValueError) as error:
        raise UsageError(f"model.name: cannot load '{config.model.name}' ({_first_line(error)}); give an HF id or a local model folder") from None
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    if config.model.dropout is not None:
        set_dropout(model, config.model.dropout)
    if config.model.gradient_checkpointing:
        if not model.supports_gradient_checkpointing:
            raise UsageError(f"model.gradient_checkpointing: '{config.model.name}' does not support it; set it to false")
        enable_checkpointing(model)
    return model.to(device).eval()


def _is_dropout_name(name: str) -> bool:
    """A dropout probability's name in HF configs and modules: ``hidden_dropout_prob``, ``attention_dropout``, ``attn_pdrop``..."""
    return "dropout" in name or name.endswith("pdrop")


def _config_dropouts(path: str, p: float) -> dict[str, float]:
    """``{name: p}`` for every dropout probability of the model's config, passed to ``from_pretrained`` so that
    the modules are built with it (attention layers keep their probability as a plain attribute)."""
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(path)
    return {name: p for name, value in model_config.to_dict().items()
            if _is_dropout_name(name) and (value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)))}


def set_dropout(model: nn.Module, p: float) -> None:
    """Every dropout of ``model`` at probability ``p`` (``model.dropout``): the ``nn.Dropout`` modules, and the
    probabilities that attention layers keep as attributes (``dropout_prob``, ``attention_dropout``) for functional dropout."""
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = p
        for name, value in list(vars(module).items()):
            if _is_dropout_name(name) and isinstance(value, float):
                setattr(module, name, p)


def check_model(config: Config, num_labels: int) -> None:
    """Fail early, in the driver, on a model that cannot be loaded or has none of the target modules.

    Builds the model on the meta device (no weights, no memory) just to see its layer names.
    """
    from transformers import AutoConfig

    from fedsim.adapters import target_linear_names

    path = resolve_model_path(config.model.name)
    kwargs = {} if config.model.task == "causal-lm" else {"num_labels": num_labels}
    try:
        model_config = AutoConfig.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as error:
        raise UsageError(f"model.name: cannot load '{config.model.name}' ({_first_line(error)}); give an HF id or a local model folder") from None
    try:
        with torch.device("meta"):
            model = _model_class(config).from_config(model_config)
    except ValueError as error:  # e.g. a BERT checkpoint with model.task: causal-lm
        raise UsageError(f"model.task: '{config.model.name}' cannot be loaded as a {config.model.task} model ({_first_line(error)})") from None
    target_linear_names(model, config.model.target_modules)


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__


def offline_by_default() -> None:
    """No hub calls at run time unless the user asks for them: local paths and cached models only; quiet loading."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging

    logging.disable_progress_bar()


def enable_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing, under the name the installed transformers gives it (5.x renamed it)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def checkpointing_on(model: nn.Module) -> bool:
    """Whether ``model`` recomputes its activations in the backward pass."""
    if hasattr(model, "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))
