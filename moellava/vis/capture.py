"""Capture what the experts do: for every token, each MoE layer's router logits and chosen experts, and the
token's role (image, instruction, answer, padding).

`RoutingRecorder` works around any generation loop, with the KV cache on or off:

    recorder = RoutingRecorder(model)
    with recorder:                                   # hooks on while inside
        output_ids = model.generate(input_ids, images=images, use_cache=True, ...)
        recorder.finish(output_ids[:, input_ids.shape[1]:], sample_ids=[question_id])
    recorder.save("answers_routing")                 # answers_routing.safetensors + answers_routing.json

The command line runs it over a LLaVA-format dataset, regenerating each sample's last answer (or, with
`--reference-answers`, routing the data's own answer in one forward):

    python -m moellava.vis.capture --model-path DIR --data FILE.json --image-folder DIR --output NAME

How positions are known: a forward hook on each MoE block computes its router logits (`MoEBlock.
router_logits`, the block's own formula) and one on the model lays the positions out after each forward.
For a forward without KV cache it asks the model's own splicing (`prepare_inputs_labels_for_multimodal`,
with the image features that forward just computed) to carry each token's position as its label: image
positions come back as IGNORE_INDEX and re-padding under a zero mask. A decode step appends its tokens.
Nothing is recorded outside `with recorder:`, and the MoE blocks carry no recording code.
"""

import argparse
import contextlib
import logging
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from moellava import conversation as conversation_lib
from moellava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from moellava.errors import run_main
from moellava.mm_utils import KeywordsStoppingCriteria
from moellava.model.llava_arch import LlavaMetaForCausalLM
from moellava.model.moe import moe_blocks
from moellava.model.moe.routing import route_tokens
from moellava.serve.cli import add_model_arguments, load_chat_model, resolve_conv_mode
from moellava.train.arguments import DataArguments
from moellava.train.dataset import LazySupervisedDataset
from moellava.train.preprocess import ASSISTANT_ROLES, find_trained_spans
from moellava.vis.routes import ANSWER, IMAGE, INSTRUCTION, PADDING, RoutingRecords, SampleRoutes

logger = logging.getLogger(__name__)

# Layout codes of a routed position that is not a text token (text tokens carry their index in input_ids).
_IMAGE_POSITION = -1
_PAD_POSITION = -2


@dataclass
class _Forward:
    positions: torch.Tensor  # [B, L]: index of the token in the text sequence, or a _*_POSITION code
    logits: List[torch.Tensor]  # per MoE layer, [B * L, E]


class RoutingRecorder:
    """Records the routing of every forward of `model` while inside `with recorder:`; `finish()` after each
    `generate()` (or forward) turns what was recorded into one `SampleRoutes` per batch row, `save()` writes
    them all. The MoE layers, experts per layer and top-k are read from the model."""

    def __init__(self, model: LlavaMetaForCausalLM, description: Optional[Dict] = None):
        if not isinstance(model, LlavaMetaForCausalLM):
            raise TypeError(f"RoutingRecorder needs a LLaVA causal LM, got {type(model).__name__}.")
        self.model = model
        self.blocks = moe_blocks(model)
        if not self.blocks:
            raise ValueError(f"{type(model).__name__} has no MoE layers: there is no routing to capture.")
        if len({block.top_k for block in self.blocks}) != 1:
            raise ValueError(f"MoE layers route with different top-k {[block.top_k for block in self.blocks]}.")
        layers = [block.layer_idx if block.layer_idx is not None else i for i, block in enumerate(self.blocks)]
        tower = model.get_image_tower()
        model_info = {
            "model_type": model.config.model_type,
            "name_or_path": getattr(model.config, "_name_or_path", ""),
            "image_tower": tower.name if tower is not None else None,
            "image_tokens": tower.num_tokens if tower is not None else 0,
            **(description or {}),
        }
        self.records = RoutingRecords(layers, [block.num_experts for block in self.blocks], self.blocks[0].top_k,
                                      model_info)
        self._handles = []
        self._dropped = [0.0] * len(self.blocks)  # sum over forwards of each layer's dropped fraction
        self._forward_count = 0
        self._clear()

    def _clear(self) -> None:
        self._forwards: List[_Forward] = []
        self._pending: Dict[int, torch.Tensor] = {}
        self._features: Optional[torch.Tensor] = None
        self._prompt_ids: Optional[torch.Tensor] = None
        self._prompt_mask: Optional[torch.Tensor] = None
        self._text_length = 0

    # --- hooks --------------------------------------------------------------------------------------------
    def __enter__(self) -> "RoutingRecorder":
        if not self._handles:
            for index, block in enumerate(self.blocks):
                self._handles.append(block.register_forward_hook(self._block_hook(index)))
            projector = getattr(self.model.get_model(), "mm_projector", None)
            if projector is not None:
                self._handles.append(projector.register_forward_hook(self._on_projector))
            self._handles.append(self.model.register_forward_hook(self._on_model, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _block_hook(self, index: int):
        drops = self.blocks[index].drop_tokens  # a dropless block never drops: nothing to add up

        def hook(block, inputs, output) -> None:
            self._pending[index] = block.router_logits(inputs[0])
            if drops:
                self._dropped[index] = self._dropped[index] + block.last_dropped_fraction
        return hook

    def _on_projector(self, projector, inputs, output) -> None:
        self._features = output

    def _on_model(self, model, args, kwargs, output) -> None:
        input_ids = kwargs["input_ids"] if "input_ids" in kwargs else (args[0] if args else None)
        if input_ids is None:
            raise RuntimeError("Routing capture needs input_ids in every forward (inputs_embeds alone cannot be "
                               "laid out): call model.generate(input_ids, images=...).")
        if len(self._pending) != len(self.blocks):
            raise RuntimeError(f"A forward reached {len(self._pending)} of the {len(self.blocks)} MoE layers.")
        logits = [self._pending.pop(index) for index in range(len(self.blocks))]
        self._forward_count += 1
        batch, length = input_ids.shape
        if kwargs.get("past_key_values") is None:
            mask = kwargs.get("attention_mask")
            if self._prompt_ids is None:
                self._prompt_ids, self._prompt_mask = input_ids, mask
            elif input_ids.shape[1] < self._prompt_ids.shape[1] or not torch.equal(
                    input_ids[:, :self._prompt_ids.shape[1]], self._prompt_ids):
                raise RuntimeError("A new prompt was run before finish() was called for the previous one: call "
                                   "recorder.finish(...) after each generate().")
            positions = self._layout(input_ids, mask, kwargs.get("images"))
            self._forwards = [_Forward(positions, logits)]  # a forward without cache covers everything so far
            self._text_length = length
        else:
            if self._prompt_ids is None:
                raise RuntimeError("A decode step (past_key_values given) was recorded without its prompt forward: "
                                   "enter `with recorder:` before generate().")
            steps = torch.arange(self._text_length, self._text_length + length, device=input_ids.device)
            self._forwards.append(_Forward(steps.expand(batch, length), logits))
            self._text_length += length
        rows = self._forwards[-1].positions.numel()
        if logits[0].shape[0] != rows:
            raise RuntimeError(f"The MoE layers routed {logits[0].shape[0]} tokens but the forward laid out {rows}.")
        self._features = None

    def _layout(self, input_ids: torch.Tensor, mask: Optional[torch.Tensor], images) -> torch.Tensor:
        source = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids).clone()
        if images is None:
            return source if mask is None else source.masked_fill(mask == 0, _PAD_POSITION)
        _, _, spliced_mask, _, _, labels = self.model.prepare_inputs_labels_for_multimodal(
            input_ids, None, mask, None, source, images, image_features=self._features
        )
        positions = labels.masked_fill(labels == IGNORE_INDEX, _IMAGE_POSITION)
        return positions.masked_fill(spliced_mask == 0, _PAD_POSITION)

    # --- results ------------------------------------------------------------------------------------------
    def finish(
        self,
        output_ids,
        *,
        sample_ids: Optional[Sequence] = None,
        prompt_roles=None,
        metadata: Optional[Sequence[Dict]] = None,
        eos_token_id=None,
        lengths: Optional[Sequence[int]] = None,
    ) -> List[SampleRoutes]:
        """Close the generation recorded since the last `finish()`: one sample per batch row.

        output_ids: the generated tokens only, [B, n] (`generate(...)[:, prompt_length:]`); [B, 0] after a
          plain forward over the prompt. A row ends at its first eos (`eos_token_id`, default the model's
          generation config), or after `lengths[b]` of its tokens when given (a batched generator that cuts rows
          at a stop string); what generate appended after that is recorded as padding.
        sample_ids: one id per row (default: running numbers). metadata: one JSON dict per row.
        prompt_roles: [B, P] role codes (`INSTRUCTION` or `ANSWER`) of the prompt tokens given to generate,
          e.g. ANSWER over earlier answers of a multi-turn prompt; default all INSTRUCTION. Image and
          padding positions are found from the model's own splicing.
        """
        if not self._forwards:
            raise RuntimeError("finish() found no recorded forward: run model.generate(...) inside `with recorder:` "
                               "first, and call finish() once per generate().")
        prompt, prompt_mask = self._prompt_ids, self._prompt_mask
        batch, prompt_length = prompt.shape
        outputs = _rows(output_ids, batch, "output_ids")
        generated = max((row.shape[0] for row in outputs), default=0)
        if self._text_length != prompt_length + max(generated - 1, 0):
            raise ValueError(
                f"The recorded forwards read {self._text_length} text tokens, but a prompt of {prompt_length} and "
                f"{generated} generated tokens mean {prompt_length + max(generated - 1, 0)}: pass only the generated "
                "tokens (sequences[:, prompt_length:]), and call finish() once per generate() (beam search and "
                "several return sequences are not supported)."
            )
        roles_in_prompt = self._prompt_roles(prompt_roles, batch, prompt_length)
        if lengths is None:
            lengths = [_length_to_eos(row, eos_token_id if eos_token_id is not None else
                                      self.model.generation_config.eos_token_id) for row in outputs]
        elif len(lengths) != batch:
            raise ValueError(f"{len(lengths)} lengths for a batch of {batch}.")
        # Rows given as a list may be shorter than the longest: the steps after their end read unknown tokens.
        outputs = [torch.cat([row, row.new_full((generated - row.shape[0],), -1)]) for row in outputs]
        sample_ids = list(sample_ids) if sample_ids is not None else [len(self.records) + b for b in range(batch)]
        metadata = list(metadata) if metadata is not None else [{} for _ in range(batch)]
        if len(sample_ids) != batch or len(metadata) != batch:
            raise ValueError(f"{len(sample_ids)} sample_ids and {len(metadata)} metadata for a batch of {batch}.")

        positions = torch.cat([f.positions for f in self._forwards], dim=1).cpu()
        layers = []
        for i, experts in enumerate(self.records.num_experts):
            logits = torch.cat([f.logits[i].view(batch, -1, experts) for f in self._forwards], dim=1)
            routing = route_tokens(logits.reshape(-1, experts), self.records.top_k)
            shape = (batch, -1, self.records.top_k)
            layers.append((logits.cpu(), routing.expert_index.view(shape).cpu(), routing.gate.view(shape).cpu()))

        finished = []
        prompt, prompt_mask = prompt.cpu(), prompt_mask.cpu() if prompt_mask is not None else None
        for b in range(batch):
            roles, token_ids = _roles_and_tokens(positions[b], prompt[b], roles_in_prompt[b], outputs[b], lengths[b])
            real = prompt_mask[b].bool() if prompt_mask is not None else torch.ones(prompt_length, dtype=torch.bool)
            sample = SampleRoutes(
                sample_id=sample_ids[b],
                roles=roles,
                token_ids=token_ids,
                router_logits=[logits[b] for logits, _, _ in layers],
                expert_index=[index[b] for _, index, _ in layers],
                expert_weight=[weight[b] for _, _, weight in layers],
                prompt_ids=prompt[b][real],
                output_ids=outputs[b][:lengths[b]],
                metadata=dict(metadata[b]),
            )
            self.records.add(sample)
            finished.append(sample)
        self._clear()
        return finished

    def _prompt_roles(self, prompt_roles, batch: int, prompt_length: int) -> torch.Tensor:
        if prompt_roles is None:
            return torch.full((batch, prompt_length), INSTRUCTION, dtype=torch.uint8)
        roles = torch.as_tensor(prompt_roles).cpu()
        if roles.shape != (batch, prompt_length):
            raise ValueError(f"prompt_roles has shape {tuple(roles.shape)}; the prompt is {(batch, prompt_length)}.")
        if not bool(((roles == INSTRUCTION) | (roles == ANSWER)).all()):
            raise ValueError(f"prompt_roles may hold only INSTRUCTION ({INSTRUCTION}) and ANSWER ({ANSWER}); image "
                             "and padding positions are found from the model's splicing.")
        return roles.to(torch.uint8)

    def save(self, path: str):
        """Write everything finished so far as `path`.safetensors + `path`.json (`moellava.vis.routes`)."""
        if self._forwards:
            raise RuntimeError("A generation was recorded but not finished: call finish() before save().")
        if self._forward_count:
            dropped = {layer: float(total) / self._forward_count
                       for layer, total in zip(self.records.layers, self._dropped) if float(total) > 0}
            if dropped:
                logger.warning("MoE layers dropped token-choices for capacity (mean fraction per forward %s); the "
                               "recorded choices are the router's, before dropping.", dropped)
            self.records.model["dropped_fraction"] = {str(layer): float(total) / self._forward_count
                                                      for layer, total in zip(self.records.layers, self._dropped)}
        return self.records.save(path)


def _rows(values, batch: int, name: str) -> List[torch.Tensor]:
    if isinstance(values, torch.Tensor):
        if values.ndim != 2 or values.shape[0] != batch:
            raise ValueError(f"{name} has shape {tuple(values.shape)}; expected [{batch}, n] (one row per prompt).")
        return [row.long() for row in values.cpu()]
    rows = [torch.as_tensor(row, dtype=torch.long).cpu() for row in values]
    if len(rows) != batch:
        raise ValueError(f"{name} has {len(rows)} rows for a batch of {batch}.")
    return rows


def _length_to_eos(row: torch.Tensor, eos_token_id) -> int:
    eos = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    hits = torch.isin(row, torch.tensor(eos, dtype=torch.long)).nonzero() if eos else []
    return int(hits[0]) + 1 if len(hits) else row.shape[0]


def _roles_and_tokens(positions: torch.Tensor, prompt: torch.Tensor, prompt_roles: torch.Tensor,
                      output: torch.Tensor, output_length: int):
    """Role and token of each routed position of one row (see `RoutingRecorder._layout` for the codes)."""
    roles = torch.full(positions.shape, PADDING, dtype=torch.uint8)
    token_ids = torch.full(positions.shape, -1, dtype=torch.long)
    image = positions == _IMAGE_POSITION
    roles[image] = IMAGE
    token_ids[image] = IMAGE_TOKEN_INDEX
    in_prompt = (positions >= 0) & (positions < prompt.shape[0])
    roles[in_prompt] = prompt_roles[positions[in_prompt]]
    token_ids[in_prompt] = prompt[positions[in_prompt]]
    in_output = positions >= prompt.shape[0]
    step = positions[in_output] - prompt.shape[0]
    roles[in_output] = torch.where(step < output_length, ANSWER, PADDING).to(torch.uint8)
    token_ids[in_output] = output[step]
    return roles, token_ids


# ----------------------------------------------------------------------------------------------------------
# The command line: a LLaVA-format dataset through a checkpoint


def prompt_and_roles(input_ids: torch.Tensor, labels: torch.Tensor, reference_answer: bool):
    """From a training-tokenized conversation (`preprocess`): the prompt that asks for its last answer and
    the role of each prompt token (earlier answers are ANSWER). With `reference_answer` the whole
    conversation is the prompt and its last answer keeps the ANSWER role."""
    spans = find_trained_spans(labels.tolist())
    end = input_ids.shape[0] if reference_answer else spans[-1][0]
    roles = torch.where(labels[:end] != IGNORE_INDEX, ANSWER, INSTRUCTION).to(torch.uint8)
    return input_ids[:end], roles


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--data", required=True, help="LLaVA-format JSON file (a list of samples ending with a gpt turn)")
    parser.add_argument("--image-folder", default=None, help="folder the samples' image paths are relative to")
    parser.add_argument("--output", required=True, help="NAME: writes NAME.safetensors and NAME.json")
    parser.add_argument("--limit", type=int, default=None, help="capture only the first N samples")
    parser.add_argument("--reference-answers", action="store_true",
                        help="route the data's own last answer (one forward) instead of generating it")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--no-cache", action="store_true", help="generate without the KV cache (slower; same routes)")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit {args.limit}: give a positive number of samples.")
    if args.temperature < 0:
        parser.error(f"--temperature {args.temperature} is negative: use 0 (greedy) or more.")
    return args


def capture_dataset(model, tokenizer, image_processor, args) -> RoutingRecorder:
    """Route each sample of `args.data` through `model`; returns the recorder holding them."""
    config = model.config
    conv = conversation_lib.set_default_conversation(resolve_conv_mode(config, args.conv_mode))
    tower = model.get_image_tower()
    data_args = DataArguments(data_path=[args.data], image_folder=args.image_folder,
                              image_aspect_ratio=getattr(config, "image_aspect_ratio", None))
    dataset = LazySupervisedDataset([args.data], tokenizer, data_args, image_processor=image_processor,
                                    tokens_per_image=tower.num_tokens if tower is not None else 0,
                                    mm_use_im_start_end=getattr(config, "mm_use_im_start_end", False))
    count = len(dataset) if args.limit is None else min(args.limit, len(dataset))
    for sample in dataset.samples[:count]:
        if str(sample.conversations[-1].get("from", "")).lower() not in ASSISTANT_ROLES:
            raise ValueError(
                f"{args.data}: sample {sample.ref.sample_id!r} (entry {sample.ref.index}) ends with a human turn. "
                "Capture regenerates (or with --reference-answers routes) each sample's last answer: end every "
                'sample with its gpt turn (its value may be "").'
            )
    dtype = next(model.parameters()).dtype
    sampling = {"do_sample": True, "temperature": args.temperature} if args.temperature > 0 else {"do_sample": False}
    recorder = RoutingRecorder(model, description={"conv_mode": conv.version, "data": args.data})
    with recorder, torch.inference_mode():
        for i in range(count):
            item, sample_id = dataset[i], dataset.samples[i].ref.sample_id
            prompt, roles = prompt_and_roles(item["input_ids"], item["labels"], args.reference_answers)
            input_ids = prompt.unsqueeze(0).to(model.device)
            images = torch.stack(item["images"]).to(model.device, dtype) if item["images"] else None
            if args.reference_answers:
                model(input_ids, images=images)
                new_tokens = input_ids.new_zeros((1, 0))
            else:
                stop = KeywordsStoppingCriteria([conv.stop_str], tokenizer, input_ids)
                sequences = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), images=images,
                                           max_new_tokens=args.max_new_tokens, use_cache=not args.no_cache,
                                           stopping_criteria=[stop], **sampling)
                new_tokens = sequences[:, input_ids.shape[1]:]
            answer = tokenizer.decode(new_tokens[0], skip_special_tokens=True).strip()
            recorder.finish(new_tokens, sample_ids=[sample_id], prompt_roles=roles.unsqueeze(0),
                            metadata=[{"answer": answer}] if not args.reference_answers else None)
            logger.info("%d/%d %s: %r", i + 1, count, sample_id, answer)
    return recorder


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's loggers print on stdout
        tokenizer, model, image_processor, _ = load_chat_model(args)
    recorder = capture_dataset(model, tokenizer, image_processor, args)
    tensors_path, index_path = recorder.save(args.output)
    records = recorder.records
    positions = sum(len(sample) for sample in records.samples)
    print(f"Captured {len(records)} samples, {positions} routed positions, MoE layers {records.layers} "
          f"({records.num_experts} experts, top-{records.top_k}): {index_path} + {tensors_path}")


if __name__ == "__main__":
    run_main(main)
