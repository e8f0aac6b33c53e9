"""The routing file: what `moellava.vis.capture` records and `moellava.vis.plot` reads (no pickle).

A capture saved as NAME is two files:

* `NAME.safetensors`, the tensors, every sample's rows concatenated in sample order:
    - `roles` uint8 [N]: the role of each routed position, a code of `ROLES` (padding, image,
      instruction, answer);
    - `token_ids` int64 [N]: the token fed at that position; -200 (IMAGE_TOKEN_INDEX) at image positions,
      -1 at padding the image splicing added;
    - per MoE layer, named by its decoder-layer index L: `layer.L.router_logits` float32 [N, E_L],
      `layer.L.expert_index` int64 [N, k] (first choice first) and `layer.L.expert_weight` float32
      [N, k] (the combine weights without capacity dropping);
    - `prompt_ids` int64 [sum of P]: each prompt as tokenized (one -200 per image), without padding;
    - `output_ids` int64 [sum of O]: each sample's generated tokens, up to and including its eos.
* `NAME.json`, the index: `format`, `version`, `roles` (name -> code), `top_k`, `moe_layers` (decoder
  index and number of experts of each MoE layer, in order), `model` (free description), and per sample
  its `id`, the `[start, end)` rows of its `routes` (roles, token_ids, layer.*), `prompt_ids` and
  `output_ids`, and `metadata` (free JSON).

A sample's routed positions are its spliced prompt (each image expanded to its feature tokens, padding
included where the batch had it) followed by its generated tokens but the last one, which the model
produced but never read back.
"""

import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import torch
from safetensors.torch import load_file, save_file

FORMAT = "moellava.routing"
VERSION = 1
ROLES = ("padding", "image", "instruction", "answer")
PADDING, IMAGE, INSTRUCTION, ANSWER = range(len(ROLES))


class RoutingFileError(ValueError):
    """A routing file that is missing, of another format, or whose tensors do not match its index."""


def routing_paths(path: str) -> Tuple[str, str]:
    """`(NAME.safetensors, NAME.json)` for `path` given as NAME, NAME.safetensors or NAME.json."""
    for suffix in (".safetensors", ".json"):
        if path.endswith(suffix):
            path = path[: -len(suffix)]
    return path + ".safetensors", path + ".json"


@dataclass
class SampleRoutes:
    """One sample's routing: per routed position its role, token and, per MoE layer, router logits and
    chosen experts (`router_logits[i]` belongs to `RoutingRecords.layers[i]`)."""

    sample_id: object
    roles: torch.Tensor
    token_ids: torch.Tensor
    router_logits: List[torch.Tensor]
    expert_index: List[torch.Tensor]
    expert_weight: List[torch.Tensor]
    prompt_ids: torch.Tensor
    output_ids: torch.Tensor
    metadata: Dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.roles.shape[0]


class RoutingRecords:
    """Samples routed by one MoE model: its MoE layers (decoder indices), experts per layer and top-k."""

    def __init__(self, layers: Sequence[int], num_experts: Sequence[int], top_k: int, model: Dict = None):
        if len(layers) != len(num_experts) or not layers:
            raise ValueError(f"layers {list(layers)} and num_experts {list(num_experts)} must be non-empty and "
                             "of the same length (one entry per MoE layer).")
        self.layers = [int(layer) for layer in layers]
        self.num_experts = [int(count) for count in num_experts]
        self.top_k = int(top_k)
        self.model = dict(model or {})
        self.samples: List[SampleRoutes] = []

    def __len__(self) -> int:
        return len(self.samples)

    def add(self, sample: SampleRoutes) -> None:
        n = len(sample)
        per_layer = (sample.router_logits, sample.expert_index, sample.expert_weight)
        if any(len(tensors) != len(self.layers) for tensors in per_layer):
            raise ValueError(f"sample {sample.sample_id!r}: routing for {len(sample.router_logits)} layers, "
                             f"the model has {len(self.layers)} MoE layers.")
        for experts, logits, index, weight in zip(self.num_experts, *per_layer):
            if logits.shape != (n, experts) or index.shape != (n, self.top_k) or weight.shape != (n, self.top_k):
                raise ValueError(
                    f"sample {sample.sample_id!r}: routing shapes {tuple(logits.shape)}, {tuple(index.shape)}, "
                    f"{tuple(weight.shape)} do not fit {n} positions, {experts} experts and top-{self.top_k}."
                )
        if sample.token_ids.shape != (n,):
            raise ValueError(f"sample {sample.sample_id!r}: {sample.token_ids.shape[0]} token ids for {n} positions.")
        self.samples.append(sample)

    def extend(self, other: "RoutingRecords", source: str = "") -> None:
        """Append the samples of `other` (another file of the same model, e.g. another eval chunk)."""
        if (other.layers, other.num_experts, other.top_k) != (self.layers, self.num_experts, self.top_k):
            raise RoutingFileError(
                f"{source or 'these routes'} come from MoE layers {other.layers} with experts {other.num_experts} "
                f"and top-{other.top_k}, not {self.layers} / {self.num_experts} / top-{self.top_k}: plot the "
                "captures of different models separately."
            )
        self.samples.extend(other.samples)

    # --- saving and loading -------------------------------------------------------------------------------
    def save(self, path: str) -> Tuple[str, str]:
        """Write `NAME.safetensors` and `NAME.json` (see the module docstring); returns both paths."""
        if not self.samples:
            raise ValueError(f"No sample was recorded, nothing to save to {path}: call finish() after each generate().")
        tensors_path, index_path = routing_paths(path)
        folder = os.path.dirname(os.path.abspath(tensors_path))
        os.makedirs(folder, exist_ok=True)
        tensors = {
            "roles": torch.cat([s.roles for s in self.samples]).to(torch.uint8),
            "token_ids": torch.cat([s.token_ids for s in self.samples]).long(),
            "prompt_ids": torch.cat([s.prompt_ids for s in self.samples]).long(),
            "output_ids": torch.cat([s.output_ids for s in self.samples]).long(),
        }
        for i, layer in enumerate(self.layers):
            tensors[f"layer.{layer}.router_logits"] = torch.cat([s.router_logits[i] for s in self.samples]).float()
            tensors[f"layer.{layer}.expert_index"] = torch.cat([s.expert_index[i] for s in self.samples]).long()
            tensors[f"layer.{layer}.expert_weight"] = torch.cat([s.expert_weight[i] for s in self.samples]).float()
        save_file({name: value.contiguous() for name, value in tensors.items()}, tensors_path,
                  metadata={"format": FORMAT})

        offsets = {"routes": 0, "prompt_ids": 0, "output_ids": 0}
        samples = []
        for sample in self.samples:
            entry = {"id": sample.sample_id}
            for key, length in (("routes", len(sample)), ("prompt_ids", sample.prompt_ids.shape[0]),
                                ("output_ids", sample.output_ids.shape[0])):
                entry[key] = [offsets[key], offsets[key] + length]
                offsets[key] += length
            entry["metadata"] = sample.metadata
            samples.append(entry)
        index = {
            "format": FORMAT,
            "version": VERSION,
            "tensors": os.path.basename(tensors_path),
            "roles": {name: code for code, name in enumerate(ROLES)},
            "top_k": self.top_k,
            "moe_layers": [{"layer": layer, "num_experts": count} for layer, count in zip(self.layers, self.num_experts)],
            "model": self.model,
            "samples": samples,
        }
        with open(index_path, "w", encoding="utf-8") as f:
            json.dump(index, f, indent=1)
            f.write("\n")
        return tensors_path, index_path

    @classmethod
    def load(cls, path: str) -> "RoutingRecords":
        """Read a capture saved by `save` (`path`: NAME, NAME.json or NAME.safetensors)."""
        tensors_path, index_path = routing_paths(path)
        for needed in (index_path, tensors_path):
            if not os.path.isfile(needed):
                raise RoutingFileError(
                    f"{needed} does not exist: a routing capture is NAME.json + NAME.safetensors, written by "
                    "`python -m moellava.vis.capture` or an eval generator's --return_gating_logit NAME."
                )
        try:
            with open(index_path, encoding="utf-8") as f:
                index = json.load(f)
        except json.JSONDecodeError as err:
            raise RoutingFileError(f"{index_path}: malformed JSON at line {err.lineno}: {err.msg}.") from None
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise RoutingFileError(
                f"{index_path} is not a routing index (format {FORMAT!r}). The original MoE-LLaVA's .pt gating "
                "logits are a pickle and are not read: capture again with `python -m moellava.vis.capture`."
            )
        if index.get("version") != VERSION:
            raise RoutingFileError(f"{index_path} has format version {index.get('version')}, this code reads {VERSION}.")
        if index.get("roles") != {name: code for code, name in enumerate(ROLES)}:
            raise RoutingFileError(f"{index_path}: role codes {index.get('roles')} differ from {ROLES}.")
        layers = [entry["layer"] for entry in index["moe_layers"]]
        records = cls(layers, [entry["num_experts"] for entry in index["moe_layers"]], index["top_k"], index["model"])
        tensors = load_file(tensors_path)
        expected = {"roles", "token_ids", "prompt_ids", "output_ids"} | {
            f"layer.{layer}.{name}" for layer in layers for name in ("router_logits", "expert_index", "expert_weight")
        }
        if set(tensors) != expected:
            raise RoutingFileError(
                f"{tensors_path} holds {sorted(set(tensors) ^ expected)} unlike its index {index_path} "
                "(missing or extra tensors): the two files belong to different captures."
            )
        stored = {"routes": tensors["roles"].shape[0], "prompt_ids": tensors["prompt_ids"].shape[0],
                  "output_ids": tensors["output_ids"].shape[0]}
        ends = dict.fromkeys(stored, 0)
        for entry in index["samples"]:
            try:
                for key in stored:  # each sample's rows follow the previous sample's, within the tensors
                    start, end = entry[key]
                    if start != ends[key] or not start <= end <= stored[key]:
                        raise ValueError(f"its {key} rows [{start}, {end}) do not follow on from row {ends[key]} "
                                         f"within the {stored[key]} stored")
                    ends[key] = end
                routes, prompt, output = (slice(*entry[key]) for key in ("routes", "prompt_ids", "output_ids"))
                records.add(SampleRoutes(
                    sample_id=entry["id"],
                    roles=tensors["roles"][routes],
                    token_ids=tensors["token_ids"][routes],
                    router_logits=[tensors[f"layer.{layer}.router_logits"][routes] for layer in layers],
                    expert_index=[tensors[f"layer.{layer}.expert_index"][routes] for layer in layers],
                    expert_weight=[tensors[f"layer.{layer}.expert_weight"][routes] for layer in layers],
                    prompt_ids=tensors["prompt_ids"][prompt],
                    output_ids=tensors["output_ids"][output],
                    metadata=entry.get("metadata", {}),
                ))
            except (KeyError, TypeError, ValueError) as err:
                raise RoutingFileError(
                    f"{index_path}: sample {entry.get('id')!r} does not match {tensors_path} ({err}): the two files "
                    "belong to different captures."
                ) from None
        if ends != stored:
            raise RoutingFileError(f"{index_path} indexes {ends} rows but {tensors_path} holds {stored}: the two "
                                   "files belong to different captures.")
        return records
