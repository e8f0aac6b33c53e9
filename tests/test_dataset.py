"""LazySupervisedDataset and the collator: image/text mixing, lengths, padding, and every bad-input path."""

import json
import os
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor

from moellava import conversation as conversation_lib
from moellava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from moellava.tokenization import load_tokenizer
from moellava.tokenization.toy import build_toy_tokenizer
from moellava.train.dataset import (
    BadSampleError,
    DataCollatorForSupervisedDataset,
    DataFormatError,
    LazySupervisedDataset,
    SkipRecord,
    SkipReport,
    make_supervised_data_module,
)

SIZE = 16


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = build_toy_tokenizer("llama", str(tmp_path_factory.mktemp("tok")))
    return load_tokenizer(folder, model_max_length=256)


@pytest.fixture(autouse=True)
def v1_template():
    previous = conversation_lib.default_conversation
    conversation_lib.set_default_conversation("v1")
    yield
    conversation_lib.default_conversation = previous


@pytest.fixture
def processor():
    # No normalisation, so pixel values are the image's colours / 255.
    return CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE},
                              do_normalize=False)


def data_args(folder, **overrides):
    fields = dict(image_folder=str(folder), image_aspect_ratio="square", skip_bad_samples=False,
                  max_skipped_fraction=0.01)
    fields.update(overrides)
    return SimpleNamespace(**fields)


def write_image(folder, name, colour=(200, 10, 10), size=(SIZE, SIZE)):
    Image.new("RGB", size, colour).save(os.path.join(folder, name))
    return name


def write_json(folder, name, samples):
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        json.dump(samples, f)
    return path


def sample(sample_id, question, answer, image=None):
    item = {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
    if sample_id is not None:
        item["id"] = sample_id
    if image is not None:
        item["image"] = image
    return item


def test_image_multi_image_and_text_samples_mix(tmp_path, tokenizer, processor):
    write_image(tmp_path, "a.png")
    write_image(tmp_path, "b.png", colour=(10, 200, 10))
    first = write_json(tmp_path, "one.json", [
        sample("single", "<image>\nWhat colour?", "Red.", "a.png"),
        sample("double", "<image> and <image>: same colour?", "No.", ["a.png", "b.png"]),
    ])
    second = write_json(tmp_path, "two.json", [sample("text", "Say hello.", "Hello.")])
    dataset = LazySupervisedDataset([first, second], tokenizer, data_args(tmp_path), image_processor=processor,
                                    tokens_per_image=9)
    assert len(dataset) == 3
    single, double, text = dataset[0], dataset[1], dataset[2]
    assert [len(item["images"]) for item in (single, double, text)] == [1, 2, 0]
    assert int((single["input_ids"] == IMAGE_TOKEN_INDEX).sum()) == 1
    assert int((double["input_ids"] == IMAGE_TOKEN_INDEX).sum()) == 2
    assert not (text["input_ids"] == IMAGE_TOKEN_INDEX).any()
    assert torch.allclose(double["images"][1][:, 0, 0], torch.tensor([10, 200, 10]) / 255.0, atol=1e-6)
    # Labels: exactly the answer and </s> are trained.
    trained = single["labels"][single["labels"] != IGNORE_INDEX].tolist()
    assert trained[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(trained[:-1]).strip() == "Red."
    # Lengths: the sequence in the model, each image its 9 tokens; negative for text-only samples.
    tokens = [len(item["input_ids"]) for item in (single, double, text)]
    assert dataset.lengths == [tokens[0] + 8, tokens[1] + 16, tokens[2]]
    assert dataset.modality_lengths == [tokens[0] + 8, tokens[1] + 16, -tokens[2]]


def test_pad_aspect_ratio_pads_with_the_processor_mean(tmp_path, tokenizer, processor):
    write_image(tmp_path, "wide.png", colour=(250, 0, 0), size=(2 * SIZE, SIZE))
    path = write_json(tmp_path, "d.json", [sample(1, "<image>\nColour?", "Red.", "wide.png")])
    square = LazySupervisedDataset([path], tokenizer, data_args(tmp_path), image_processor=processor, tokens_per_image=4)[0]
    padded = LazySupervisedDataset([path], tokenizer, data_args(tmp_path, image_aspect_ratio="pad"),
                                   image_processor=processor, tokens_per_image=4)[0]
    red = torch.tensor([250, 0, 0]) / 255.0
    mean = torch.tensor([int(x * 255) for x in processor.image_mean]) / 255.0
    assert torch.allclose(square["images"][0][:, 0, 0], red, atol=1e-6)  # centre crop: all red
    assert torch.allclose(padded["images"][0][:, 0, 0], mean, atol=1e-6)  # top row: padding
    assert torch.allclose(padded["images"][0][:, SIZE // 2, SIZE // 2], red, atol=1e-6)


def test_collator_pads_masks_by_length_and_flattens_images(tokenizer):
    pad = tokenizer.pad_token_id
    image_a, image_b, image_c = (torch.full((3, 2, 2), float(i)) for i in range(3))
    instances = [
        # A real token equal to the pad id (pad = unk here) must stay attended.
        {"input_ids": torch.tensor([1, IMAGE_TOKEN_INDEX, pad, 5]), "labels": torch.tensor([-100, -100, pad, 5]),
         "images": [image_a]},
        {"input_ids": torch.tensor([1, 7]), "labels": torch.tensor([-100, 7]), "images": []},
        {"input_ids": torch.tensor([IMAGE_TOKEN_INDEX, 9, IMAGE_TOKEN_INDEX]), "labels": torch.tensor([-100, 9, -100]),
         "images": [image_b, image_c]},
    ]
    batch = DataCollatorForSupervisedDataset(tokenizer)(instances)
    assert batch["input_ids"].tolist() == [[1, -200, pad, 5], [1, 7, pad, pad], [-200, 9, -200, pad]]
    assert batch["labels"].tolist() == [[-100, -100, pad, 5], [-100, 7, -100, -100], [-100, 9, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]]
    assert [image is expected for image, expected in zip(batch["images"], [image_a, image_b, image_c])] == [True] * 3
    assert "skipped_samples" not in batch
    text_only = DataCollatorForSupervisedDataset(tokenizer)([instances[1]])
    assert "images" not in text_only


def test_collator_truncates_to_model_max_length_and_keeps_images_paired(tokenizer):
    collator = DataCollatorForSupervisedDataset(SimpleNamespace(model_max_length=3, pad_token_id=0))
    images = [torch.zeros(3, 2, 2), torch.ones(3, 2, 2)]
    batch = collator([{"input_ids": torch.tensor([1, IMAGE_TOKEN_INDEX, 4, IMAGE_TOKEN_INDEX, 6]),
                       "labels": torch.tensor([-100, -100, 4, -100, 6]), "images": images}])
    assert batch["input_ids"].tolist() == [[1, -200, 4]]
    assert batch["labels"].tolist() == [[-100, -100, 4]]
    assert len(batch["images"]) == 1 and batch["images"][0] is images[0]


def test_sample_without_id_is_named_by_file_and_index(tmp_path, tokenizer, processor):
    path = write_json(tmp_path, "noid.json", [sample(None, "<image>\nColour?", "Red.", "missing.png")])
    with pytest.raises(BadSampleError) as err:
        LazySupervisedDataset([path], tokenizer, data_args(tmp_path), image_processor=processor, tokens_per_image=4)
    assert "sample 'noid.json#0'" in str(err.value)


def test_missing_image_fails_at_build_with_file_id_and_fix(tmp_path, tokenizer, processor):
    write_image(tmp_path, "ok.png")
    path = write_json(tmp_path, "data.json", [
        sample("good", "<image>\nColour?", "Red.", "ok.png"),
        sample("gone-1", "<image>\nColour?", "Red.", "nope.png"),
        sample("gone-2", "<image>\nColour?", "Red.", "nope2.png"),
    ])
    with pytest.raises(BadSampleError) as err:
        LazySupervisedDataset([path], tokenizer, data_args(tmp_path), image_processor=processor, tokens_per_image=4)
    message = str(err.value)
    assert message.startswith(f"{path}: sample 'gone-1' (entry 1): image ")
    assert "nope.png' does not exist (check --image_folder)" in message
    assert "2 of 3 samples have problems: {'missing_image': 2}" in message
    assert "--skip_bad_samples True" in message


def test_image_count_mismatch_fails_with_counts(tmp_path, tokenizer, processor):
    write_image(tmp_path, "a.png")
    path = write_json(tmp_path, "data.json", [sample("two-tags", "<image> <image> colour?", "Red.", "a.png")])
    with pytest.raises(BadSampleError, match=r"sample 'two-tags' \(entry 0\): 2 <image> placeholder\(s\) in the "
                                             r"conversation but 1 image\(s\)"):
        LazySupervisedDataset([path], tokenizer, data_args(tmp_path), image_processor=processor, tokens_per_image=4)
    text_with_tag = write_json(tmp_path, "tag.json", [sample("tag-no-image", "<image> colour?", "Red.")])
    with pytest.raises(BadSampleError, match="1 <image> placeholder"):
        LazySupervisedDataset([text_with_tag], tokenizer, data_args(tmp_path), image_processor=processor, tokens_per_image=4)


def test_corrupt_image_fails_when_the_dataset_is_built(tmp_path, tokenizer, processor):
    with open(tmp_path / "broken.png", "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n not really a png")
    path = write_json(tmp_path, "data.json", [sample("bad-png", "<image>\nColour?", "Red.", "broken.png")])
    with pytest.raises(BadSampleError, match=r"sample 'bad-png' \(entry 0\): image .*broken.png' cannot be decoded"):
        LazySupervisedDataset([path], tokenizer, data_args(tmp_path), image_processor=processor, tokens_per_image=4)


def test_a_truncated_jpeg_is_found_before_training(tmp_path, tokenizer, processor):
    Image.new("RGB", (64, 48), (10, 20, 30)).save(tmp_path / "whole.jpg", quality=95)
    data = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    path = write_json(tmp_path, "data.json", [sample("whole", "<image>\nColour?", "Red.", "whole.jpg"),
                                              sample("cut", "<image>\nColour?", "Red.", "cut.jpg")])
    with pytest.raises(BadSampleError, match=r"sample 'cut' \(entry 1\): image .*cut.jpg' cannot be decoded"):
        LazySupervisedDataset([path], tokenizer, data_args(tmp_path), image_processor=processor, tokens_per_image=4)


def test_conversation_problems_fail_when_the_dataset_is_built(tmp_path, tokenizer, processor):
    turns = [{"from": "human", "value": "Hi"}, {"from": "human", "value": "Hi again"}]
    path = write_json(tmp_path, "data.json", [{"id": "twice-human", "conversations": turns}])
    with pytest.raises(BadSampleError) as err:
        LazySupervisedDataset([path], tokenizer, data_args(tmp_path), image_processor=processor, tokens_per_image=4)
    assert err.value.record.reason == "preprocess_format"
    assert str(err.value).startswith(f"{path}: sample 'twice-human' (entry 0): turn 1 is from 'human'")
    assert "data file. Fix the sample" in str(err.value)


def test_a_lone_surrogate_is_a_bad_sample_not_a_tokenizer_crash(tmp_path, tokenizer):
    path = tmp_path / "data.json"
    path.write_text('[{"id": "ok", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": '
                    '"Yo"}]}, {"id": "surrogate", "conversations": [{"from": "human", "value": "Hi \\ud800 there"},'
                    ' {"from": "gpt", "value": "Yo"}]}]')
    with pytest.raises(BadSampleError, match=r"sample 'surrogate' \(entry 1\): turn 0 holds '\\ud800' at character 3, a "
                                             r"lone UTF-16 surrogate"):
        LazySupervisedDataset([str(path)], tokenizer, data_args(tmp_path))
    dataset = LazySupervisedDataset([str(path)], tokenizer, data_args(tmp_path, skip_bad_samples=True,
                                                                      max_skipped_fraction=0.5))
    assert len(dataset) == 1 and dataset.skip_report.counts() == {"malformed_sample": 1}


class _ExplodingTokenizer:
    """A tokenizer that crashes on one word, as sentencepiece and tiktoken crash on some inputs."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def __len__(self):
        return len(self._tokenizer)

    def __call__(self, text, *args, **kwargs):
        if "BOOM" in text:
            raise TypeError("not a string")
        return self._tokenizer(text, *args, **kwargs)


def test_a_tokenizer_exception_is_one_bad_sample_named_by_id(tmp_path, tokenizer):
    path = write_json(tmp_path, "data.json", [sample("fine", "Hi", "Yo"), sample("crash", "Hi BOOM", "Yo")])
    with pytest.raises(BadSampleError, match=r"sample 'crash' \(entry 1\): the tokenizer failed on this "
                                             r"conversation \(TypeError: not a string\)"):
        LazySupervisedDataset([path], _ExplodingTokenizer(tokenizer), data_args(tmp_path))


def test_malformed_json_fails_with_line_and_column(tmp_path, tokenizer):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"id": 1, "conversations": []},\n  {"id": 2,, }\n]\n')
    with pytest.raises(DataFormatError, match=r"broken.json: malformed JSON at line 3, column 12"):
        LazySupervisedDataset([str(path)], tokenizer, data_args(tmp_path, skip_bad_samples=True))
    not_a_list = write_json(tmp_path, "obj.json", {"conversations": []})
    with pytest.raises(DataFormatError, match="the top level is a JSON dict, expected a list"):
        LazySupervisedDataset([not_a_list], tokenizer, data_args(tmp_path))
    with pytest.raises(DataFormatError, match="no such file"):
        LazySupervisedDataset([str(tmp_path / "absent.json")], tokenizer, data_args(tmp_path))


def test_image_sample_without_tower_is_refused(tmp_path, tokenizer):
    write_image(tmp_path, "a.png")
    path = write_json(tmp_path, "data.json", [sample(1, "<image>\nColour?", "Red.", "a.png")])
    with pytest.raises(ValueError, match="has an image but the model has no image tower. Pass --image_tower"):
        LazySupervisedDataset([path], tokenizer, data_args(tmp_path))


def bad_mix(tmp_path):
    write_image(tmp_path, "ok.png")
    with open(tmp_path / "broken.png", "wb") as f:
        f.write(b"garbage")
    good = [sample(f"good-{i}", "<image>\nColour?", "Red.", "ok.png") for i in range(6)]
    bad = [
        sample("missing", "<image>\nColour?", "Red.", "nope.png"),
        sample("mismatch", "Colour?", "Red.", "ok.png"),
        sample("corrupt", "<image>\nColour?", "Red.", "broken.png"),
        {"id": "format", "conversations": [{"from": "gpt", "value": "x"}, {"from": "gpt", "value": "y"}]},
    ]
    return write_json(tmp_path, "mix.json", good + bad)


def test_skip_option_skips_and_counts_by_reason(tmp_path, tokenizer, processor):
    path = bad_mix(tmp_path)
    args = data_args(tmp_path, skip_bad_samples=True, max_skipped_fraction=0.5, data_path=[path])
    module = make_supervised_data_module(tokenizer, args, image_processor=processor, tokens_per_image=4)
    dataset, collator = module["train_dataset"], module["data_collator"]
    assert len(dataset) == 6  # every bad sample is found and left out when the dataset is built
    report = dataset.skip_report.to_dict()
    assert report["skipped"] == 4 and report["total_samples"] == 10
    assert report["by_reason"] == {"corrupt_image": 1, "image_count_mismatch": 1, "missing_image": 1,
                                   "preprocess_format": 1}
    assert sorted((r["sample_id"], r["reason"]) for r in report["samples"]) == [
        ("corrupt", "corrupt_image"), ("format", "preprocess_format"), ("mismatch", "image_count_mismatch"),
        ("missing", "missing_image")]
    saved = tmp_path / "skipped.json"
    dataset.skip_report.save(str(saved))
    reloaded = SkipReport(10, 0.5)
    reloaded.load(str(saved))
    assert reloaded.to_dict() == report

    # A file that changes after the check: the sample leaves its batch and is counted once.
    dataset.samples[0].images = ["nope.png"]
    items = [dataset[i] for i in range(len(dataset))]
    assert items[0]["skipped"].reason == "missing_image" and "no longer exists" in items[0]["skipped"].detail
    batch = collator(items[:3])
    assert batch["input_ids"].shape[0] == 2 and [r.sample_id for r in batch["skipped_samples"]] == ["good-0"]
    dataset.skip_report.merge(batch["skipped_samples"])
    dataset.skip_report.merge(batch["skipped_samples"])
    assert dataset.skip_report.counts()["missing_image"] == 2
    with pytest.raises(ValueError, match="Every sample of this batch was skipped .* changed after the data check"):
        collator(items[:1])


def test_leading_assistant_turns_are_dropped_and_counted(tmp_path, tokenizer, caplog):
    turns = [{"from": "gpt", "value": "Hello!"}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]
    path = write_json(tmp_path, "data.json", [{"id": "greets-first", "conversations": turns}, sample(2, "A", "B")])
    with caplog.at_level("INFO", logger="moellava"):
        dataset = LazySupervisedDataset([path], tokenizer, data_args(tmp_path))
    assert dataset.notes == {"leading_assistant_turn_dropped": ["greets-first"]}
    assert "1 with leading assistant turn dropped (e.g. 'greets-first')" in caplog.text


def test_the_check_result_is_kept_and_reused_while_nothing_changes(tmp_path, tokenizer, processor, monkeypatch):
    from moellava.train import data_check

    path = bad_mix(tmp_path)
    args = data_args(tmp_path, skip_bad_samples=True, max_skipped_fraction=0.5)
    check_file = str(tmp_path / "out" / "data_check.json")
    first = LazySupervisedDataset([path], tokenizer, args, image_processor=processor, tokens_per_image=4,
                                  check_file=check_file)
    saved = json.loads(open(check_file).read())
    assert saved["total_samples"] == 10 and saved["by_reason"] == first.skip_report.counts()
    calls = []
    monkeypatch.setattr(data_check.SampleChecker, "content", lambda self, s: calls.append(s) or 1)
    again = LazySupervisedDataset([path], tokenizer, args, image_processor=processor, tokens_per_image=4,
                                  check_file=check_file)
    assert calls == [] and again.lengths == first.lengths
    assert again.skip_report.to_dict() == first.skip_report.to_dict()
    # Another image token count (another tower) is another check.
    LazySupervisedDataset([path], tokenizer, args, image_processor=processor, tokens_per_image=9,
                          check_file=check_file)
    assert len(calls) == 9  # every sample but the one whose placeholders do not match its images


def test_skip_budget_refuses_too_much_bad_data(tmp_path, tokenizer, processor):
    path = bad_mix(tmp_path)
    with pytest.raises(ValueError, match=r"4 of 10 samples are bad .* more than --max_skipped_fraction 0.1 allows "
                                         r"\(1\)"):
        LazySupervisedDataset([path], tokenizer, data_args(tmp_path, skip_bad_samples=True, max_skipped_fraction=0.1),
                              image_processor=processor, tokens_per_image=4)
    report = SkipReport(total_samples=100, max_fraction=0.01)
    report.merge([SkipRecord("f.json", i, f"s{i}", "corrupt_image", "cannot be decoded") for i in range(2)])
    with pytest.raises(ValueError, match="2 of 100 samples are bad"):
        report.check_budget()
