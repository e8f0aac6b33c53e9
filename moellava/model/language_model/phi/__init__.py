"""Phi backbone (model_type ``phi``); importing it registers the type with the transformers Auto classes."""

from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from .configuration_phi import PhiConfig
from .modeling_phi import PhiForCausalLM, PhiModel, PhiPreTrainedModel

# Newer transformers releases ship their own "phi"; registering twice would raise there.
if PhiConfig.model_type not in CONFIG_MAPPING:
    AutoConfig.register(PhiConfig.model_type, PhiConfig)
    AutoModelForCausalLM.register(PhiConfig, PhiForCausalLM)

__all__ = ["PhiConfig", "PhiForCausalLM", "PhiModel", "PhiPreTrainedModel"]
