"""Routing figures from captures (`moellava.vis.routes`), as PNG and SVG, for any number of experts, MoE
layers, top-k and image tokens:

    python -m moellava.vis.plot NAME [NAME ...] --out DIR

* `expert_load` (the original's vis1): per MoE layer, the share of tokens whose first choice is each
  expert; and per expert, how its tokens divide between image and text, each modality weighted as if
  both were equally many (so the split does not just mirror how many image tokens a prompt has).
* `modality_split` (vis2): per MoE layer, how the text tokens and how the image tokens spread over the
  experts.
* `pathways` (vis3, drawn with matplotlib alone): the first-choice paths of text and of image tokens
  through the MoE layers. A line from expert i at one MoE layer to expert j at the next is as wide as the
  share of tokens that take that step; the two most frequent complete paths are drawn on top.
* `entropy_balance`: per MoE layer, the mean entropy of the router's distribution over experts (1 =
  uniform, 0 = certain) and the balance of the first choices (the normalised entropy of the load: 1 =
  every expert equally loaded).

Statistics pool every captured token of every file; padding is left out; "text" is instruction and
answer tokens together. Expert numbers are the indices stored in the capture (from 0).
"""

import argparse
import logging
import math
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from moellava.constants import IMAGE_TOKEN_INDEX
from moellava.errors import run_main
from moellava.model.moe import load_balance
from moellava.vis.routes import ANSWER, IMAGE, INSTRUCTION, PADDING, RoutingRecords

logger = logging.getLogger(__name__)

FIGURES = ("expert_load", "modality_split", "pathways", "entropy_balance")
FORMATS = ("png", "svg")
# Distinct from the first eight expert colours (tab10).
GROUP_COLOURS = {"text": "#17BECF", "image": "#3F3F3F", "all": "#BCBD22"}


@dataclass
class RoutingTable:
    """Every non-padding token of a set of captures, one row each."""

    layers: List[int]  # decoder-layer index of each MoE layer
    num_experts: List[int]
    top_k: int
    roles: torch.Tensor  # [N] role codes
    first_choice: torch.Tensor  # [N, layers] first-choice expert
    entropy: torch.Tensor  # [N, layers] router entropy, normalised by log(experts)
    num_samples: int
    tokens_per_image: Optional[float]  # image positions per <image> placeholder, when there were images

    def groups(self) -> Dict[str, torch.Tensor]:
        """Row masks of the token groups the figures compare."""
        image = self.roles == IMAGE
        return {"text": (self.roles == INSTRUCTION) | (self.roles == ANSWER), "image": image,
                "all": torch.ones_like(image)}


def routing_table(records: RoutingRecords) -> RoutingTable:
    if not records.samples:
        raise ValueError("The capture holds no sample: nothing to plot.")
    roles = torch.cat([sample.roles for sample in records.samples]).long()
    keep = roles != PADDING
    if not keep.any():
        raise ValueError("Every captured position is padding: nothing to plot.")
    first = torch.stack([torch.cat([s.expert_index[i][:, 0] for s in records.samples])
                         for i in range(len(records.layers))], dim=1)
    entropy = []
    for i, experts in enumerate(records.num_experts):
        logits = torch.cat([s.router_logits[i] for s in records.samples]).float()
        probs = torch.softmax(logits, dim=-1)
        nats = -(probs * torch.log(probs.clamp(min=1e-30))).sum(-1)
        entropy.append(nats / max(math.log(experts), 1e-12))
    placeholders = sum(int((s.prompt_ids == IMAGE_TOKEN_INDEX).sum()) for s in records.samples)
    image_positions = int((roles == IMAGE).sum())
    return RoutingTable(
        layers=records.layers,
        num_experts=records.num_experts,
        top_k=records.top_k,
        roles=roles[keep],
        first_choice=first[keep],
        entropy=torch.stack(entropy, dim=1)[keep],
        num_samples=len(records.samples),
        tokens_per_image=image_positions / placeholders if placeholders else None,
    )


def expert_shares(choice: torch.Tensor, mask: torch.Tensor, experts: int) -> torch.Tensor:
    """[experts] share of the masked tokens whose choice is each expert (zeros when none is masked)."""
    counts = torch.bincount(choice[mask], minlength=experts).float()
    return counts / counts.sum() if counts.sum() > 0 else counts


# ----------------------------------------------------------------------------------------------------------
# Drawing


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("Plotting needs matplotlib: pip install -e '.[vis]' (make install does).") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return matplotlib, plt


def expert_colours(count: int) -> list:
    from matplotlib import colormaps

    if count <= 10:
        return [colormaps["tab10"](i) for i in range(count)]
    if count <= 20:
        return [colormaps["tab20"](i) for i in range(count)]
    return [colormaps["viridis"](i / (count - 1)) for i in range(count)]


def _subtitle(table: RoutingTable) -> str:
    images = f", {table.tokens_per_image:g} tokens per image" if table.tokens_per_image else ", no image tokens"
    fewest, most = min(table.num_experts), max(table.num_experts)
    experts = f"{most}" if fewest == most else f"{fewest}-{most}"
    return f"{table.roles.numel()} tokens of {table.num_samples} samples{images}; {experts} experts, top-{table.top_k}"


def _layer_axis(ax, table: RoutingTable) -> None:
    ax.set_xticks(range(len(table.layers)))
    ax.set_xticklabels([str(layer) for layer in table.layers])
    ax.set_xlabel("MoE layer (decoder layer index)")


def _percent_axis(ax, label: Optional[str] = "Share of tokens") -> None:
    ax.set_ylim(0, 1)
    ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
    ax.set_yticklabels(["0%", "25%", "50%", "75%", "100%"])
    if label:
        ax.set_ylabel(label)


def _stacked_expert_bars(ax, table: RoutingTable, mask: torch.Tensor, colours: list) -> None:
    positions = range(len(table.layers))
    bottom = [0.0] * len(table.layers)
    for expert in range(max(table.num_experts)):
        heights = []
        for i, experts in enumerate(table.num_experts):
            shares = expert_shares(table.first_choice[:, i], mask, experts)
            heights.append(float(shares[expert]) if expert < experts else 0.0)
        ax.bar(positions, heights, bottom=bottom, color=colours[expert], label=f"expert {expert}", width=0.75)
        bottom = [b + h for b, h in zip(bottom, heights)]


def _empty_note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=11, color="#777777")


def plot_expert_load(table: RoutingTable, plt):
    """vis1: the load of every expert per layer, and each expert's image/text split."""
    experts = max(table.num_experts)
    colours = expert_colours(experts)
    columns = min(experts + 1, 5)
    rows = math.ceil((experts + 1) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.3 * columns, 3.0 * rows + 1.2), squeeze=False,
                             sharey=True, layout="constrained")
    axes = axes.flatten()
    groups = table.groups()
    _stacked_expert_bars(axes[0], table, groups["all"], colours)
    axes[0].set_title("All tokens: share per expert")
    even = 1 / experts
    axes[0].axhline(even, color="gray", linestyle="--", linewidth=1, label=f"even load ({even:.0%})")
    for expert in range(experts):
        ax = axes[expert + 1]
        image_share, text_share = [], []
        for i, count in enumerate(table.num_experts):
            image = float(expert_shares(table.first_choice[:, i], groups["image"], count)[expert]) if expert < count else 0
            text = float(expert_shares(table.first_choice[:, i], groups["text"], count)[expert]) if expert < count else 0
            total = image + text
            image_share.append(image / total if total else 0.0)
            text_share.append(text / total if total else 0.0)
        positions = range(len(table.layers))
        ax.bar(positions, text_share, color=GROUP_COLOURS["text"], label="text", width=0.75)
        ax.bar(positions, image_share, bottom=text_share, color=GROUP_COLOURS["image"], label="image", width=0.75)
        ax.axhline(0.5, color="gray", linestyle="--", linewidth=1)
        ax.set_title(f"Expert {expert}: text vs image", color=colours[expert])
    for index, ax in enumerate(axes):
        if index > experts:
            ax.axis("off")
            continue
        _layer_axis(ax, table)
        _percent_axis(ax, "Share of tokens" if index % columns == 0 else None)
    handles, labels = axes[0].get_legend_handles_labels()
    extra, extra_labels = axes[1].get_legend_handles_labels()
    fig.legend(handles + extra, labels + extra_labels, loc="outside lower center", ncol=min(len(labels) + 2, 8),
               fontsize=9, frameon=False)
    fig.suptitle(f"Expert load per MoE layer (first choices)\n{_subtitle(table)}", fontsize=12)
    return fig


def plot_modality_split(table: RoutingTable, plt):
    """vis2: per layer, how text tokens and image tokens spread over the experts."""
    colours = expert_colours(max(table.num_experts))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), sharey=True, layout="constrained")
    groups = table.groups()
    for ax, name in zip(axes, ("text", "image")):
        if groups[name].any():
            _stacked_expert_bars(ax, table, groups[name], colours)
        else:
            _empty_note(ax, f"no {name} tokens captured")
        ax.set_title(f"{name.capitalize()} tokens ({int(groups[name].sum())}): share per expert")
        _layer_axis(ax, table)
        _percent_axis(ax, "Share of tokens" if name == "text" else None)
    handles, labels = max((ax.get_legend_handles_labels() for ax in axes), key=lambda found: len(found[0]))
    fig.legend(handles, labels, loc="outside right center", title="first choice", fontsize=9)
    fig.suptitle(f"Experts chosen by text and by image tokens\n{_subtitle(table)}", fontsize=12)
    return fig


def top_paths(choices: torch.Tensor, count: int = 2):
    """The `count` most frequent rows of `choices` [N, layers] and their shares."""
    paths, frequency = torch.unique(choices, dim=0, return_counts=True)
    order = torch.argsort(frequency, descending=True, stable=True)[:count]
    return [(paths[i].tolist(), float(frequency[i]) / choices.shape[0]) for i in order]


def plot_pathways(table: RoutingTable, plt):
    """vis3: first-choice transitions between consecutive MoE layers, per modality, and the top paths."""
    from matplotlib.lines import Line2D

    experts = max(table.num_experts)
    layers = len(table.layers)
    fig, axes = plt.subplots(2, 1, figsize=(max(8.0, 1.4 * layers + 4), 2.0 + 1.1 * experts), sharex=True,
                             layout="constrained")
    groups = table.groups()
    for ax, name in zip(axes, ("text", "image")):
        mask = groups[name]
        colour = GROUP_COLOURS[name]
        ax.set_title(f"{name.capitalize()} tokens ({int(mask.sum())})")
        ax.set_ylim(-0.6, experts - 0.4)
        ax.set_yticks(range(experts))
        ax.set_yticklabels([f"expert {e}" for e in range(experts)])
        ax.set_xlim(-0.4, layers - 0.6)
        ax.grid(axis="y", color="#EEEEEE")
        if not mask.any():
            _empty_note(ax, f"no {name} tokens captured")
            continue
        choices = table.first_choice[mask]
        for i in range(layers - 1):
            steps = choices[:, i] * experts + choices[:, i + 1]
            share = torch.bincount(steps, minlength=experts * experts).float() / choices.shape[0]
            for step in share.nonzero().flatten().tolist():
                source, target = divmod(step, experts)
                ax.plot([i, i + 1], [source, target], color="#B8B8B8", alpha=0.35 + 0.5 * float(share[step]),
                        linewidth=0.4 + 14 * float(share[step]), solid_capstyle="round", zorder=1)
        for i, count in enumerate(table.num_experts):
            shares = expert_shares(choices[:, i], torch.ones(choices.shape[0], dtype=torch.bool), count)
            ax.scatter([i] * count, range(count), s=30 + 900 * shares.numpy(), color="#BBBBBB", edgecolor="#666666",
                       zorder=2)
        handles = [Line2D([0], [0], color="#B8B8B8", linewidth=4, label="step between layers (width = share)"),
                   Line2D([0], [0], marker="o", color="#BBBBBB", markeredgecolor="#666666", linestyle="",
                          markersize=10, label="expert at a layer (area = share)")]
        for rank, (path, share) in enumerate(top_paths(choices)):
            style = dict(color=colour, alpha=1.0 if rank == 0 else 0.55, linewidth=3.0 if rank == 0 else 2.2)
            ax.plot(range(layers), path, marker="D", markersize=8, zorder=3, **style)
            label = "most frequent path" if rank == 0 else "second most frequent"
            handles.append(Line2D([0], [0], marker="D", label=f"{label} ({share:.1%} of tokens)", **style))
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)
        ax.set_ylabel("first-choice expert")
    _layer_axis(axes[1], table)
    fig.suptitle(f"Top-1 pathways through the MoE layers\n{_subtitle(table)}", fontsize=12)
    return fig


def plot_entropy_balance(table: RoutingTable, plt):
    """Router entropy per token and load balance of first choices, per layer and token group."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4), layout="constrained")
    positions = list(range(len(table.layers)))
    for name, mask in table.groups().items():
        if not mask.any():
            continue
        style = dict(color=GROUP_COLOURS[name], marker="o", linewidth=2, label=f"{name} tokens")
        left.plot(positions, table.entropy[mask].mean(dim=0).tolist(), **style)
        balance = [load_balance(expert_shares(table.first_choice[:, i], mask, experts))
                   for i, experts in enumerate(table.num_experts)]
        right.plot(positions, balance, **style)
    left.set_title("Router entropy per token (mean)")
    left.set_ylabel("entropy / log(experts)")
    right.set_title("Load balance of first choices")
    right.set_ylabel("normalised entropy of the load")
    right.axhline(1.0, color="gray", linestyle="--", linewidth=1, label="perfectly even")
    for ax in (left, right):
        ax.set_ylim(0, 1.05)
        _layer_axis(ax, table)
        ax.grid(color="#EEEEEE")
        ax.legend(fontsize=9, loc="lower right")
    fig.suptitle(f"How certain the routers are and how evenly they load the experts\n{_subtitle(table)}",
                 fontsize=12)
    return fig


DRAW = {
    "expert_load": plot_expert_load,
    "modality_split": plot_modality_split,
    "pathways": plot_pathways,
    "entropy_balance": plot_entropy_balance,
}


def plot_records(records: RoutingRecords, out_dir: str, formats: Sequence[str] = FORMATS) -> List[str]:
    """Draw every figure of `records` into `out_dir`; returns the written paths."""
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ValueError(f"Unknown figure formats {unknown}: use {list(FORMATS)}.")
    matplotlib, plt = _pyplot()
    table = routing_table(records)
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for name in FIGURES:
        fig = DRAW[name](table, plt)
        for fmt in formats:
            path = os.path.join(out_dir, f"{name}.{fmt}")
            with matplotlib.rc_context({"svg.fonttype": "none"}):  # SVG text stays text: searchable, editable
                fig.savefig(path, dpi=120, bbox_inches="tight")
            written.append(path)
        plt.close(fig)
    return written


def load_captures(paths: Sequence[str]) -> RoutingRecords:
    """One `RoutingRecords` holding the samples of every capture in `paths` (of one model)."""
    records = RoutingRecords.load(paths[0])
    for path in paths[1:]:
        records.extend(RoutingRecords.load(path), source=path)
    return records


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("captures", nargs="+", help="capture NAME (or NAME.json / NAME.safetensors); several "
                                                    "files of one model are pooled")
    parser.add_argument("--out", required=True, help="folder for the figures")
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    written = plot_records(load_captures(args.captures), args.out, args.formats)
    print("\n".join(written))


if __name__ == "__main__":
    run_main(main)
