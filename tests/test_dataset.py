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
    # Lengths: words (placeholders aside) + 9 tokens per image, negative for text-only samples.
    assert dataset.modality_lengths == [3 + 9, 5 + 18, -3]
    assert dataset.lengths == [12, 23, 3]


def test_pad_aspect_ratio_pads_with_the_processor_mean(tmp_path, tokenizer, processor):
    write_image(tmp_path, "wide.png", colour=(250, 0, 0), size=(2 * SIZE, SIZE))
    path = write_json(tmp_path, "d.json", [sample(1, "<image>\nColour?", "Red.", "wide.png")])
    square = LazySupervisedDataset([path], tokenizer, data_args(tmp_path), image_processor=processor)[0]
    padded = LazySupervisedDataset([path], tokenizer, data_args(tmp_path, image_aspect_ratio="pad"),
                                   image_processor=processor)[0]
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
        LazySupervisedDataset([path], tokenizer, data_args(tmp_path), image_processor=processor)
    assert "sample 'noid.json#0'" in str(err.value)


def test_missing_image_fails_at_build_with_file_id_and_fix(tmp_path, tokenizer, processor):
    write_image(tmp_path, "ok.png")
    path = write_json(tmp_path, "data.json", [
        sample("good", "<image>\nColour?", "Red.", "ok.png"),
        sample("gone-1", "<image>\nColour?", "Red.", "nope.png"),
        sample("gone-2", "<image>\nColour?", "Red.", "nope2.png"),
    ])
    with pytest.raises(BadSampleError) as err:
        LazySupervisedDataset([path], tokenizer, data_args(tmp_path), image_processor=processor)
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
        LazySupervisedDataset([path], tokenizer, data_args(tmp_path), image_processor=processor)
    text_with_tag = write_json(tmp_path, "tag.json", [sample("tag-no-image", "<image> colour?", "Red.")])
    with pytest.raises(BadSampleError, match="1 <image> placeholder"):
        LazySupervisedDataset([text_with_tag], tokenizer, data_args(tmp_path), image_processor=processor)


def test_corrupt_image_fails_when_loaded(tmp_path, tokenizer, processor):
    with open(tmp_path / "broken.png", "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n not really a png")
    path = write_json(tmp_path, "data.json", [sample("bad-png", "<image>\nColour?", "Red.", "broken.png")])
    dataset = LazySupervisedDataset([path], tokenizer, data_args(tmp_path), image_processor=processor)
    with pytest.raises(BadSampleError, match=r"sample 'bad-png' \(entry 0\): image .*broken.png' cannot be decoded"):
        dataset[0]


def test_preprocess_error_names_file_and_sample(tmp_path, tokenizer, processor):
    turns = [{"from": "human", "value": "Hi"}, {"from": "human", "value": "Hi again"}]
    path = write_json(tmp_path, "data.json", [{"id": "twice-human", "conversations": turns}])
    dataset = LazySupervisedDataset([path], tokenizer, data_args(tmp_path), image_processor=processor)
    with pytest.raises(BadSampleError) as err:
        dataset[0]
    assert err.value.record.reason == "preprocess_format"
    assert str(err.value).startswith(f"{path}: sample 'twice-human' (entry 0): turn 1 is from 'human'")


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
    module = make_supervised_data_module(tokenizer, args, image_processor=processor)
    dataset, collator = module["train_dataset"], module["data_collator"]
    assert len(dataset) == 8  # missing and mismatch are removed when the dataset is built
    assert dataset.skip_report.counts() == {"image_count_mismatch": 1, "missing_image": 1}
    items = [dataset[i] for i in range(len(dataset))]
    skipped = [item["skipped"] for item in items if "skipped" in item]
    assert sorted((r.sample_id, r.reason) for r in skipped) == [("corrupt", "corrupt_image"),
                                                                ("format", "preprocess_format")]
    batch = collator(items[-4:])
    assert batch["input_ids"].shape[0] == 2
    assert sorted(r.sample_id for r in batch["skipped_samples"]) == ["corrupt", "format"]
    dataset.skip_report.merge(batch["skipped_samples"])
    dataset.skip_report.merge(batch["skipped_samples"])  # counted once each
    report = dataset.skip_report.to_dict()
    assert report["skipped"] == 4 and report["total_samples"] == 10
    assert report["by_reason"] == {"corrupt_image": 1, "image_count_mismatch": 1, "missing_image": 1,
                                   "preprocess_format": 1}
    saved = tmp_path / "skipped.json"
    dataset.skip_report.save(str(saved))
    reloaded = SkipReport(10, 0.5)
    reloaded.load(str(saved))
    assert reloaded.to_dict() == report
    with pytest.raises(ValueError, match="Every sample of this batch was bad and skipped"):
        collator([item for item in items if "skipped" in item])


def test_skip_budget_refuses_too_much_bad_data(tmp_path, tokenizer, processor):
    path = bad_mix(tmp_path)
    with pytest.raises(ValueError, match=r"2 of 10 samples are bad .* more than --max_skipped_fraction 0.1 allows "
                                         r"\(1\)"):
        LazySupervisedDataset([path], tokenizer, data_args(tmp_path, skip_bad_samples=True, max_skipped_fraction=0.1),
                              image_processor=processor)
    report = SkipReport(total_samples=100, max_fraction=0.01)
    report.merge([SkipRecord("f.json", i, f"s{i}", "corrupt_image", "cannot be decoded") for i in range(2)])
    with pytest.raises(ValueError, match="2 of 100 samples are bad"):
        report.check_budget()
