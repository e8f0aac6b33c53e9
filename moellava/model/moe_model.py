"""What every MoE LLaVA family shares, so that `llava_<family>_moe.py` stays a few lines: the `moe` config
field, building the MoE layers from `config.moe` (loading) or upcycling the dense FFNs (training, stage 3),
the MoE backend choice, and the causal-LM output with the router auxiliary loss."""

from dataclasses import dataclass
from typing import List, Optional

import torch

from moellava.model.llava_arch import LlavaCausalLMOutputWithPast
from moellava.model.moe import aux_loss_total, convert_layers_to_moe, moe_blocks
from moellava.model.moe.settings import BACKENDS


@dataclass
class MoECausalLMOutputWithPast(LlavaCausalLMOutputWithPast):
    """`loss` = `lm_loss` + `aux_loss`. `aux_loss` is `router_aux_loss_coef` x the sum of the layers' aux
    losses, detached: its gradient already reaches the routers through each MoE block's output.
    `moe_loss_list` holds each MoE layer's (unweighted, detached) aux loss, in layer order."""

    lm_loss: Optional[torch.FloatTensor] = None
    aux_loss: Optional[torch.FloatTensor] = None
    moe_loss_list: Optional[List[torch.FloatTensor]] = None


def has_moe_layers(config) -> bool:
    moe = getattr(config, "moe", None)
    return bool(moe) and bool(moe.get("moe_layers_idx"))


def set_moe_backend(config, backend: str) -> None:
    """Choose the dispatcher the MoE layers are built with (before constructing the model from `config`).

    Both backends hold the same parameters under the same names, so any MoE checkpoint loads on either.
    The native backend keeps every expert in this process (a saved checkpoint holds all of them), so a
    config written by an expert-parallel run loads with ep_size 1.
    """
    if backend not in BACKENDS:
        raise ValueError(f"Unknown MoE backend {backend!r}: use one of {BACKENDS}.")
    if not has_moe_layers(config):
        raise ValueError(f"config (model_type {config.model_type!r}) has no MoE layers to put on a backend.")
    config.moe = {**config.moe, "backend": backend}
    if backend == "native":
        config.moe["ep_size"] = 1


class MoELlavaConfigMixin:
    """Placed first: `MoELLaVALlamaConfig(MoELlavaConfigMixin, LlavaLlamaConfig)`. Adds the `moe` field."""

    def __init__(self, moe: Optional[dict] = None, **kwargs):
        super().__init__(**kwargs)
        self.moe = moe  # the `build_moe_settings` dict; None until the dense model is upcycled


class MoELlavaMixin:
    """Placed first: `MoELLaVALlamaForCausalLM(MoELlavaMixin, LlavaLlamaForCausalLM)`.

    The dense class supplies the backbone, `get_decoder_layers()` and the forward; this mixin adds the MoE
    layers and their losses. A config with `moe["moe_layers_idx"]` (a saved MoE checkpoint) gets its MoE
    layers at construction, with the backend `moe["backend"]` (default native), ready for the weights.
    A dense (stage-2) checkpoint loads into the MoE class unchanged; `initialize_moe_modules` upcycles it.
    """

    def __init__(self, config):
        super().__init__(config)
        if has_moe_layers(config):
            convert_layers_to_moe(self.get_decoder_layers(), config.moe, config.hidden_size, upcycle=False)

    def initialize_moe_modules(self, moe_settings: dict) -> None:
        """Stage 3: replace the chosen FFNs by MoE blocks whose experts copy them (sparse upcycling).

        `moe_settings` is the dict from `moellava.model.moe.build_moe_settings`; it becomes `config.moe`,
        so the saved checkpoint (model_type of this class's config) rebuilds the same layers.
        Freezing for MoE training is separate: `moellava.model.moe.freeze_for_moe_training`.
        """
        if not isinstance(self.config, self.config_class):
            raise TypeError(
                f"The model's config is a {type(self.config).__name__}, not {self.config_class.__name__}: load "
                f"the dense checkpoint with {type(self).__name__}.from_pretrained(path) before upcycling."
            )
        if moe_blocks(self):
            raise ValueError("This model already has MoE layers: initialize_moe_modules upcycles a dense model once.")
        convert_layers_to_moe(self.get_decoder_layers(), moe_settings, self.config.hidden_size, upcycle=True)
        self.config.moe = dict(moe_settings)
        self.config.architectures = [type(self).__name__]

    def llava_output(self, outputs, attention_mask: Optional[torch.Tensor], return_dict: Optional[bool]):
        if not moe_blocks(self):
            # A dense checkpoint loaded into the MoE class, not upcycled yet.
            return super().llava_output(outputs, attention_mask, return_dict)
        moe_loss_list = [block.last_aux_loss for block in moe_blocks(self)]
        aux_loss = self.config.moe["router_aux_loss_coef"] * aux_loss_total(self)
        lm_loss = outputs.loss
        result = MoECausalLMOutputWithPast(
            loss=lm_loss + aux_loss.to(lm_loss.dtype) if lm_loss is not None else None,
            logits=outputs.logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            attention_mask=attention_mask,
            lm_loss=lm_loss,
            aux_loss=aux_loss,
            moe_loss_list=moe_loss_list,
        )
        return_dict = return_dict if return_dict is not None else self.config.use_return_dict
        return result if return_dict else result.to_tuple()
