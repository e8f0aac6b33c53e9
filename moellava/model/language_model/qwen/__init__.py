"""QWen v1 backbone (model_type ``qwen``); importing it registers the type with the transformers Auto classes."""

from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from .configuration_qwen import QWenConfig
from .modeling_qwen import QWenLMHeadModel, QWenModel, QWenPreTrainedModel

# Guarded so that a transformers release that one day ships its own "qwen" does not fail on import.
if QWenConfig.model_type not in CONFIG_MAPPING:
    AutoConfig.register(QWenConfig.model_type, QWenConfig)
    AutoModelForCausalLM.register(QWenConfig, QWenLMHeadModel)

__all__ = ["QWenConfig", "QWenLMHeadModel", "QWenModel", "QWenPreTrainedModel"]
