"""The scorers and converters of moellava.eval on small files in the official formats, with adversarial
answers (articles, number words, punctuation, contractions, "Yes, it is.", option letters in several
spellings, empty answers, unicode). Every expected number is worked out by hand in the comments."""

import json
import logging
import os

import pytest

from moellava.eval import (
    convert_answer_to_mme,
    convert_gqa_for_eval,
    convert_mmbench_for_submission,
    convert_mmvet_for_eval,
    convert_seed_for_submission,
    convert_vizwiz_for_submission,
    convert_vqav2_for_submission,
    eval_gpt_mmvet,
    eval_gpt_review_bench,
    eval_gqa,
    eval_pope,
    eval_science_qa,
    eval_textvqa,
    mme_calculation,
    report,
    summarize_gpt_review,
)
from moellava.eval.m4c_evaluator import EvalAIAnswerProcessor, TextVQAAccuracyEvaluator

import eval_fixtures
from eval_fixtures import write_json, write_jsonl


def answers(records):
    """Answers-file lines as the generators write them."""
    return [{"question_id": qid, "prompt": prompt, "text": text, "answer_id": f"a{i}", "model_id": "m",
             "metadata": {}} for i, (qid, prompt, text) in enumerate(records)]


def read(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@pytest.mark.parametrize("raw, normalised", [
    ("The Cat.", "cat"),                    # lower case, article dropped, period stripped
    ("Two dogs!", "2 dogs"),                # number word, "!" not next to a space becomes a space
    ("It's 3.5 m", "it 's 3.5 m"),          # "'s" split off, a period before a digit stays
    ("dont know", "don't know"),            # contraction restored
    ("Im here", "im here"),                 # the table's capitalised keys never match (lower-cased first)
    ("somebody'd", "somebodyd"),            # the table's odd entry
    ("1,000 people", "1000 people"),        # commas go before anything else
    ("Yes, it is.", "yes it is"),
    ("", ""),
    ("Café – naïve", "café – naïve"),       # unicode and the en dash (not in the list) kept
    ("left/right", "left right"),           # "/" between letters -> space
    ("a / b", "b"),                         # "/" next to a space -> deleted; "a" is an article
    ("None", "0"),
    ("eleven", "eleven"),                   # only zero..ten
    ("(3)", "3"),
    ("what's up?", "what 's up"),
    ("." * 40 + "x", "." * 8 + "x"),       # only the first 32 periods go (re.UNICODE passed as count)
])
def test_evalai_answer_processor(raw, normalised):
    assert EvalAIAnswerProcessor()(raw) == normalised


def test_textvqa_soft_accuracy():
    mixed = ["red"] * 4 + ["dark red"] * 3 + ["maroon"] * 3
    evaluator = TextVQAAccuracyEvaluator()
    # "red": 3 or 4 of the other 9 say it -> 1 for every left-out human.
    # "dark red": 2 of 9 when a "dark red" is left out (3 times) -> 2/3, else 3/3 -> (2 + 7) / 10 = 0.9.
    # "blue" said by 1 of 10: 0 when it is left out, else 1/3 -> 9/30 = 0.3.
    entries = [{"pred_answer": "Red.", "gt_answers": mixed}, {"pred_answer": "dark red", "gt_answers": mixed},
               {"pred_answer": "blue", "gt_answers": ["blue"] + ["navy"] * 9},
               {"pred_answer": "garbage", "gt_answers": ["x"] * 10}]
    assert evaluator.eval_pred_list(entries) == pytest.approx((1 + 0.9 + 0.3 + 0) / 4)


def test_eval_textvqa_matches_by_image_id_and_question(tmp_path, capsys):
    eval_dir = str(tmp_path)
    images = [eval_fixtures.image(tmp_path / "src" / f"{name}.png") for name in ("img0", "img1", "img2")]
    from moellava.demo.benchmarks import write_textvqa

    write_textvqa(eval_dir, [
        {"image": images[0], "question": "What brand is it?", "answers": ["Coca Cola"] * 7 + ["coke"] * 3,
         "ocr_tokens": ["coca", "cola"]},
        {"image": images[0], "question": "How many bottles?", "answers": ["two"] * 10},
        {"image": images[1], "question": "What colour is the sign?", "answers": ["red"] * 10},
        {"image": images[2], "question": "What does it say?", "answers": ["stop"] * 9 + ["halt"]},
    ])
    root = tmp_path / "textvqa"
    questions = [json.loads(line) for line in open(root / "llava_textvqa_val_v051_ocr.jsonl")]
    assert questions[0]["question_id"] == "img0" and questions[0]["text"] == (
        "What brand is it?\nReference OCR token: coca, cola\nAnswer the question using a single word or phrase.")
    results = root / "answers" / "m.jsonl"
    # 1 ("coca cola" by 7: 1); "2" = "two" -> 1; "Red sign" -> 0; "Halt." (1 of 10) -> 0.3  => 2.3 / 4 = 57.50%
    write_jsonl(results, answers([(q["question_id"], q["text"], text) for q, text in
                                  zip(questions, ["Coca-Cola", "2", "Red sign", "Halt."])]))
    eval_textvqa.main(["--annotation-file", str(root / "TextVQA_0.5.1_val.json"), "--result-file", str(results),
                       "--score-file", str(tmp_path / "score.json")])
    assert capsys.readouterr().out == "m\nSamples: 4\nAccuracy: 57.50%\n\n"
    assert read(tmp_path / "score.json")["headline"] == pytest.approx(57.5)

    write_jsonl(results, answers([("img0", "What brand?\nA\nB\nC", "x")]))
    with pytest.raises(SystemExit, match="prompt is in none of the layouts"):
        eval_textvqa.main(["--annotation-file", str(root / "TextVQA_0.5.1_val.json"), "--result-file", str(results)])
    write_jsonl(results, answers([("img9", "What brand is it?\nAnswer briefly.", "x")]))
    with pytest.raises(SystemExit, match="no annotation .* has image_id 'img9'"):
        eval_textvqa.main(["--annotation-file", str(root / "TextVQA_0.5.1_val.json"), "--result-file", str(results)])


def write_pope_fixture(tmp_path, answer_texts):
    from moellava.demo.benchmarks import write_pope

    image = eval_fixtures.image(tmp_path / "src" / "COCO_val2014_000000000001.jpg")
    questions = []
    for category, labels in answer_texts.items():
        for i, (label, _) in enumerate(labels):
            questions.append({"image": image, "text": f"Is there a thing{i} in the image?\nAnswer the question using "
                              "a single word or phrase.", "label": label, "category": category})
    write_pope(str(tmp_path), questions)
    root = tmp_path / "pope"
    lines = [json.loads(line) for line in open(root / "llava_pope_test.jsonl")]
    texts = [text for labels in answer_texts.values() for _, text in labels]
    return root, lines, texts


POPE_RANDOM = [
    ("yes", "Yes, there is a dog."),             # yes  TP
    ("no", "No."),                               # no   TN
    ("no", "NO"),                                # yes! FP  (unclear)
    ("no", "There is not a cat in the image."),  # no   TN
    ("yes", ""),                                 # yes  TP  (unclear)
    ("yes", "No!"),                              # yes! TP  (unclear: "No!" is not the word "No")
    ("no", "yes"),                               # yes  FP
    ("yes", "I don't see one, no."),             # no   FN  (comma dropped, then the word "no")
]


def test_pope_scores_and_warnings(tmp_path, capsys, caplog):
    root, lines, texts = write_pope_fixture(tmp_path, {
        "random": POPE_RANDOM,
        "adversarial": [("yes", "no"), ("no", "No, it is not.")],  # no "yes" prediction: precision 0/0
    })
    results = root / "answers" / "m.jsonl"
    write_jsonl(results, answers([(line["question_id"], line["text"], text) for line, text in zip(lines, texts)]))
    with caplog.at_level(logging.WARNING, logger="moellava.eval"):
        eval_pope.main(["--annotation-dir", str(root / "coco"), "--question-file", str(root / "llava_pope_test.jsonl"),
                        "--result-file", str(results), "--score-file", str(tmp_path / "score.json")])
    out = capsys.readouterr().out
    # random: TP 3 FP 2 TN 2 FN 1; acc 5/8, precision 3/5, recall 3/4, F1 2*.6*.75/1.35 = 2/3, yes ratio 5/8.
    assert "Category: random, # samples: 8\nTP\tFP\tTN\tFN\t\n3\t2\t2\t1\nAccuracy: 0.625\nPrecision: 0.6\n" in out
    assert "0.667, 0.625, 0.600, 0.750, 0.625" in out
    # adversarial: TP 0 FP 0 TN 1 FN 1 -> precision and F1 reported 0 (the official script divides by 0).
    assert "Category: adversarial, # samples: 2\nTP\tFP\tTN\tFN\t\n0\t0\t1\t1\nAccuracy: 0.5\nPrecision: 0.0\n" in out
    assert out.index("Category: adversarial") < out.index("Category: random")  # sorted
    assert "Mean over 2 categories: F1 33.3, accuracy 56.2" in out
    score = read(tmp_path / "score.json")
    assert score["headline"] == pytest.approx(100 / 3)
    assert score["metrics"]["categories"]["random"]["unclear_answers"] == 3
    assert "3 answer(s) say neither 'yes' nor one of 'No'/'no'/'not'" in caplog.text
    assert "POPE precision (no 'yes' prediction) is undefined" in caplog.text
    assert "order" not in caplog.text


def test_pope_pairs_by_position_and_says_so(tmp_path, caplog, capsys):
    pairs = [("yes", "yes"), ("no", "no"), ("yes", "yes"), ("no", "no")]
    root, lines, texts = write_pope_fixture(tmp_path, {"popular": pairs})
    # The answers file in another order: each answer still right for its own question, but paired by
    # position with the labels [yes, no, yes, no] the predictions [no, yes, no, yes] are all wrong.
    reordered = [lines[1], lines[0], lines[3], lines[2]]
    results = root / "answers" / "m.jsonl"
    write_jsonl(results, answers([(line["question_id"], line["text"], texts[lines.index(line)]) for line in reordered]))
    with caplog.at_level(logging.WARNING, logger="moellava.eval"):
        scores = eval_pope.eval_pope(str(root / "coco"), str(root / "llava_pope_test.jsonl"), str(results))
    assert scores["popular"]["accuracy"] == 0.0 and scores["popular"]["out_of_order"] == 4
    assert "4 answer(s) are not about the question of the label at the same position" in caplog.text

    write_jsonl(results, answers([(lines[0]["question_id"], lines[0]["text"], "yes")]))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="moellava.eval"):
        scores = eval_pope.eval_pope(str(root / "coco"), str(root / "llava_pope_test.jsonl"), str(results))
    assert scores["popular"]["TP"] == 1 and scores["popular"]["samples"] == 1
    assert "1 answers for 4 labels" in caplog.text

    write_jsonl(results, answers([(999, "x", "yes")]))
    with pytest.raises(SystemExit, match="question_id 999 is not in"):
        eval_pope.main(["--annotation-dir", str(root / "coco"), "--question-file", str(root / "llava_pope_test.jsonl"),
                        "--result-file", str(results)])


def write_sqa_fixture(tmp_path):
    root = tmp_path / "scienceqa"
    problems = {
        "1": dict(choices=["cat", "dog", "cow"], answer=0, hint="", image="image.png", subject="natural science",
                  grade="grade2", split="test"),
        "2": dict(choices=["cat", "dog"], answer=1, hint="A hint.", image=None, subject="social science",
                  grade="grade8", split="test"),
        "3": dict(choices=["a", "b", "c", "d"], answer=2, hint="", image="image.png", subject="language science",
                  grade="grade10", split="test"),
        "4": dict(choices=["a", "b"], answer=0, hint="", image=None, subject="natural science", grade="grade4",
                  split="test"),
        "5": dict(choices=["a", "b"], answer=1, hint="x", image="image.png", subject="natural science", grade="grade3",
                  split="test"),
        "6": dict(choices=["a", "b", "c"], answer=0, hint="", image=None, subject="social science", grade="grade7",
                  split="test"),
        "7": dict(choices=["a", "b"], answer=0, hint="", image="image.png", subject="natural science", grade="grade1",
                  split="test"),
        "8": dict(choices=["a", "b", "c"], answer=2, hint="", image=None, subject="language science", grade="grade9",
                  split="test"),
        "9": dict(choices=["a", "b"], answer=0, hint="", image=None, subject="natural science", grade="grade5",
                  split="test"),
        "99": dict(choices=["a", "b"], answer=0, hint="", image=None, subject="natural science", grade="grade5",
                   split="val"),
    }
    for problem in problems.values():
        problem["question"] = "Which one?"
    write_json(root / "problems.json", problems)
    write_json(root / "pid_splits.json", {"test": [str(i) for i in range(1, 10)], "val": ["99"]})
    return root


def test_science_qa_parsing_accuracy_and_categories(tmp_path, capsys, caplog):
    root = write_sqa_fixture(tmp_path)
    img = "<image>\nWhich one?"
    results = root / "answers" / "m.jsonl"
    write_jsonl(results, answers([
        ("1", img, "A"),                                   # A: right
        ("2", "Which one?", "B. dog"),                     # "B. ": right
        ("3", img, "The answer is C."),                    # right
        ("4", "Which one?", "A."),                         # FAILED (letter-like): wrong
        ("5", img, "(B)"),                                 # FAILED (letter-like): wrong
        ("6", "Which one?", "a"),                          # FAILED (letter-like): wrong
        ("7", img, "The answer is A. The answer is B."),  # two matches: FAILED, wrong
        ("8", "Which one?", "E"),                          # E with 3 choices: index -1, wrong
        # 9: no answer -> FAILED, not multimodal ("Unknown" prompt), wrong
    ]))
    with caplog.at_level(logging.WARNING, logger="moellava.eval"):
        eval_science_qa.main(["--base-dir", str(root), "--result-file", str(results), "--output-file",
                              str(root / "out.json"), "--output-result", str(root / "result.json"), "--score-file",
                              str(tmp_path / "score.json")])
    out = capsys.readouterr().out
    # 3 right of 9; image prompts: 1, 3, 5, 7 -> 2 right of 4.
    assert out.startswith("Total: 9, Correct: 3, Accuracy: 33.33%, IMG-Accuracy: 50.00%\n")
    result = read(root / "result.json")
    assert result["acc"] == pytest.approx(100 / 3) and result["correct"] == 3 and result["count"] == 9
    assert result["results"] == {"1": 0, "2": 1, "3": 2, "4": -1, "5": -1, "6": -1, "7": -1, "8": -1, "9": -1}
    assert result["outputs"]["9"] == "FAILED"
    analysis = read(root / "out.json")
    assert [x["question_id"] for x in analysis["correct"]] == ["1", "2", "3"]
    assert analysis["incorrect"][0] == {"question_id": "4", "parsed_ans": "FAILED", "ground_truth": "A",
                                        "question": "Which one?", "pred": "A.", "is_multimodal": False}
    categories = read(tmp_path / "score.json")["metrics"]["categories"]
    # natural: 1,4,5,7,9 -> 1 right (20%); social: 2,6 -> 50%; language: 3,8 -> 50%; has_text: 2,5 -> 50%;
    # has_image: 1,3,5,7 -> 50%; no context: 4,6,8,9 -> 0%; grades 1-6: 1,4,5,7,9 -> 20%; 7-12: 2,3,6,8 -> 50%.
    assert categories == pytest.approx({"natural": 20.0, "social": 50.0, "language": 50.0, "has_text": 50.0,
                                        "has_image": 50.0, "no_context": 0.0, "grade_1_6": 20.0, "grade_7_12": 50.0})
    assert "1 of 9 questions have no answer" in caplog.text
    assert "4 answer(s) did not parse (3 of them look like an option letter" in caplog.text


def test_gqa_conversion_and_scores(tmp_path, capsys):
    answers_file = tmp_path / "merge.jsonl"
    write_jsonl(answers_file, answers([("q1", "?", "Yes."), ("q2", "?", "Red"), ("q3", "?", "no"),
                                       ("q4", "?", "The Cat..."), ("q5", "?", "blue")]))
    predictions = tmp_path / "data" / "testdev_balanced_predictions.json"
    convert_gqa_for_eval.main(["--src", str(answers_file), "--dst", str(predictions)])
    assert read(predictions) == [{"questionId": "q1", "prediction": "yes"}, {"questionId": "q2", "prediction": "red"},
                                 {"questionId": "q3", "prediction": "no"},
                                 {"questionId": "q4", "prediction": "the cat"},
                                 {"questionId": "q5", "prediction": "blue"}]

    def question(text, answer, structural, semantic, group, ops, balanced=True):
        return {"question": text, "answer": answer, "isBalanced": balanced, "entailed": [],
                "types": {"structural": structural, "semantic": semantic, "detailed": "x"},
                "groups": {"global": group, "local": None},
                "semantic": [{"operation": op, "argument": arg, "dependencies": []} for op, arg in ops]}

    questions = {
        "q1": question("Is there a dog?", "yes", "verify", "obj", None, [("select", "dog"), ("exist", "?")]),
        "q2": question("What color is the car?", "red", "query", "attr", "color",
                       [("select", "car"), ("query", "color")]),
        "q3": question("Is the cup blue?", "yes", "verify", "attr", None, [("select", "cup"), ("verify color", "blue")]),
        "q4": question("What animal is it?", "cat", "query", "cat", "animal",
                       [("select", "animal"), ("query", "name")]),
        "q5": question("What color is the sky?", "blue", "query", "attr", "color",
                       [("select", "sky"), ("query", "color")]),
        "q6": question("Unbalanced?", "no", "verify", "obj", None, [], balanced=False),
    }
    write_json(tmp_path / "questions.json", questions)
    eval_gqa.main(["--tier", str(tmp_path / "data" / "testdev_balanced"), "--questions",
                   str(tmp_path / "questions.json"), "--score-file", str(tmp_path / "score.json")])
    out = capsys.readouterr().out
    # Balanced q1..q5; right: q1, q2, q5 (q3 "no" != "yes", q4 "the cat" != "cat") -> 60%. Binary q1, q3 -> 50%;
    # open q2, q4, q5 -> 66.67%. Distribution: color gold {red 1, blue 1}, predicted {red 1, blue 1} -> 0;
    # animal gold {cat 1}, predicted {the cat 1} -> (0 - 1)^2 / 1 = 1, weighted by 1 -> (0 * 2 + 1 * 1) / 3 / 100.
    assert "Binary: 50.00%\nOpen: 66.67%\nAccuracy: 60.00%\nValidity: 0.00%\nPlausibility: 0.00%\n" in out
    assert "Distribution: 0.00 (lower is better)" in out
    assert read(tmp_path / "score.json")["metrics"]["distribution"] == pytest.approx(1 / 3 / 100)
    # Steps: q1 1 (exist does not count), q2 2, q3 2, q4 1 ("query: name"), q5 2.
    assert "Accuracy / steps number:\n  1: 50.00% (2 questions)\n  2: 66.67% (3 questions)" in out
    assert "Accuracy / semantic type:\n  attr: 66.67% (3 questions)\n  cat: 0.00% (1 questions)\n  obj: 100.00%" in out
    assert "Accuracy / words number:\n  4: 33.33% (3 questions)\n  5: 100.00% (2 questions)" in out

    del questions["q5"]
    questions["q7"] = question("Where?", "left", "query", "rel", None, [])
    write_json(tmp_path / "questions.json", questions)
    with pytest.raises(SystemExit, match="no prediction for question q7"):
        eval_gqa.main(["--tier", str(tmp_path / "data" / "testdev_balanced"), "--questions",
                       str(tmp_path / "questions.json")])


def test_gqa_consistency_and_choices():
    questions = {
        "a": {"question": "Is it red?", "answer": "yes", "isBalanced": True, "entailed": ["b", "a"],
              "types": {"structural": "verify", "semantic": "attr", "detailed": "colorCommon"},
              "groups": {"global": None}, "semantic": []},
        "b": {"question": "What color?", "answer": "red", "isBalanced": False, "entailed": [],
              "types": {"structural": "query", "semantic": "attr", "detailed": "x"},
              "groups": {"global": None}, "semantic": []},
    }
    choices = {"a": {"valid": ["yes", "no"], "plausible": ["yes"]}}
    # "a" right; its entailed "b" answered "blue" (wrong) -> consistency 0. Validity: "Common" in detailed
    # -> the group becomes [color, material, shape], "yes" is not in it -> 0.
    scores = eval_gqa.eval_gqa(questions, {"a": "yes", "b": "blue"}, choices, consistency=True)
    assert scores["accuracy"] == 100.0 and scores["consistency"] == 0.0 and scores["validity"] == 0.0
    scores = eval_gqa.eval_gqa(questions, {"a": "yes", "b": "red"}, choices, consistency=True)
    assert scores["consistency"] == 100.0


MME_TASKS = mme_calculation.EVAL_TYPES["Perception"] + mme_calculation.EVAL_TYPES["Cognition"]


def test_mme_conversion_and_calculation(tmp_path, capsys, caplog):
    eval_dir = tmp_path / "eval"
    questions = eval_fixtures.write_mme(eval_dir, images_per_task={"code_reasoning": 2})
    # Answers: right by default; the exceptions below.
    special = {
        ("count", 1): "Yes",                       # gt no -> wrong
        ("position", 0): "yes, it is",             # "yes," -> yes (right)
        ("position", 1): "Not really",             # "not " -> no (right)
        ("color", 0): "The answer is yes",         # "the " -> other (wrong)
        ("code_reasoning", 2): "know",             # "know" -> no (gt yes: wrong)
        ("code_reasoning", 3): "Yes",              # gt no: wrong
    }
    counters = {}
    texts = []
    for q in questions:
        task = q["question_id"].split("/")[0]
        n = counters.get(task, 0)
        counters[task] = n + 1
        texts.append(special.get((task, n), q["truth"]))
    write_jsonl(eval_dir / "MME" / "answers" / "m.jsonl",
                answers([(q["question_id"], q["text"], text) for q, text in zip(questions, texts)]))
    convert_answer_to_mme.main(["--experiment", "m", "--data-path", str(eval_dir / "MME" / "MME_Benchmark_release_version"),
                                "--answers-dir", str(eval_dir / "MME" / "answers"),
                                "--result-dir", str(eval_dir / "MME" / "eval_tool" / "answers")])
    results = eval_dir / "MME" / "eval_tool" / "answers" / "m"
    lines = (results / "artwork.txt").read_text().splitlines()
    assert lines == ["10002.txt\tIs there artwork in image 0? Please answer yes or no.\tYes\tYes",
                     "10002.txt\tIs there no artwork in image 0? Please answer yes or no.\tNo\tNo"]
    # The benchmark writes this one with two spaces before "Please": the converter tries both.
    assert (results / "OCR.txt").read_text().splitlines()[1] == (
        "0001.txt\tIs there no OCR in image 0?  Please answer yes or no.\tNo\tNo")
    capsys.readouterr()
    with caplog.at_level(logging.WARNING, logger="moellava.eval"):
        mme_calculation.main(["--results_dir", str(results), "--score-file", str(tmp_path / "score.json")])
    out = capsys.readouterr().out
    # Perception: existence 200, count acc 1/2 acc+ 0 -> 50, position 200, color 50, six more at 200 -> 1700.
    # Cognition: three at 200; code_reasoning acc 2/4 + acc+ 1/2 -> 100 => 700.
    assert out.startswith("=========== Perception ===========\ntotal score: 1700.0 \n\n\t existence  score: 200.0\n"
                          "\t count  score: 50.0\n\t position  score: 200.0\n\t color  score: 50.0\n")
    assert "=========== Cognition ===========\ntotal score: 700.0 \n\n" in out
    assert "\t code_reasoning  score: 100.0\n" in out
    score = read(tmp_path / "score.json")
    assert score["headline"] == 1700.0 and score["cognition"] == 700.0
    assert score["metrics"]["Perception"]["tasks"]["color"]["other"] == 1
    assert "Perception: 1 answer(s) are neither yes nor no at their start" in caplog.text

    # Answers out of the question file's order: acc+ pairs two different images; a missing task fails.
    (results / "existence.txt").write_text("a.txt\tq1\tYes\tYes\nb.txt\tq2\tNo\tNo\nb.txt\tq3\tYes\tYes\na.txt\tq4\tNo\tNo\n")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="moellava.eval"):
        assert mme_calculation.task_scores(str(results / "existence.txt"))["acc_plus"] == 1.0
    assert "2 line pair(s) are about two different images" in caplog.text
    os.remove(results / "scene.txt")
    with pytest.raises(SystemExit, match="scene.txt does not exist"):
        mme_calculation.main(["--results_dir", str(results)])


def test_mme_conversion_refuses_unknown_questions(tmp_path):
    eval_dir = tmp_path / "eval"
    eval_fixtures.write_mme(eval_dir)
    write_jsonl(eval_dir / "MME" / "answers" / "m.jsonl", answers([("artwork/10002.jpg", "Is this a poem?", "No")]))
    with pytest.raises(SystemExit, match="the MME benchmark has no question 'Is this a poem\\?  Please answer yes or no.'"):
        convert_answer_to_mme.main(["--experiment", "m", "--data-path",
                                    str(eval_dir / "MME" / "MME_Benchmark_release_version"),
                                    "--answers-dir", str(eval_dir / "MME" / "answers"),
                                    "--result-dir", str(tmp_path / "out")])


def test_vqav2_and_vizwiz_submissions(tmp_path, capsys, caplog):
    vqav2 = tmp_path / "vqav2"
    write_jsonl(vqav2 / "llava_vqav2_mscoco_test2015.jsonl",
                [{"question_id": i, "image": f"COCO_test2015_{i:012d}.jpg", "text": "?"} for i in (1, 2, 3)])
    merge = vqav2 / "answers" / "split" / "m" / "merge.jsonl"
    write_jsonl(merge, answers([(1, "?", "Two dogs."), (2, "?", "Yes, it is.")]))
    with open(merge, "a") as f:
        f.write("{not json\n")
    with caplog.at_level(logging.WARNING, logger="moellava.eval"):
        convert_vqav2_for_submission.main(["--dir", str(vqav2), "--ckpt", "m", "--split", "split"])
    assert "total results: 2, total split: 3, error_line: 1" in capsys.readouterr().out
    assert read(vqav2 / "answers_upload" / "split" / "m.json") == [
        {"question_id": 1, "answer": "2 dogs"}, {"question_id": 2, "answer": "yes it is"},
        {"question_id": 3, "answer": ""}]
    assert "1 of 3 test2015 questions have no answer" in caplog.text

    vizwiz = tmp_path / "vizwiz"
    write_jsonl(vizwiz / "llava_test.jsonl", [{"question_id": i, "image": f"VizWiz_test_{i:08d}.jpg", "text": "?"}
                                              for i in (0, 1)])
    write_jsonl(vizwiz / "answers" / "m.jsonl", answers([(0, "?", "Unanswerable."), (1, "?", "The (red) can")]))
    convert_vizwiz_for_submission.main(["--annotation-file", str(vizwiz / "llava_test.jsonl"), "--result-file",
                                        str(vizwiz / "answers" / "m.jsonl"), "--result-upload-file",
                                        str(vizwiz / "answers_upload" / "m.json")])
    assert read(vizwiz / "answers_upload" / "m.json") == [
        {"image": "VizWiz_test_00000000.jpg", "answer": "unanswerable"},
        {"image": "VizWiz_test_00000001.jpg", "answer": "red can"}]
    write_jsonl(vizwiz / "answers" / "m.jsonl", answers([(0, "?", "x")]))
    with pytest.raises(SystemExit, match="1 question\\(s\\) of .* have no answer"):
        convert_vizwiz_for_submission.main(["--annotation-file", str(vizwiz / "llava_test.jsonl"), "--result-file",
                                            str(vizwiz / "answers" / "m.jsonl"), "--result-upload-file",
                                            str(vizwiz / "answers_upload" / "m.json")])


def test_mmbench_submission_xlsx(tmp_path):
    openpyxl = pytest.importorskip("openpyxl")
    tsv = tmp_path / "mmbench_dev.tsv"
    eval_fixtures.write_mmbench(tsv, [
        dict(index=7, question="What is it?", hint="nan", A="cat", B="dog", C="", D="", answer="A"),
        dict(index=9, question="Which?", hint="A hint", A="x", B="y", C="z", D="w", answer="D"),
    ])
    write_jsonl(tmp_path / "answers" / "m.jsonl", [
        {"question_id": 7, "round_id": 0, "text": "A"}, {"question_id": 9, "round_id": 0, "text": "B"},
        {"question_id": 9, "round_id": 1, "text": "C"}])  # --all-rounds: the last round's answer is kept
    convert_mmbench_for_submission.main(["--annotation-file", str(tsv), "--result-dir", str(tmp_path / "answers"),
                                         "--upload-dir", str(tmp_path / "upload"), "--experiment", "m"])
    sheet = openpyxl.load_workbook(tmp_path / "upload" / "m.xlsx").active
    rows = [list(row) for row in sheet.iter_rows(values_only=True)]
    assert rows == [["index", "question", "A", "B", "C", "D", "prediction", "answer", "split"],
                    [7, "What is it?", "cat", "dog", None, None, "A", "A", "dev"],
                    [9, "Which?", "x", "y", "z", "w", "C", "D", "dev"]]


def test_seed_accuracy_and_upload(tmp_path, capsys):
    annotation = tmp_path / "SEED-Bench.json"
    write_json(annotation, {"question_type": {"Scene Understanding": 1, "Instance Identity": 2, "Action": 10},
                            "questions": [
                                {"question_id": "101", "data_type": "image", "question_type_id": 1, "answer": "A"},
                                {"question_id": "102", "data_type": "image", "question_type_id": 1, "answer": "B"},
                                {"question_id": "103", "data_type": "image", "question_type_id": 2, "answer": "C"},
                                {"question_id": "v1", "data_type": "video", "question_type_id": 10, "answer": "D"},
                            ]})
    merge = tmp_path / "merge.jsonl"
    # 101 right; 102 "B." is not "B" (exact match): wrong; 103 unanswered; v1 right.
    write_jsonl(merge, answers([(101, "?", "A"), (102, "?", "B."), ("v1", "?", "D")]))
    convert_seed_for_submission.main(["--annotation-file", str(annotation), "--result-file", str(merge),
                                      "--result-upload-file", str(tmp_path / "upload.jsonl"),
                                      "--score-file", str(tmp_path / "score.json")])
    assert capsys.readouterr().out == ("Scene Understanding: 50.00%\nInstance Identity: 0.00%\nAction: 100.00%\n"
                                       "Total accuracy: 50.00%\nimage accuracy: 33.33%\nvideo accuracy: 100.00%\n")
    assert [json.loads(line) for line in open(tmp_path / "upload.jsonl")] == [
        {"question_id": "101", "prediction": "A"}, {"question_id": "102", "prediction": "B."},
        {"question_id": "v1", "prediction": "D"}]
    assert read(tmp_path / "score.json")["headline"] == pytest.approx(100 / 3)


def test_llava_bench_review_requests_reviews_and_summary(tmp_path, capsys, caplog):
    bench = tmp_path / "llava-bench"
    questions = [{"question_id": i, "image": f"{i % 2:03d}.jpg", "text": f"Question {i}?", "category": category}
                 for i, category in enumerate(["conv", "detail", "complex", "conv"])]
    write_jsonl(bench / "questions.jsonl", questions)
    write_jsonl(bench / "context.jsonl", [{"id": "c0", "image": "000.jpg", "caption": ["A cat.", "On a mat."]},
                                          {"id": "c1", "image": "001.jpg", "caption": "A dog."}])
    write_jsonl(bench / "answers_gpt4.jsonl", [{"question_id": i, "text": f"Reference {i}.", "answer_id": f"g{i}"}
                                               for i in range(4)])
    write_jsonl(bench / "answers" / "m.jsonl", answers([(i, "?", f"Mine {i}.") for i in range(4)]))
    args = ["-q", str(bench / "questions.jsonl"), "-c", str(bench / "context.jsonl"), "-a",
            str(bench / "answers_gpt4.jsonl"), str(bench / "answers" / "m.jsonl"), "-o", str(bench / "reviews" / "m.jsonl")]
    eval_gpt_review_bench.main(args)
    assert not (bench / "reviews" / "m.jsonl").exists()
    requests = [json.loads(line) for line in open(bench / "reviews" / "requests" / "m.jsonl")]
    assert [r["category"] for r in requests] == ["llava_bench_conv", "llava_bench_detail", "llava_bench_complex",
                                                 "llava_bench_conv"]
    assert requests[0]["model"] == "gpt-3.5-turbo" and requests[0]["answer2_id"] == "a0"
    content = requests[0]["messages"][1]["content"]
    assert content.startswith("[Context]\nA cat.\nOn a mat.\n\n[Question]\nQuestion 0?\n\n[Assistant 1]\nReference 0."
                              "\n\n[End of Assistant 1]\n\n[Assistant 2]\nMine 0.\n\n[End of Assistant 2]\n\n[System]\n"
                              "We would like to request your feedback")

    write_jsonl(tmp_path / "replies.jsonl", [{"id": 1, "content": "8 6\nBecause."}, {"id": 2, "content": "9,9\nOk"},
                                             {"id": 3, "content": "Score: 7/10"}, {"id": 4, "content": "10 5"}])
    with caplog.at_level(logging.WARNING, logger="moellava.eval"):
        eval_gpt_review_bench.main(args + ["--responses", str(tmp_path / "replies.jsonl")])
    assert "1 review(s) have no score pair" in caplog.text
    assert eval_gpt_review_bench.parse_score("8, 7\n") == [-1, -1]  # the official split leaves an empty field
    reviews = [json.loads(line) for line in open(bench / "reviews" / "m.jsonl")]
    assert [r["tuple"] for r in reviews] == [[8.0, 6.0], [9.0, 9.0], [-1, -1], [10.0, 5.0]]
    capsys.readouterr()
    summarize_gpt_review.main(["-f", str(bench / "reviews" / "m.jsonl"), "--score-file", str(tmp_path / "s.json")])
    # all: means (8+9-1+10)/4 = 6.5 and (6+9-1+5)/4 = 4.75 -> 4.75/6.5 = 73.1; conv: 9 and 5.5 -> 61.1.
    assert capsys.readouterr().out == ("m\nall 73.1 65.0 47.5\nllava_bench_complex 100.0 -10.0 -10.0\n"
                                       "llava_bench_conv 61.1 90.0 55.0\nllava_bench_detail 100.0 90.0 90.0\n"
                                       "=================================\n")
    assert read(tmp_path / "s.json")["headline"] == 73.1


def test_mmvet_results_requests_and_capability_scores(tmp_path, capsys, caplog):
    mmvet = tmp_path / "mm-vet"
    data = {"v1_0": {"imagename": "v1_0.png", "capability": ["rec", "ocr"], "question": "What?", "answer": "a<AND>b"},
            "v1_1": {"imagename": "v1_1.png", "capability": ["ocr"], "question": "Read it.", "answer": "c<OR>d"},
            "v1_2": {"imagename": "v1_2.png", "capability": ["rec", "know"], "question": "Who?", "answer": "e"}}
    write_json(mmvet / "mm-vet.json", data)
    write_jsonl(mmvet / "answers" / "m.jsonl", answers([(0, "?", "a and b"), (1, "?", "c"), (2, "?", "no idea")]))
    convert_mmvet_for_eval.main(["--src", str(mmvet / "answers" / "m.jsonl"), "--dst", str(mmvet / "results" / "m.json")])
    assert read(mmvet / "results" / "m.json") == {"v1_0": "a and b", "v1_1": "c", "v1_2": "no idea"}
    args = ["--mmvet_path", str(mmvet), "--ckpt_name", "m", "--result_path", str(mmvet / "results")]
    eval_gpt_mmvet.main(args)
    requests = [json.loads(line) for line in open(mmvet / "results" / "m_gpt-4-0613-grade-requests.jsonl")]
    assert requests[0]["messages"][0]["content"].endswith("\nWhat? | a <AND> b | a and b | ")
    assert not (mmvet / "results" / "m_gpt-4-0613-grade-1runs.json").exists()

    write_jsonl(tmp_path / "replies.jsonl", [{"id": "v1_0", "content": "1.0"}, {"id": "v1_1", "content": "0.5 ok"},
                                             {"id": "v1_2", "content": "none"}])
    capsys.readouterr()
    with caplog.at_level(logging.WARNING, logger="moellava.eval"):
        eval_gpt_mmvet.main(args + ["--responses", str(tmp_path / "replies.jsonl"), "--score-file",
                                    str(tmp_path / "s.json")])
    assert "1 grader repl(ies) are not a score in [0, 1]: scored 0.0" in caplog.text
    # rec: v1_0, v1_2 -> (1 + 0) / 2 = 50; ocr: v1_0, v1_1 -> 75; know: 0; total (1 + .5 + 0) / 3 = 50.
    # Order: count (rec 2, ocr 2, know 1), ties by first appearance (sorted within v1_0: ocr, rec).
    out = capsys.readouterr().out
    assert "ocr: 75.0  rec: 50.0  know: 0.0  total: 50.0\n" in out
    assert "ocr_rec: 100.0  ocr: 50.0  know_rec: 0.0  total: 50.0\n" in out
    with open(mmvet / "results" / "m_gpt-4-0613-cap-score-1runs.csv") as f:
        assert f.read().splitlines() == [",ocr,rec,know,total,std,runs", "m,75.0,50.0,0.0,50.0,0.0,[50.0]"]
    assert read(tmp_path / "s.json")["headline"] == 50.0


def test_report_table(tmp_path, capsys):
    scores = tmp_path / "scores" / "ckpt"
    for stem, headline in {"gqa": 61.44, "sqa": 68.5, "textvqa": 51.4, "pope": 86.3, "mme": 1423.0, "mmvet": 34.3,
                           "vqav2": None, "vizwiz": None, "mmbench": None, "seed": 60.0}.items():
        write_json(scores / f"{stem}.json", {"benchmark": stem, "headline": headline, "metrics": {}})
    report.main(["--answers-dir", str(scores), "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert ("| ckpt | – | server | 61.4 | server | 68.5 | 51.4 | 86.3 | 1423.0 | server | 34.3 | – | 60.0 | – |"
            in out)
    # The README's Avg: the eight columns other than MME (Phi-2 row: 77.6 61.4 43.9 68.5 51.4 86.3 65.2 34.3).
    report.main(["--scores-dir", str(scores), "--server-score", "vqav2=77.6", "--server-score", "vizwiz=43.9",
                 "--server-score", "mmbench=65.2", "--markdown", str(tmp_path / "r.md")])
    row = (tmp_path / "r.md").read_text().splitlines()[2]
    assert row.startswith("| ckpt | 61.1 | 77.6 | 61.4 | 43.9 |")
    assert read(tmp_path / "r.json")["columns"][0] == {"column": "VQAv2", "benchmark": "vqav2",
                                                        "metric": "test-dev accuracy (server)"}
    with pytest.raises(SystemExit, match="'vqa' is not one of"):
        report.main(["--scores-dir", str(scores), "--server-score", "vqa=1"])


def test_the_original_command_lines_run(tmp_path):
    """`python3 scripts/convert_*.py ...` and `python3 moellava/eval/<scorer>.py ...` as the original's
    scripts call them (the scripts/ converters are links to the moellava.eval modules)."""
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    write_jsonl(tmp_path / "merge.jsonl", answers([(7, "?", "Left.")]))
    run = subprocess.run([sys.executable, "scripts/convert_gqa_for_eval.py", "--src", str(tmp_path / "merge.jsonl"),
                          "--dst", str(tmp_path / "pred.json")], cwd=repo, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert read(tmp_path / "pred.json") == [{"questionId": 7, "prediction": "left"}]
    run = subprocess.run([sys.executable, "moellava/eval/eval_pope.py", "--annotation-dir", str(tmp_path / "none"),
                          "--question-file", str(tmp_path / "merge.jsonl"), "--result-file",
                          str(tmp_path / "merge.jsonl")], cwd=repo, capture_output=True, text=True)
    assert run.returncode == 1 and run.stderr.startswith("error: ") and "lacks ['category']" in run.stderr
