"""StableLM backbone (model_type ``stablelm`` and the older ``stablelm_epoch``); importing it registers both
types with the transformers Auto classes."""

from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from .configuration_stablelm import StableLMEpochConfig, StableLmConfig
from .modeling_stablelm import StableLMEpochForCausalLM, StableLmForCausalLM, StableLmModel, StableLmPreTrainedModel

# Newer transformers releases ship their own "stablelm"; registering twice would raise there.
for _config, _model in ((StableLmConfig, StableLmForCausalLM), (StableLMEpochConfig, StableLMEpochForCausalLM)):
    if _config.model_type not in CONFIG_MAPPING:
        AutoConfig.register(_config.model_type, _config)
        AutoModelForCausalLM.register(_config, _model)

__all__ = [
    "StableLMEpochConfig",
    "StableLMEpochForCausalLM",
    "StableLmConfig",
    "StableLmForCausalLM",
    "StableLmModel",
    "StableLmPreTrainedModel",
]
