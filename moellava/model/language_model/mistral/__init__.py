"""Mistral backbone (model_type ``mistral``); importing it registers the type with the transformers Auto classes."""

from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from .configuration_mistral import MistralConfig
from .modeling_mistral import MistralForCausalLM, MistralModel, MistralPreTrainedModel

# transformers >= 4.34 ships its own "mistral"; registering twice would raise there.
if MistralConfig.model_type not in CONFIG_MAPPING:
    AutoConfig.register(MistralConfig.model_type, MistralConfig)
    AutoModelForCausalLM.register(MistralConfig, MistralForCausalLM)

__all__ = ["MistralConfig", "MistralForCausalLM", "MistralModel", "MistralPreTrainedModel"]
