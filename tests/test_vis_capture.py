"""Routing capture (`moellava.vis.capture`): the captured choices are what the MoE blocks routed, cached and
uncached generation give the same routes, token roles with images expanded (two images, three turns,
padded batches), the routing file round trip, and the errors."""

import json

import pytest
import torch

from moellava.constants import IMAGE_TOKEN_INDEX
from moellava.mm_utils import tokenizer_image_token
from moellava.model.moe import moe_blocks
from moellava.tokenization import load_tokenizer
from moellava.vis import capture
from moellava.vis.capture import RoutingRecorder
from moellava.vis.routes import ANSWER, IMAGE, INSTRUCTION, PADDING, ROLES, RoutingFileError, RoutingRecords

import tiny_llava

PROMPT = "A chat. USER: <image>\nWhat is in the image? ASSISTANT:"


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vis_capture")
    return {"root": root, "tokenizer": tiny_llava.build_tiny_llama_tokenizer(root / "tokenizer"),
            "tower": tiny_llava.build_tiny_clip_tower(root / "clip")}


@pytest.fixture(scope="module")
def tokenizer(dirs):
    return load_tokenizer(dirs["tokenizer"])


@pytest.fixture(scope="module")
def model(dirs):
    """A 4-layer MoE LLaVA (MoE layers 0 and 2, 4 experts, top-2) whose experts and routers differ."""
    dense = tiny_llava.tiny_llava_llama(dirs["tokenizer"], dirs["tower"])
    moe = tiny_llava.upcycle_llava_llama(dense, num_experts=4, moe_mode="sparse", top_k_experts=2)
    tiny_llava.perturb_experts(moe, scale=0.2)
    return moe


@pytest.fixture(scope="module")
def prompt(tokenizer):
    return tokenizer_image_token(PROMPT, tokenizer, return_tensors="pt").unsqueeze(0)


def generate(model, recorder, prompt, pixels, use_cache=True, new_tokens=6):
    with recorder, torch.no_grad():
        sequences = model.generate(prompt, images=pixels, do_sample=False, max_new_tokens=new_tokens,
                                   min_new_tokens=new_tokens, use_cache=use_cache)
        (sample,) = recorder.finish(sequences[:, prompt.shape[1]:])
    return sample, sequences[0, prompt.shape[1]:]


def test_captured_choices_are_what_the_blocks_routed(model, prompt):
    blocks = moe_blocks(model)
    seen = {i: [] for i in range(len(blocks))}  # per block, per forward: (input, output, tokens per expert)

    def keep(i):
        def hook(block, inputs, output):
            seen[i].append((inputs[0].reshape(-1, inputs[0].shape[-1]), output.reshape(-1, output.shape[-1]),
                            block.last_tokens_per_expert.clone()))
        return hook

    handles = [block.register_forward_hook(keep(i)) for i, block in enumerate(blocks)]
    try:
        sample, _ = generate(model, RoutingRecorder(model), prompt, tiny_llava.random_pixels(1))
    finally:
        for handle in handles:
            handle.remove()
    assert len(sample) == prompt.shape[1] - 1 + 16 + 5  # image expanded; the last generated token is never read
    for i, block in enumerate(blocks):
        tokens = torch.cat([x for x, _, _ in seen[i]])
        routed = torch.cat([y for _, y, _ in seen[i]])
        index, weight = sample.expert_index[i], sample.expert_weight[i]
        assert tokens.shape[0] == len(sample) and index.shape == (len(sample), 2)
        experts = block.deepspeed_moe.experts.deepspeed_experts
        rebuilt = torch.stack([sum(weight[t, k] * experts[int(index[t, k])](tokens[t]) for k in range(2))
                               for t in range(tokens.shape[0])])
        torch.testing.assert_close(rebuilt, routed, rtol=1e-5, atol=1e-5)
        start = 0
        for x, _, counts in seen[i]:  # per forward: the block's own count of choices per expert
            chosen = index[start:start + x.shape[0]].flatten()
            assert torch.bincount(chosen, minlength=4).tolist() == counts.tolist()
            start += x.shape[0]
        assert len({tuple(row) for row in index.tolist()}) > 2  # routing differs between tokens


def test_cached_and_uncached_generation_give_the_same_routes(model, prompt):
    pixels = tiny_llava.random_pixels(1, seed=4)
    cached, cached_ids = generate(model, RoutingRecorder(model), prompt, pixels, use_cache=True)
    full, full_ids = generate(model, RoutingRecorder(model), prompt, pixels, use_cache=False)
    assert torch.equal(cached_ids, full_ids)
    assert torch.equal(cached.roles, full.roles) and torch.equal(cached.token_ids, full.token_ids)
    for layer in range(2):
        assert torch.equal(cached.expert_index[layer], full.expert_index[layer])
        torch.testing.assert_close(cached.router_logits[layer], full.router_logits[layer], rtol=1e-4, atol=1e-5)
    expected = [INSTRUCTION] * 8 + [IMAGE] * 16 + [INSTRUCTION] * (prompt.shape[1] - 9) + [ANSWER] * 5
    assert cached.roles.tolist() == expected
    assert cached.token_ids[8:24].tolist() == [IMAGE_TOKEN_INDEX] * 16
    assert cached.token_ids[24:].tolist() == prompt[0, 9:].tolist() + cached_ids[:5].tolist()
    assert torch.equal(cached.prompt_ids, prompt[0]) and torch.equal(cached.output_ids, cached_ids)


def test_left_padded_batch_rows_route_like_single_prompts_and_pad_after_eos(model, tokenizer, prompt):
    short = tokenizer_image_token("USER: <image>\nColour? ASSISTANT:", tokenizer, return_tensors="pt")
    width = prompt.shape[1]
    ids = torch.full((2, width), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    ids[0], mask[0] = prompt[0], 1
    ids[1, width - short.shape[0]:], mask[1, width - short.shape[0]:] = short, 1
    pixels = tiny_llava.random_pixels(2, seed=5)
    recorder = RoutingRecorder(model)
    model.config.tokenizer_padding_side = "left"
    try:
        with recorder, torch.no_grad():
            out = model.generate(ids, attention_mask=mask, images=pixels, do_sample=False, max_new_tokens=5,
                                 min_new_tokens=5, pad_token_id=tokenizer.pad_token_id)
            new = out[:, width:]
            eos = int(new[1, 1])  # pretend row 1 ended at its second token
            rows = recorder.finish(new, sample_ids=["long", "short"], eos_token_id=eos)
            stop = int((new[1] == eos).nonzero()[0]) + 1
            model.generate(ids, attention_mask=mask, images=pixels, do_sample=False, max_new_tokens=5,
                           min_new_tokens=5, pad_token_id=tokenizer.pad_token_id)
            # The same rows given as a list, the short one cut after its end: the same samples.
            again = recorder.finish([new[0], new[1, :stop]], sample_ids=["long", "short"])
    finally:
        model.config.tokenizer_padding_side = None
    singles = [generate(model, RoutingRecorder(model), p[None], pixels[i:i + 1], new_tokens=5)[0]
               for i, p in enumerate((prompt[0], short))]
    padding = width - short.shape[0]
    assert rows[1].roles[:padding].tolist() == [PADDING] * padding
    assert rows[1].token_ids[:padding].tolist() == [-1] * padding
    assert rows[1].sample_id == "short" and torch.equal(rows[1].prompt_ids, short)
    assert rows[1].output_ids.tolist() == new[1, :stop].tolist()
    for row, same in zip(rows, again):
        assert torch.equal(row.roles, same.roles) and torch.equal(row.output_ids, same.output_ids)
        assert torch.equal(row.token_ids[row.roles != PADDING], same.token_ids[same.roles != PADDING])
    generated = rows[1].roles[-4:].tolist()  # the 4 decode steps read generated tokens 0..3
    assert generated == [ANSWER] * stop + [PADDING] * (4 - stop)
    assert eos not in new[0, :4].tolist() and rows[0].roles.tolist().count(PADDING) == 0
    for row, single in zip(rows, singles):  # real positions route as the prompt alone did
        kept = row.roles != PADDING
        for layer in range(2):
            assert torch.equal(row.expert_index[layer][kept], single.expert_index[layer][: int(kept.sum())])


def two_image_sample():
    return {"id": "two-images", "image": ["a.png", "b.png"], "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is the shape?"},
        {"from": "gpt", "value": "A red shape."},
        {"from": "human", "value": "<image>\nAnd in this one?"},
        {"from": "gpt", "value": "A blue shape."},
        {"from": "human", "value": "Which one is bigger?"},
        {"from": "gpt", "value": "The first one."},
    ]}


@pytest.fixture(scope="module")
def checkpoint(dirs, model, tokenizer):
    folder = dirs["root"] / "moe"
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    images = dirs["root"] / "images"
    images.mkdir()
    for seed, name in enumerate(("a.png", "b.png")):
        tiny_llava.write_test_image(images / name, seed=seed)
    data = dirs["root"] / "data.json"
    data.write_text(json.dumps([two_image_sample(), {"id": "text", "conversations": [
        {"from": "human", "value": "Hello?"}, {"from": "gpt", "value": "A greeting."}]}]))
    return {"model": str(folder), "images": str(images), "data": str(data)}


def role_runs(sample, tokenizer):
    """Consecutive positions of one role as (role, text without spaces) or ("image", count)."""
    runs = []
    for role, token in zip(sample.roles.tolist(), sample.token_ids.tolist()):
        if not runs or runs[-1][0] != ROLES[role]:
            runs.append([ROLES[role], []])
        runs[-1][1].append(token)
    return [(role, len(ids)) if role == "image" else
            (role, "".join(tokenizer.decode(ids, skip_special_tokens=False).split())) for role, ids in runs]


PINNED_RUNS = [
    ("instruction", "<s>Achatbetweenacurioususerandanartificialintelligenceassistant.Theassistantgives"
                    "helpful,detailed,andpoliteanswerstotheuser'squestions.USER:"),
    ("image", 16),
    ("instruction", "Whatcolouristheshape?ASSISTANT:"),
    ("answer", "Aredshape.</s>"),
    ("instruction", "USER:"),
    ("image", 16),
    ("instruction", "Andinthisone?ASSISTANT:"),
    ("answer", "Ablueshape.</s>"),
    ("instruction", "USER:Whichoneisbigger?ASSISTANT:"),
]


def run_capture(checkpoint, out, *extra):
    capture.main(["--model-path", checkpoint["model"], "--data", checkpoint["data"], "--image-folder",
                  checkpoint["images"], "--output", str(out), "--max-new-tokens", "4", *extra])
    return RoutingRecords.load(str(out) + ".json")


def test_roles_of_two_images_and_three_turns_are_pinned(checkpoint, tokenizer, tmp_path):
    reference = run_capture(checkpoint, tmp_path / "reference", "--reference-answers")
    assert [s.sample_id for s in reference.samples] == ["two-images", "text"]
    runs = role_runs(reference.samples[0], tokenizer)
    assert runs == PINNED_RUNS + [("answer", "Thefirstone.</s>")]
    assert reference.samples[0].output_ids.numel() == 0
    assert (reference.samples[0].prompt_ids == IMAGE_TOKEN_INDEX).sum() == 2

    generated = run_capture(checkpoint, tmp_path / "generated")
    sample = generated.samples[0]
    runs = role_runs(sample, tokenizer)
    assert runs[:-1] == PINNED_RUNS and runs[-1][0] == "answer"
    assert sample.token_ids[-3:].tolist() == sample.output_ids[:3].tolist()  # 4 generated, 3 read back
    assert sample.metadata["answer"] == tokenizer.decode(sample.output_ids, skip_special_tokens=True).strip()
    text_only = role_runs(generated.samples[1], tokenizer)
    assert [role for role, _ in text_only] == ["instruction", "answer"]
    assert generated.layers == [0, 2] and generated.num_experts == [4, 4] and generated.top_k == 2
    assert generated.model["image_tokens"] == 16 and generated.model["conv_mode"] == "v1"


def test_capture_refuses_a_sample_that_ends_with_a_question(checkpoint, tmp_path):
    data = tmp_path / "open.json"
    question = {"id": "q7", "conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."},
                                              {"from": "human", "value": "And then?"}]}
    data.write_text(json.dumps([two_image_sample(), question]))
    with pytest.raises(ValueError, match=r"sample 'q7' \(entry 1\) ends with a human turn"):
        capture.main(["--model-path", checkpoint["model"], "--data", str(data), "--image-folder", checkpoint["images"],
                      "--output", str(tmp_path / "x")])
    assert not (tmp_path / "x.json").exists()


def test_routing_file_round_trip_and_errors(model, prompt, tmp_path):
    recorder = RoutingRecorder(model)
    first, _ = generate(model, recorder, prompt, tiny_llava.random_pixels(1))
    second, _ = generate(model, recorder, prompt, tiny_llava.random_pixels(1, seed=9), new_tokens=3)
    tensors, index = recorder.save(str(tmp_path / "routes.safetensors"))
    assert (tensors, index) == (str(tmp_path / "routes.safetensors"), str(tmp_path / "routes.json"))
    loaded = RoutingRecords.load(str(tmp_path / "routes"))
    assert [s.sample_id for s in loaded.samples] == [0, 1]
    for saved, original in zip(loaded.samples, (first, second)):
        for name in ("roles", "token_ids", "prompt_ids", "output_ids"):
            assert torch.equal(getattr(saved, name), getattr(original, name).to(getattr(saved, name).dtype))
        for layer in range(2):
            assert torch.equal(saved.expert_index[layer], original.expert_index[layer])
            assert torch.equal(saved.router_logits[layer], original.router_logits[layer])
    with open(index) as f:
        assert json.load(f)["model"]["dropped_fraction"] == {"0": 0.0, "2": 0.0}  # dropless native backend

    (tmp_path / "old.json").write_text(json.dumps({"0": {"gating_logit": []}}))
    (tmp_path / "old.safetensors").write_bytes((tmp_path / "routes.safetensors").read_bytes())
    with pytest.raises(RoutingFileError, match="not a routing index"):
        RoutingRecords.load(str(tmp_path / "old.json"))
    with pytest.raises(RoutingFileError, match="missing.json does not exist"):
        RoutingRecords.load(str(tmp_path / "missing"))
    broken = json.loads((tmp_path / "routes.json").read_text())
    broken["samples"][1]["routes"][1] += 1
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    (tmp_path / "broken.safetensors").write_bytes((tmp_path / "routes.safetensors").read_bytes())
    with pytest.raises(RoutingFileError, match="belong to different captures"):
        RoutingRecords.load(str(tmp_path / "broken"))


def test_recorder_misuse_is_refused_with_the_fix(dirs, model, prompt):
    recorder = RoutingRecorder(model)
    with pytest.raises(RuntimeError, match="no recorded forward"):
        recorder.finish(torch.zeros(1, 0, dtype=torch.long))
    with recorder, torch.no_grad():
        out = model.generate(prompt, images=tiny_llava.random_pixels(1), do_sample=False, max_new_tokens=3,
                             min_new_tokens=3)
        with pytest.raises(ValueError, match=r"pass only the generated tokens \(sequences\[:, prompt_length:\]\)"):
            recorder.finish(out)
        with pytest.raises(ValueError, match="prompt_roles may hold only"):
            recorder.finish(out[:, prompt.shape[1]:], prompt_roles=torch.full(prompt.shape, IMAGE))
        with pytest.raises(RuntimeError, match="not finished: call finish"):
            recorder.save("unused")
        recorder.finish(out[:, prompt.shape[1]:])
        model(prompt, images=tiny_llava.random_pixels(1))
        with pytest.raises(RuntimeError, match="A new prompt was run before finish"):
            model(prompt[:, 1:], images=tiny_llava.random_pixels(1))
    with pytest.raises(ValueError, match="no MoE layers"):
        RoutingRecorder(tiny_llava.tiny_llava_llama(dirs["tokenizer"], dirs["tower"]))


def test_hooks_are_off_outside_the_recorder(model, prompt):
    recorder = RoutingRecorder(model)
    with recorder:
        pass
    with torch.no_grad():
        model(prompt, images=tiny_llava.random_pixels(1))
    with pytest.raises(RuntimeError, match="no recorded forward"):
        recorder.finish(torch.zeros(1, 0, dtype=torch.long))
    assert all(not block._forward_hooks for block in moe_blocks(model))


def test_demo_step_captures_and_draws_the_figures(checkpoint, tmp_path, capsys):
    from moellava.demo import routing

    figures = routing.plot_routing(checkpoint["model"], checkpoint["data"], checkpoint["images"],
                                   str(tmp_path / "vis"), limit=1)
    assert sorted(p.name for p in (tmp_path / "vis").iterdir()) == sorted(
        ["routing.json", "routing.safetensors"] + [f"{name}.{fmt}" for name in ("entropy_balance", "expert_load",
                                                                               "modality_split", "pathways")
                                                   for fmt in ("png", "svg")])
    assert len(figures) == 8
    assert len(RoutingRecords.load(str(tmp_path / "vis" / "routing"))) == 1
    out = capsys.readouterr().out
    assert f"+ python -m moellava.vis.plot {tmp_path / 'vis' / 'routing'} --out {tmp_path / 'vis'}" in out
