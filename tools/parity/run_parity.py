"""Logit and greedy-generation parity of our backbones against the transformers-native implementations.

Run with the parity environment (see README.md):

    tools/parity/.venv/bin/python tools/parity/run_parity.py

Two processes, each on the transformers release its code is written for:
1. reference (this interpreter, transformers >= 4.44 with native Phi, StableLM, Mistral): builds tiny random
   models, saves them with save_pretrained (official key names and config fields), and records their logits
   for a plain batch, a left-padded batch and token-by-token cached decoding, plus 20 greedy tokens;
2. ours (the project's .venv, transformers 4.31): `run_parity.py --ours WORKDIR` loads every saved folder with
   AutoModelForCausalLM from `moellava` (imported from this repository via sys.path) and records the same.
The reference process then prints the fp32 differences and exits non-zero if any case misses the tolerance.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOLERANCE = 1e-4
VOCAB = 128
PROMPT_LEN = 16
NEW_TOKENS = 20

# name -> (reference family, config fields, config.json rewrite for our side or None)
CASES = {
    "phi": ("phi", dict(partial_rotary_factor=0.5), None),
    # StableLM-2-1.6B layout: qkv bias, 25% rotary, as many key/value heads as heads.
    "stablelm": ("stablelm", dict(use_qkv_bias=True, partial_rotary_factor=0.25, num_key_value_heads=4), None),
    "stablelm_epoch": (
        "stablelm",
        dict(use_qkv_bias=True, partial_rotary_factor=0.25, num_key_value_heads=4),
        "stablelm_epoch",
    ),
    # StableLM-2-12B features.
    "stablelm_qknorm_parallel_gqa": (
        "stablelm",
        dict(use_qkv_bias=False, qk_layernorm=True, use_parallel_residual=True, num_key_value_heads=2,
             partial_rotary_factor=0.5),
        None,
    ),
    # Window 6 < prompt 16 + 20 new tokens: the window is exercised in the batch and during decoding.
    "mistral_gqa_window6": ("mistral", dict(num_key_value_heads=2, sliding_window=6), None),
    "mistral_no_window": ("mistral", dict(num_key_value_heads=1, sliding_window=None), None),
    # Mistral-Nemo style explicit head_dim (heads * head_dim != hidden_size).
    "mistral_head_dim32": ("mistral", dict(num_key_value_heads=2, head_dim=32, sliding_window=8), None),
}

# stablelm field -> stablelm_epoch field (configuration_stablelm_epoch.py of stabilityai/stablelm-2-1_6b).
EPOCH_RENAMES = {"layer_norm_eps": "norm_eps", "partial_rotary_factor": "rope_pct"}


def make_inputs():
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, VOCAB, (2, PROMPT_LEN), generator=generator)
    # Left padding: sample 1 has 5 pad tokens; positions count real tokens only (as generate() does).
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :5] = 0
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}


@torch.no_grad()
def run_model(model, inputs):
    """Logits of the batch, of the left-padded batch, of cached decoding, and greedy tokens."""
    model.eval()
    input_ids, attention_mask, position_ids = inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"]
    full = model(input_ids=input_ids, use_cache=False).logits
    padded = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    # Prefill 4 tokens, then one token at a time through the cache.
    step = model(input_ids=input_ids[:, :4], use_cache=True)
    cached, past = [step.logits], step.past_key_values
    for t in range(4, PROMPT_LEN):
        step = model(input_ids=input_ids[:, t : t + 1], past_key_values=past, use_cache=True)
        cached.append(step.logits)
        past = step.past_key_values
    # No end-of-sequence stop: all 20 tokens are compared. (transformers 4.31 ignores eos_token_id=None passed to
    # generate() and rebuilds the generation config from the model config, hence both.)
    model.config.eos_token_id = model.generation_config.eos_token_id = None
    generated = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        num_beams=1,
        pad_token_id=0,
    )
    return {
        "full": full,
        "padded": padded,
        "cached": torch.cat(cached, dim=1),
        "generated": generated[:, PROMPT_LEN:],
        "keys": sorted(model.state_dict().keys()),
    }


def build_reference(family, fields):
    import transformers

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, max_position_embeddings=128, bos_token_id=1, eos_token_id=2)
    config_class = {"phi": transformers.PhiConfig, "stablelm": transformers.StableLmConfig,
                    "mistral": transformers.MistralConfig}[family]
    config = config_class(**common, **fields)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    # Random norms and biases too, so that every parameter matters to the comparison.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.15)
    return model.float().eval()


def to_epoch_config(path):
    with open(path) as f:
        config = json.load(f)
    for new, old in EPOCH_RENAMES.items():
        config[old] = config.pop(new)
    config["num_heads"] = config["num_attention_heads"]
    config["model_type"] = "stablelm_epoch"
    config["architectures"] = ["StableLMEpochForCausalLM"]
    with open(path, "w") as f:
        json.dump(config, f, indent=2)


def reference_side(workdir, cases):
    import transformers

    inputs = make_inputs()
    torch.save(inputs, os.path.join(workdir, "inputs.pt"))
    for name in cases:
        family, fields, rewrite = CASES[name]
        model = build_reference(family, fields)
        folder = os.path.join(workdir, name)
        model.save_pretrained(folder, safe_serialization=True)
        if rewrite == "stablelm_epoch":
            to_epoch_config(os.path.join(folder, "config.json"))
        torch.save(run_model(model, inputs), os.path.join(folder, "reference.pt"))
    return transformers.__version__


def ours_side(workdir, cases):
    sys.path.insert(0, REPO)
    import transformers
    from transformers import AutoModelForCausalLM

    import moellava.model.language_model.mistral  # noqa: F401  (registers model_type mistral)
    import moellava.model.language_model.phi  # noqa: F401
    import moellava.model.language_model.stablelm  # noqa: F401

    inputs = torch.load(os.path.join(workdir, "inputs.pt"))
    for name in cases:
        folder = os.path.join(workdir, name)
        model, info = AutoModelForCausalLM.from_pretrained(
            folder, torch_dtype=torch.float32, output_loading_info=True
        )
        outputs = run_model(model, inputs)
        outputs["loading_info"] = {k: sorted(v) if isinstance(v, (set, list)) else str(v) for k, v in info.items()}
        outputs["class"] = type(model).__name__
        torch.save(outputs, os.path.join(folder, "ours.pt"))
    return transformers.__version__


def compare(workdir, cases):
    inputs = torch.load(os.path.join(workdir, "inputs.pt"))
    real = inputs["attention_mask"].bool()
    rows, ok = [], True
    for name in cases:
        ref = torch.load(os.path.join(workdir, name, "reference.pt"))
        ours = torch.load(os.path.join(workdir, name, "ours.pt"))
        full = (ref["full"] - ours["full"]).abs().max().item()
        # Padding positions' outputs are arbitrary; compare the real tokens.
        padded = (ref["padded"] - ours["padded"]).abs()[real].max().item()
        cached = (ref["cached"] - ours["cached"]).abs().max().item()
        cache_vs_full = (ours["cached"] - ours["full"]).abs().max().item()
        same_tokens = torch.equal(ref["generated"], ours["generated"])
        same_keys = ref["keys"] == ours["keys"]
        clean_load = not any(ours["loading_info"][k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
        passed = max(full, padded, cached, cache_vs_full) < TOLERANCE and same_tokens and same_keys and clean_load
        ok &= passed
        rows.append((name, ours["class"], full, padded, cached, cache_vs_full, same_tokens, same_keys and clean_load,
                     passed))
    header = ("case", "our class", "full", "padded", "cached", "ours cache-vs-full", "greedy 20 equal",
              "keys equal+clean load", "pass")
    print(f"max |dlogits| in fp32 (tolerance {TOLERANCE:g}), {NEW_TOKENS} greedy tokens on a left-padded batch of 2")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, cls, full, padded, cached, cvf, same_tokens, keys, passed in rows:
        print(f"| {name} | {cls} | {full:.2e} | {padded:.2e} | {cached:.2e} | {cvf:.2e} | {same_tokens} | {keys} "
              f"| {'PASS' if passed else 'FAIL'} |")
    return ok


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ours", metavar="WORKDIR", help="internal: run our side on a prepared folder")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--python", default=os.path.join(REPO, ".venv", "bin", "python"),
                        help="interpreter of the project environment (transformers 4.31)")
    args = parser.parse_args()
    if args.ours:
        print("ours: transformers", ours_side(args.ours, args.cases))
        return
    if not os.path.exists(args.python):
        sys.exit(f"project interpreter {args.python} not found; create the project .venv (make install) "
                 "or pass --python")
    with tempfile.TemporaryDirectory() as workdir:
        print("reference: transformers", reference_side(workdir, args.cases))
        subprocess.run([args.python, os.path.abspath(__file__), "--ours", workdir, "--cases", *args.cases],
                       check=True)
        sys.exit(0 if compare(workdir, args.cases) else 1)


if __name__ == "__main__":
    main()
