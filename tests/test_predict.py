"""moellava.predict.Predictor: greedy answers equal the CLI's, single and batched (left-padded batches,
rows that end early cut where they would stop alone), and clear errors for bad calls."""

import pytest
import torch
from PIL import Image
from transformers import GenerationConfig

from moellava.conversation import get_conv_template
from moellava.predict import Predictor
from moellava.serve import cli
from moellava.serve.cli import ChatSession, EndOfReplies, generate_replies

import tiny_llava

GREEDY = dict(temperature=0, max_new_tokens=8)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    tokenizer = tiny_llava.build_tiny_llama_tokenizer(root / "tokenizer")
    tower = tiny_llava.build_tiny_clip_tower(root / "clip")
    model = tiny_llava.build_tiny_llava_llama(root / "moe", tokenizer, tower, moe=dict(num_experts=4),
                                             perturb_experts_seed=0)
    images = [tiny_llava.write_test_image(root / f"image{i}.png", size=(40 + 8 * i, 30), seed=i) for i in range(3)]
    return {"model": model, "images": images}


@pytest.fixture(scope="module")
def predictor(checkpoint):
    return Predictor(checkpoint["model"], device="cpu")


def cli_answer(capsys, checkpoint, image, question):
    cli.main(["--model-path", checkpoint["model"], "--image-file", image, "--query", question, "--device", "cpu",
              "--temperature", "0", "--max-new-tokens", str(GREEDY["max_new_tokens"])])
    return capsys.readouterr().out.removesuffix("\n")


def test_answer_is_the_cli_answer(predictor, checkpoint, capsys):
    for image, question in zip(checkpoint["images"][:2], ("What is in the image?", "Describe it.")):
        expected = cli_answer(capsys, checkpoint, image, question)
        assert expected and predictor.answer(image, question, **GREEDY) == expected
        assert predictor.answer(Image.open(image), question, **GREEDY) == expected


def test_answer_batch_equals_one_answer_per_question(predictor, checkpoint, capsys):
    a, b, c = checkpoint["images"]
    # Prompts of different lengths (left padding), two images in one question, a text-only question, and
    # two batches (batch_size 3 over 5 questions).
    images = [a, b, [a, c], None, c]
    questions = ["What is in the image?", "What is the color of the car on the left of the street?",
                 "What differs?", "How many sides does a square have?", "Count the people."]
    singles = [predictor.answer(image, question, **GREEDY) for image, question in zip(images, questions)]
    assert predictor.answer_batch(images, questions, batch_size=3, **GREEDY) == singles
    assert singles[0] == cli_answer(capsys, checkpoint, a, questions[0])
    assert len(set(singles)) == len(singles)  # the answers depend on the image and the question


def greedy_ids(predictor, image, question, steps=8):
    session = predictor.session(image)
    session.add_user_turn(question)
    output = predictor.model.generate(session.prompt_ids()[None], images=session.images, do_sample=False,
                                      max_new_tokens=steps, min_new_tokens=steps)
    return output[0, -steps:].tolist()


def test_a_row_that_ends_early_is_cut_where_it_ends_alone(predictor, checkpoint):
    images, questions = checkpoint["images"][:2], ["What is in the image?", "Describe it."]
    first, second = (greedy_ids(predictor, i, q) for i, q in zip(images, questions))
    # Make a token of the first answer an end of sequence: that row stops early, the other goes on.
    position = next(p for p in range(1, 8) if first[p] not in second and first[p] not in first[:p])
    model, tokenizer = predictor.model, predictor.tokenizer
    loaded = model.generation_config
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
                                               eos_token_id=[tokenizer.eos_token_id, first[position]])
    try:
        singles = [predictor.answer(i, q, **GREEDY) for i, q in zip(images, questions)]
        batch = predictor.answer_batch(images, questions, **GREEDY)
    finally:
        model.generation_config = loaded
    assert singles[0] == tokenizer.decode(first[:position + 1], skip_special_tokens=True).strip()
    assert singles[1] == predictor.answer(images[1], questions[1], **GREEDY)
    assert batch == singles


def test_end_of_replies_remembers_where_each_row_ended(predictor):
    """The stop string (not a special token here: "###" of the v0 template) or an eos ends a row."""
    tokenizer = predictor.tokenizer
    prompt = torch.tensor([[5, 6, 7], [0, 8, 9]])
    end = EndOfReplies("###", tokenizer, prompt, eos_token_ids=[2])
    stop_ids = tokenizer("###", add_special_tokens=False).input_ids
    rows = [[11, 12] + stop_ids + [13, 14], [11, 2] + [0] * (len(stop_ids) + 2)]
    output = torch.cat([prompt, torch.tensor(rows)], dim=1)
    stopped = [end(output[:, : 3 + k]) for k in range(1, output.shape[1] - 2)]
    assert end.ends == [2 + len(stop_ids), 2] and stopped[-1] and not stopped[0]
    assert end.reply_ids(output, 0).tolist() == [11, 12] + stop_ids
    assert end.reply_ids(output, 1).tolist() == [11, 2]


def test_bad_calls_fail_clearly(predictor, checkpoint):
    image = checkpoint["images"][0]
    with pytest.raises(ValueError, match="answer_batch got 2 images but 1 questions"):
        predictor.answer_batch([image, image], ["What is it?"])
    with pytest.raises(ValueError, match="temperature=-1 is negative"):
        predictor.answer(image, "What is it?", temperature=-1)
    with pytest.raises(ValueError, match=r"top_p=1.5 must be in \(0, 1\]"):
        predictor.answer(image, "What is it?", top_p=1.5)
    with pytest.raises(TypeError, match="num_beams"):
        predictor.answer(image, "What is it?", num_beams=2)


def test_batches_need_a_left_padded_model(checkpoint):
    from moellava.model.builder import load_pretrained_model

    tokenizer, model, processor, _ = load_pretrained_model(checkpoint["model"])  # right padding
    sessions = []
    for question in ("What is it?", "What colour is the shape?"):
        session = ChatSession(tokenizer, model, processor["image"], None, get_conv_template("v1"))
        session.add_user_turn(question)
        sessions.append(session)
    with pytest.raises(ValueError, match="padding_side='left'"):
        generate_replies(sessions, **GREEDY, top_p=None)
