"""Model registry, the ResNet family and cnn3, and transfer-learning helpers.

Callers build models by name and never import model classes::

    from imgcls_core.models import build_model, create_model, list_models

    model = build_model(cfg.model, num_classes=10, image_size=32)
    model = create_model("resnet50", num_classes=10, width=0.5)

Every model has a ``head_name`` (its classifier, ``"fc"``) and ``stage_names``
(what ``freeze_stages`` freezes). The engine calls ``keep_frozen_bn_eval``
after each ``model.train()`` so frozen BatchNorm layers keep their statistics.
``check_model_config`` is config validation's look at a ``ModelConfig`` (options,
stages, torchvision weights) before anything is built.
"""

from imgcls_core.models import cnn, resnet  # noqa: F401 - importing registers the models
from imgcls_core.models.catalog import (
    build_model,
    check_model_config,
    create_model,
    list_models,
    model_options,
    register_model,
)
from imgcls_core.models.transfer import (
    LoadReport,
    check_pretrained_file,
    freeze_stages,
    keep_frozen_bn_eval,
    load_pretrained,
    resolve_pretrained,
    split_head_parameters,
    unfreeze_all,
    unwrap_model,
)

__all__ = [
    "LoadReport",
    "build_model",
    "check_model_config",
    "check_pretrained_file",
    "create_model",
    "freeze_stages",
    "keep_frozen_bn_eval",
    "list_models",
    "load_pretrained",
    "resolve_pretrained",
    "model_options",
    "register_model",
    "split_head_parameters",
    "unfreeze_all",
    "unwrap_model",
]
