"""Answer generation of moellava.eval on tiny checkpoints: batched greedy answers equal batch-1 answers
(dense and MoE, left padding, images of several sizes, answers that end at different steps), an
interrupted run resumes to the same answers file, chunks split as the original's, and each question
format (jsonl, ScienceQA, MMBench) builds the original's prompts and answer lines."""

import json
import logging
import os

import pytest
import torch

from moellava.conversation import get_conv_template
from moellava.eval import model_vqa, model_vqa_loader, model_vqa_mmbench, model_vqa_science
from moellava.eval.answers import AnswersFile, Question, get_chunk, split_list
from moellava.eval.generation import AnswerGenerator, GenerationSettings, PromptEncoder
from moellava.mm_utils import preprocess_image, tokenizer_image_token
from moellava.model import LlavaLlamaForCausalLM, MoELLaVALlamaForCausalLM
from moellava.tokenization import load_tokenizer

import eval_fixtures
import tiny_llava
from eval_fixtures import write_json, write_jsonl

QUESTIONS = ["What is it?", "What is this thing on the left of the picture?", "Colour?", "Is there a cat here or not?",
             "Describe the image in a few words, please.", "Why?", "What shape is in the middle of the image?"]


def end_where_a_token_was(model, tokenizer, questions, images) -> None:
    """Give the end token the output row of a token the greedy answers produce at different steps (times
    1.05), so that answers end where that token was: some early, some late, some not before the limit."""
    encoder = PromptEncoder(tokenizer, model.get_image_tower().image_processor, model.config, "v1")
    sequences = []
    for index, question in enumerate(model_vqa_loader.load_questions(questions, images)):
        encoded = encoder.encode(index, question)
        with torch.no_grad():
            output = model.generate(encoded.input_ids[None], images=encoded.pixels[None], do_sample=False,
                                    max_new_tokens=10)
        sequences.append(output[0, len(encoded.input_ids):].tolist())

    def stops(token):
        return {sequence.index(token) if token in sequence else 10 for sequence in sequences}

    token = max(sorted({t for sequence in sequences for t in sequence}), key=lambda t: len(stops(t)))
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_token_id] = 1.05 * model.lm_head.weight[token]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_generation")
    tokenizer_dir = tiny_llava.build_tiny_llama_tokenizer(root / "tokenizer")
    tower = tiny_llava.build_tiny_clip_tower(root / "clip")
    tokenizer = load_tokenizer(tokenizer_dir)
    images = root / "images"
    for i in range(len(QUESTIONS)):
        eval_fixtures.image(images / f"{i}.png", i)
    write_jsonl(root / "questions.jsonl", [{"question_id": f"q{i}", "image": f"{i}.png", "text": text}
                                           for i, text in enumerate(QUESTIONS)])
    dense = tiny_llava.tiny_llava_llama(tokenizer_dir, tower, seed=1, image_aspect_ratio="pad")
    moe = tiny_llava.upcycle_llava_llama(dense, num_experts=4, top_k_experts=2)
    tiny_llava.perturb_experts(moe, scale=0.05)
    paths = {}
    for name, model in (("dense", dense), ("moe", moe)):
        end_where_a_token_was(model, tokenizer, str(root / "questions.jsonl"), str(images))
        model.save_pretrained(root / name, safe_serialization=True)
        tokenizer.save_pretrained(root / name)
        paths[name] = str(root / name)
    return {"root": root, "images": str(images), "questions": str(root / "questions.jsonl"), "tokenizer": tokenizer,
            **paths}


def generated_lengths(checkpoints, name):
    """Tokens each question's greedy batch-1 answer takes (10 = cut by --max_new_tokens)."""
    model_class = MoELLaVALlamaForCausalLM if name == "moe" else LlavaLlamaForCausalLM
    model = model_class.from_pretrained(checkpoints[name]).eval()
    encoder = PromptEncoder(checkpoints["tokenizer"], model.get_image_tower().image_processor, model.config, "v1")
    lengths = []
    for index, question in enumerate(model_vqa_loader.load_questions(checkpoints["questions"], checkpoints["images"])):
        encoded = encoder.encode(index, question)
        with torch.no_grad():
            output = model.generate(encoded.input_ids[None], images=encoded.pixels[None], do_sample=False,
                                    max_new_tokens=10)
        lengths.append(output.shape[1] - len(encoded.input_ids))
    return lengths


def run_loader(checkpoints, model, answers_file, *extra):
    model_vqa_loader.main(["--model-path", checkpoints[model], "--question-file", checkpoints["questions"],
                           "--image-folder", checkpoints["images"], "--answers-file", str(answers_file),
                           "--temperature", "0", "--max_new_tokens", "10", "--num-workers", "0", *extra])
    with open(answers_file, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("model", ["dense", "moe"])
def test_batched_greedy_answers_equal_batch_one(checkpoints, model, tmp_path):
    single = run_loader(checkpoints, model, tmp_path / "b1.jsonl", "--batch-size", "1")
    assert [line["question_id"] for line in single] == [f"q{i}" for i in range(len(QUESTIONS))]
    assert set(single[0]) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
    assert single[1]["prompt"] == QUESTIONS[1] and single[0]["model_id"] == model and single[0]["metadata"] == {}
    # Answers end at different steps (the end token; 1: an empty answer; 10: --max_new_tokens), so the rows
    # of a batch stop apart.
    lengths = generated_lengths(checkpoints, model)
    assert len(set(lengths)) >= 3, lengths
    for batch in ("4", "3"):
        batched = run_loader(checkpoints, model, tmp_path / f"b{batch}.jsonl", "--batch-size", batch)
        assert batched == single
    assert (tmp_path / "b1.jsonl").read_bytes() == (tmp_path / "b4.jsonl").read_bytes()


def test_answer_is_cut_where_a_single_run_stops(checkpoints):
    """A row that ended (end token, or the stop string of a template whose end is plain text) while others
    went on keeps only what came before."""
    tokenizer = checkpoints["tokenizer"]
    model = LlavaLlamaForCausalLM.from_pretrained(checkpoints["dense"])
    generator = AnswerGenerator(tokenizer, model, "###", GenerationSettings())
    prompt = torch.tensor(tokenizer("USER: hi ###ASSISTANT:").input_ids)  # a stop string in the prompt is ignored
    new = torch.tensor(tokenizer("A red shape.###USER: more", add_special_tokens=False).input_ids)
    from moellava.mm_utils import KeywordsStoppingCriteria

    from moellava.mm_utils import decode_answer

    def answer(new_ids):
        return decode_answer(tokenizer, new_ids[:generator._length(prompt, new_ids, stop)], "###")

    stop = KeywordsStoppingCriteria(["###"], tokenizer, prompt[None])
    assert answer(new) == "A red shape."
    ended = torch.cat([torch.tensor(tokenizer("A cat", add_special_tokens=False).input_ids),
                       torch.tensor([tokenizer.eos_token_id]), new])
    assert answer(ended) == "A cat"
    assert answer(new[:3]) == tokenizer.decode(new[:3], skip_special_tokens=True).strip()


def test_interrupted_run_resumes_to_the_same_file(checkpoints, tmp_path, monkeypatch, caplog):
    whole = tmp_path / "whole.jsonl"
    expected = run_loader(checkpoints, "moe", whole, "--batch-size", "2")

    interrupted = tmp_path / "interrupted.jsonl"
    original_write = AnswersFile.write
    calls = []

    def write_then_stop(self, questions, texts):
        original_write(self, questions, texts)
        calls.append(len(questions))
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C after the second batch

    monkeypatch.setattr(AnswersFile, "write", write_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run_loader(checkpoints, "moe", interrupted, "--batch-size", "2")
    monkeypatch.setattr(AnswersFile, "write", original_write)
    assert len(interrupted.read_text().splitlines()) == 4
    with open(interrupted, "a") as f:
        f.write('{"question_id": "q4", "prompt": "Desc')  # a kill in the middle of a write
    with caplog.at_level(logging.WARNING, logger="moellava.eval"):
        resumed = run_loader(checkpoints, "moe", interrupted, "--batch-size", "3")
    assert "ends with an incomplete line" in caplog.text and "Resuming" in caplog.text
    assert resumed == expected and interrupted.read_bytes() == whole.read_bytes()

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="moellava.eval"):
        run_loader(checkpoints, "moe", interrupted)  # nothing left: the model is not even loaded
    assert "All 7 questions" in caplog.text


def test_resume_refuses_a_file_of_other_questions_or_another_model(checkpoints, tmp_path):
    answers = tmp_path / "a.jsonl"
    run_loader(checkpoints, "dense", answers, "--num-chunks", "2", "--chunk-idx", "0")
    with pytest.raises(SystemExit, match="answered by model_id 'dense', not 'moe'"):
        run_loader(checkpoints, "moe", answers, "--num-chunks", "2", "--chunk-idx", "0")
    lines = answers.read_text().splitlines()
    answers.write_text("\n".join(lines[:2]) + "\n")
    with pytest.raises(SystemExit, match="line 1 answers question_id 'q0' .* question 1 of this run is question_id 'q4'"):
        run_loader(checkpoints, "dense", answers, "--num-chunks", "2", "--chunk-idx", "1")
    answers.write_text("\n".join(lines * 2) + "\n")
    with pytest.raises(SystemExit, match="already holds 8 answers but this run has only 4 questions"):
        run_loader(checkpoints, "dense", answers, "--num-chunks", "2", "--chunk-idx", "0")


def test_chunks_are_the_originals_and_merge_to_one_run(checkpoints, tmp_path):
    assert [len(c) for c in split_list(list(range(10)), 4)] == [3, 3, 3, 1]
    assert [len(get_chunk(list(range(5)), 4, k)) for k in range(4)] == [2, 2, 1, 0]  # ceil split: 3 chunks
    with pytest.raises(SystemExit, match="--chunk-idx 2 is not in 0..1"):
        run_loader(checkpoints, "dense", tmp_path / "x.jsonl", "--num-chunks", "2", "--chunk-idx", "2")
    whole = run_loader(checkpoints, "dense", tmp_path / "whole.jsonl", "--batch-size", "3")
    parts = [run_loader(checkpoints, "dense", tmp_path / f"2_{k}.jsonl", "--num-chunks", "2", "--chunk-idx", str(k),
                        "--batch-size", "2") for k in (0, 1)]
    assert [len(p) for p in parts] == [4, 3] and parts[0] + parts[1] == whole


def test_bad_input_fails_before_the_model_loads(checkpoints, tmp_path):
    with pytest.raises(SystemExit, match="7 image\\(s\\) of .* are not under --image-folder '/nowhere'.*"
                                         "\\(question_id 'q0'\\)"):
        model_vqa_loader.main(["--model-path", "/no/model", "--question-file", checkpoints["questions"],
                               "--image-folder", "/nowhere", "--answers-file", str(tmp_path / "a.jsonl")])
    write_jsonl(tmp_path / "bad.jsonl", [{"question_id": 1, "text": "no image"}])
    with pytest.raises(SystemExit, match="bad.jsonl line 1 lacks \\['image'\\]"):
        model_vqa_loader.main(["--model-path", "/no/model", "--question-file", str(tmp_path / "bad.jsonl"),
                               "--answers-file", str(tmp_path / "a.jsonl")])
    with pytest.raises(SystemExit, match="--batch-size 0 must be at least 1"):
        run_loader(checkpoints, "dense", tmp_path / "a.jsonl", "--batch-size", "0")


def test_prompts_and_pixels_are_those_of_training(checkpoints):
    tokenizer = checkpoints["tokenizer"]
    model = LlavaLlamaForCausalLM.from_pretrained(checkpoints["dense"])
    processor = model.get_image_tower().image_processor
    encoder = PromptEncoder(tokenizer, processor, model.config, "v1")
    question = model_vqa_loader.load_questions(checkpoints["questions"], checkpoints["images"])[1]
    conv = get_conv_template("v1")
    conv.append_message(conv.roles[0], "<image>\n" + QUESTIONS[1])
    conv.append_message(conv.roles[1], None)
    encoded = encoder.encode(0, question)
    assert encoded.input_ids.tolist() == tokenizer_image_token(conv.get_prompt(), tokenizer)
    assert model.config.image_aspect_ratio == "pad"
    from PIL import Image

    image = Image.open(os.path.join(checkpoints["images"], "1.png")).convert("RGB")  # 24 x 48: padded to square
    assert torch.equal(encoded.pixels, preprocess_image(image, processor, "pad"))
    text_only = encoder.encode(1, Question("x", "Hi", prompt="Hi"))
    assert text_only.pixels is None and -200 not in text_only.input_ids.tolist()


def test_long_answer_module_and_sampling(checkpoints, tmp_path):
    model_vqa.main(["--model-path", checkpoints["moe"], "--question-file", checkpoints["questions"], "--image-folder",
                    checkpoints["images"], "--answers-file", str(tmp_path / "long.jsonl"), "--temperature", "0.7",
                    "--top_p", "0.9", "--batch-size", "4", "--num-workers", "2", "--max_new_tokens", "6"])
    lines = [json.loads(line) for line in open(tmp_path / "long.jsonl")]
    assert [line["question_id"] for line in lines] == [f"q{i}" for i in range(len(QUESTIONS))]
    assert model_vqa_loader.build_parser("", "", 1024).parse_args(["--model-path", "x"]).max_new_tokens == 1024


def write_science(tmp_path):
    items, folder = [], tmp_path / "sqa_images"
    for i in range(5):
        item = {"id": str(10 + i), "conversations": [
            {"from": "human", "value": f"Question: Which {i}?\nOptions: (A) a (B) b" + ("\n<image>" if i % 2 else "")},
            {"from": "gpt", "value": "A"}]}
        if i % 2:
            item["image"] = f"{i}/image.png"
            eval_fixtures.image(folder / str(i) / "image.png", i)
        items.append(item)
    write_json(tmp_path / "sqa.json", items)
    return str(tmp_path / "sqa.json"), str(folder)


def test_science_questions_mix_text_only_and_image_questions(checkpoints, tmp_path):
    question_file, folder = write_science(tmp_path)
    questions = model_vqa_science.load_questions(question_file, folder, single_pred_prompt=True)
    letter = "Answer with the option's letter from the given choices directly."
    assert questions[0].image is None and questions[0].prompt == f"Question: Which 0?\nOptions: (A) a (B) b\n{letter}"
    assert questions[1].prompt == f"<image>\nQuestion: Which 1?\nOptions: (A) a (B) b\n{letter}"
    assert questions[1].text == f"Question: Which 1?\nOptions: (A) a (B) b\n{letter}"

    def run(batch, *extra):
        out = tmp_path / f"sqa_{batch}{len(extra)}.jsonl"
        model_vqa_science.main(["--model-path", checkpoints["moe"], "--question-file", question_file, "--image-folder",
                                folder, "--answers-file", str(out), "--single-pred-prompt", "--temperature", "0",
                                "--max_new_tokens", "8", "--batch-size", batch, "--num-workers", "0", *extra])
        return [json.loads(line) for line in open(out)]

    single = run("1")
    assert [line["question_id"] for line in single] == [str(10 + i) for i in range(5)]
    assert run("5") == single
    prompted = run("2", "--answer-prompter")
    assert all("\n The answer is " in line["text"] for line in prompted)
    assert [line["text"].split("\n The answer is ")[0] for line in prompted] == [line["text"] for line in single]


def test_mmbench_rounds_rotate_the_options(checkpoints, tmp_path):
    tsv = tmp_path / "mmbench.tsv"
    eval_fixtures.write_mmbench(tsv, [
        dict(index=5, question="What is it?", hint="A hint.", A="cat", B="dog", C="cow", D="nan", answer="A"),
        dict(index=6, question="Which?", hint="nan", A="x", B="y", C="", D="", answer="B"),
    ])
    questions = model_vqa_mmbench.load_questions(str(tsv), single_pred_prompt=True, lang="cn", all_rounds=True)
    assert [(q.question_id, q.round_id) for q in questions] == [(5, 0), (5, 1), (5, 2), (6, 0), (6, 1)]
    assert questions[0].prompt == "A hint.\nWhat is it?\nA. cat\nB. dog\nC. cow"
    assert questions[0].text == questions[0].prompt + "\n请直接回答选项字母。"
    # Round 1: the options rotate, the letters stay A, B, C; the record keeps the rotated letters.
    assert questions[1].prompt == "A hint.\nWhat is it?\nA. dog\nB. cow\nC. cat"
    assert questions[1].extra == {"options": ["dog", "cow", "cat"], "option_char": ["B", "C", "A"]}
    assert questions[4].prompt == "Which?\nA. y\nB. x"

    def run(batch):
        out = tmp_path / f"mmbench_{batch}.jsonl"
        model_vqa_mmbench.main(["--model-path", checkpoints["dense"], "--question-file", str(tsv), "--answers-file",
                                str(out), "--single-pred-prompt", "--all-rounds", "--temperature", "0",
                                "--max_new_tokens", "6", "--batch-size", batch, "--num-workers", "0"])
        return [json.loads(line) for line in open(out)]

    single = run("1")
    assert list(single[1]) == ["question_id", "round_id", "prompt", "text", "options", "option_char", "answer_id",
                               "model_id", "metadata"]
    assert run("4") == single


def test_return_gating_logit_captures_the_routing_of_every_answer(checkpoints, tmp_path):
    """The original's flag: the routing of each question, batched as the answers are, into a routing file
    whose generated tokens are the answers written."""
    from moellava.vis.routes import ANSWER, RoutingRecords

    capture = tmp_path / "routes"
    answers = run_loader(checkpoints, "moe", tmp_path / "a.jsonl", "--batch-size", "3",
                         "--return_gating_logit", str(capture))
    records = RoutingRecords.load(str(capture))
    assert [sample.sample_id for sample in records.samples] == [line["question_id"] for line in answers]
    tokenizer = checkpoints["tokenizer"]
    for sample, line in zip(records.samples, answers):
        # The row's tokens are its answer (cut where it alone would stop); each was routed when the model
        # read it, the last one too if the batch read on.
        assert tokenizer.decode(sample.output_ids, skip_special_tokens=True).strip() == line["text"]
        routed = [int(t) for t, role in zip(sample.token_ids, sample.roles) if role == ANSWER]
        assert len(sample.output_ids) - 1 <= len(routed) <= len(sample.output_ids)
        assert routed == sample.output_ids.tolist()[:len(routed)]
    assert sorted(records.layers) == [0, 2]
    with pytest.raises(SystemExit, match="--return_gating_logit records one route per prompt: use --num_beams 1"):
        run_loader(checkpoints, "moe", tmp_path / "b.jsonl", "--num_beams", "2",
                   "--return_gating_logit", str(tmp_path / "x"))
