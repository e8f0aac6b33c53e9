"""Bad input meets a clear message before step 1, never a traceback, a silent skip or code execution: the
stage scripts, the CLI and load_pretrained_model on a tiny model, with the faults a new user makes."""

import json
import os
import shutil
import subprocess

import pytest
import torch

import tiny_llava
from moellava import conversation as conversation_lib
from moellava.demo import data, models
from moellava.demo.run import REPO_DIR, script_environment
from moellava.errors import run_main
from moellava.model.builder import load_pretrained_model
from moellava.serve import cli
from moellava.tokenization import load_tokenizer
from moellava.train import checkpointing
from moellava.train.preprocess import preprocess

pytestmark = pytest.mark.slow

TOWER = models.TowerSize(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2)  # 16 tokens per image
LLAMA = models.LlamaSize(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         max_position_embeddings=256)
GOOD = 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_input")
    paths = data.build_dataset(str(root / "data"), num_train_images=GOOD, num_eval_images=1, text_only_fraction=0)
    tokenizer = models.build_tokenizer(str(root / "tokenizer"))
    tower = models.build_tower(str(root / "tower"), TOWER)
    llm = models.build_llm(str(root / "llm"), tokenizer, LLAMA)
    with open(paths["stage2"]) as f:
        good = json.load(f)
    assert len(good) == GOOD
    return {"root": root, "paths": paths, "tokenizer": tokenizer, "tower": tower, "llm": llm, "good": good}


def write_data(setup, name, extra):
    path = setup["root"] / name
    path.write_text(json.dumps(setup["good"] + extra))
    return str(path)


def run_stage(setup, script, out, **overrides):
    env = script_environment({"LAUNCHER": "python", "OUTPUT_DIR": str(out), "BATCH": "2", "WORKERS": "0",
                              "LOG_STEPS": "1", "DEEPSPEED_CONFIG": "", "MODEL": setup["llm"],
                              "IMAGE_TOWER": setup["tower"], "IMAGE_FOLDER": setup["paths"]["image_folder"],
                              "PRETRAIN_ADAPTER": "", "VERSION": "v1", "DATA_PATH": setup["paths"]["stage2"],
                              **overrides})
    result = subprocess.run(["bash", os.path.join(REPO_DIR, "scripts", script)], env=env, cwd=REPO_DIR,
                            capture_output=True, text=True, timeout=300)
    return result.returncode, result.stdout + result.stderr


def assert_refused_before_training(returncode, log, message):
    assert returncode == 1, log[-3000:]
    assert message in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    assert "{'loss': " not in log


def conversation(sample_id, *turns, image=None):
    item = {"id": sample_id, "conversations": [{"from": who, "value": text} for who, text in turns]}
    if image:
        item["image"] = image
    return item


# --- data: everything found before step 1, skipped at any batch size ---------------------------------------


def test_skipping_works_at_batch_size_one_for_every_kind_of_bad_sample(setup, tmp_path):
    folder = setup["paths"]["image_folder"]
    with open(os.path.join(folder, "truncated.png"), "wb") as f:
        f.write(open(os.path.join(folder, setup["good"][0]["image"]), "rb").read()[:60])
    bad = [
        conversation("cut-image", ("human", "<image>\nWhat colour?"), ("gpt", "Red."), image="truncated.png"),
        conversation("surrogate", ("human", "What colour? \ud800"), ("gpt", "Red.")),
        conversation("swapped", ("human", "Hi"), ("human", "Hi?"), ("gpt", "Yes.")),
        conversation("greeting-first", ("gpt", "Hello!"), ("human", "<image>\nColour?"), ("gpt", "Red."),
                     image=setup["good"][0]["image"]),
    ]
    path = write_data(setup, "mixed.json", bad)
    returncode, log = run_stage(setup, "train_stage2.sh", tmp_path / "out", DATA_PATH=path, BATCH="1",
                                EXTRA_ARGS="--skip_bad_samples True --max_skipped_fraction 0.5")
    assert returncode == 0, log[-3000:]
    assert log.count("{'loss': ") == GOOD + 1  # every good sample, one step each, the greeting's too
    with open(tmp_path / "out" / "skipped_samples.json") as f:
        report = json.load(f)
    assert report["total_samples"] == GOOD + 4
    assert report["by_reason"] == {"corrupt_image": 1, "malformed_sample": 1, "preprocess_format": 1}
    assert "1 with leading assistant turn dropped (e.g. 'greeting-first')" in log


def test_a_bad_sample_at_the_end_of_the_data_stops_the_run_before_step_one(setup, tmp_path):
    path = write_data(setup, "late_bad.json", [conversation("swapped", ("human", "Hi"), ("human", "Hi?"),
                                                            ("gpt", "Yes."))])
    returncode, log = run_stage(setup, "train_stage2.sh", tmp_path / "out", DATA_PATH=path)
    assert_refused_before_training(
        returncode, log, f"error: {path}: sample 'swapped' (entry {GOOD}): turn 1 is from 'human' but 'gpt' was "
                         "expected")


def test_an_answer_cut_only_after_image_expansion_is_refused(setup, tmp_path):
    """The text fits --model_max_length; once the image becomes its 16 tokens, the answer would not."""
    tokenizer = load_tokenizer(setup["tokenizer"])
    conversation_lib.set_default_conversation("v1")
    sample = conversation("long", ("human", "<image>\n" + "Look at the shape closely. " * 6), ("gpt", "Red."),
                          image=setup["good"][0]["image"])
    text_length = len(preprocess([sample["conversations"]], tokenizer, has_image=True)["input_ids"][0])
    expanded = text_length - 1 + 16
    path = write_data(setup, "long.json", [sample])
    returncode, log = run_stage(setup, "train_stage2.sh", tmp_path / "out", DATA_PATH=path,
                                MAX_LEN=str(expanded - 2))
    assert text_length < expanded - 2
    assert_refused_before_training(
        returncode, log, f"sample 'long' (entry {GOOD}): it is {expanded} tokens long, each of its 1 image(s) "
                         f"counted as 16 tokens, more than --model_max_length {expanded - 2}: truncation would cut")


# --- MoE settings that differ from the checkpoint's ----------------------------------------------------


@pytest.fixture(scope="module")
def moe_checkpoint(setup):
    return tiny_llava.build_tiny_llava_llama(
        str(setup["root"] / "moe"), setup["tokenizer"], setup["tower"],
        moe={"num_experts": 4, "capacity_factor": 1.5, "eval_capacity_factor": 2.0, "min_capacity": 0})


def test_other_experts_are_refused_other_routing_is_applied(setup, moe_checkpoint, tmp_path):
    returncode, log = run_stage(setup, "train_stage3.sh", tmp_path / "refused", MODEL=moe_checkpoint,
                                NUM_EXPERTS="2", MAX_STEPS="1")
    assert_refused_before_training(
        returncode, log, "num_experts: the checkpoint has [4, 4], this run asks for [2, 2] (--num_experts (NUM_EXPERTS))")
    returncode, log = run_stage(setup, "train_stage3.sh", tmp_path / "applied", MODEL=moe_checkpoint,
                                CAPACITY_FACTOR="1.25", MAX_STEPS="1")
    assert returncode == 0, log[-3000:]
    assert "routing settings (applied; the expert weights are as saved): capacity_factor 1.5 -> 1.25" in log
    with open(tmp_path / "applied" / "config.json") as f:
        assert json.load(f)["moe"]["capacity_factor"] == 1.25


# --- the output folder -----------------------------------------------------------------------------------


def mount_tmpfs(folder, options):
    """A tmpfs at `folder` (needs root and mount rights); False when it cannot be mounted."""
    os.makedirs(folder, exist_ok=True)
    if shutil.which("mount") is None or os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


@pytest.fixture
def read_only_folder(tmp_path):
    folder = tmp_path / "read_only"
    if mount_tmpfs(folder, "ro,size=1m"):
        yield folder
        subprocess.run(["umount", str(folder)], check=False)
    elif os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
    else:
        pytest.skip("running as root without mount rights: no folder can be made read-only")


def test_a_read_only_output_dir_fails_before_the_model_loads(setup, read_only_folder):
    returncode, log = run_stage(setup, "train_stage2.sh", read_only_folder / "out")
    assert_refused_before_training(returncode, log, f"--output_dir {read_only_folder / 'out'} is not writable")
    assert "Trainable:" not in log  # logged once the model is loaded


def test_a_full_disk_is_named_as_such(setup, tmp_path):
    folder = tmp_path / "small"
    if not mount_tmpfs(folder, "size=400k"):
        pytest.skip("no tmpfs can be mounted here (needs root and mount rights) to fill a disk")
    try:
        returncode, log = run_stage(setup, "train_stage2.sh", folder, MAX_STEPS="2", SAVE_STEPS="1")
    finally:
        subprocess.run(["umount", str(folder)], check=False)
    assert returncode == 1, log[-3000:]
    assert "a checkpoint takes about" in log and "needed. Free space or use another --output_dir" in log
    assert f"error: [Errno 28] No space left on device while writing {folder}/checkpoint-1" in log
    assert "No complete checkpoint exists yet" in log and "Traceback" not in log


# --- messages instead of tracebacks ------------------------------------------------------------------------


def run_cli(capsys, *argv):
    """The CLI's error message (what `python -m moellava.serve.cli` prints before exiting with status 1)."""
    with pytest.raises(SystemExit) as exit_info:
        run_main(cli.main, [str(a) for a in argv])
    assert "Traceback" not in capsys.readouterr().err
    return str(exit_info.value.code)


def test_cli_checks_the_image_before_loading_the_model(capsys, tmp_path):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image")
    absent_model = tmp_path / "no_model"  # loading it would fail: the image is checked first
    assert "--image-file /nope.png: no such file." in run_cli(capsys, "--model-path", absent_model,
                                                               "--image-file", "/nope.png")
    assert f"--image-file {tmp_path} is a folder" in run_cli(capsys, "--model-path", absent_model,
                                                             "--image-file", tmp_path)
    assert f"--image-file {garbage} is not an image file" in run_cli(capsys, "--model-path", absent_model,
                                                                      "--image-file", garbage)


def test_unknown_model_type_and_stage1_folders_get_messages(setup, capsys, tmp_path):
    image = tiny_llava.write_test_image(str(tmp_path / "image.png"))
    foobar = tmp_path / "foobar"
    foobar.mkdir()
    (foobar / "config.json").write_text(json.dumps({"model_type": "foobar"}))
    message = f"{foobar}/config.json has model_type 'foobar', which moellava does not know"
    with pytest.raises(ValueError, match=message):
        load_pretrained_model(str(foobar))
    assert message in run_cli(capsys, "--model-path", foobar, "--image-file", image)
    returncode, log = run_stage(setup, "train_stage2.sh", tmp_path / "out", MODEL=str(foobar))
    assert_refused_before_training(returncode, log, message)

    stage1, _ = tiny_llava.build_tiny_stage1(str(tmp_path / "stage1"), str(tmp_path / "base"), setup["tokenizer"],
                                             setup["tower"])
    assert f"{stage1} is a Stage-1 output (config.json + mm_projector.bin, no LLM weights): pass the base LLM" in \
        run_cli(capsys, "--model-path", stage1, "--image-file", image)


def test_missing_or_garbage_projector_files_get_messages(setup, tmp_path):
    returncode, log = run_stage(setup, "train_stage2.sh", tmp_path / "missing", PRETRAIN_ADAPTER="/nope/mm.bin")
    assert_refused_before_training(returncode, log, "--pretrain_mm_mlp_adapter /nope/mm.bin: no such file.")
    assert "Trainable:" not in log
    garbage = tmp_path / "garbage.bin"
    torch.save({"model.mm_projector.x": _Planted(str(tmp_path / "never"))}, garbage)
    returncode, log = run_stage(setup, "train_stage2.sh", tmp_path / "garbage", PRETRAIN_ADAPTER=str(garbage))
    assert_refused_before_training(returncode, log, f"{garbage} is not a projector file written by Stage 1")
    assert "weights_only=False" not in log and not os.path.exists(tmp_path / "never")


# --- no code from model or output folders ------------------------------------------------------------------

PLANTED_CODE = "import pathlib\npathlib.Path({marker!r}).write_text('code from the folder ran')\n"


class _Planted:
    """Unpickling it creates a file: what a planted pickle could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_folder_with_its_own_code_never_runs_it(setup, capsys, tmp_path):
    marker = tmp_path / "code_ran"
    planted = tmp_path / "planted_model"
    planted.mkdir()
    (planted / "config.json").write_text(json.dumps({
        "model_type": "evil", "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.Evil"}}))
    (planted / "evil.py").write_text(PLANTED_CODE.format(marker=str(marker)))
    image = tiny_llava.write_test_image(str(tmp_path / "image.png"))
    returncode, log = run_stage(setup, "train_stage2.sh", tmp_path / "out", MODEL=str(planted))
    assert_refused_before_training(returncode, log, "moellava never runs Python code shipped in a model folder")
    run_cli(capsys, "--model-path", planted, "--image-file", image)
    with pytest.raises(ValueError, match="which moellava does not know"):
        load_pretrained_model(str(planted))
    # A known model whose tokenizer asks for the folder's own tokenizer code.
    tokenizer_planted = tmp_path / "planted_tokenizer"
    shutil.copytree(setup["llm"], tokenizer_planted)
    config = json.loads((tokenizer_planted / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]})
    (tokenizer_planted / "tokenizer_config.json").write_text(json.dumps(config))
    (tokenizer_planted / "tokenization_evil.py").write_text(PLANTED_CODE.format(marker=str(marker)))
    returncode, log = run_stage(setup, "train_stage2.sh", tmp_path / "out2", MODEL=str(tokenizer_planted))
    assert returncode != 0 and "{'loss': " not in log
    assert not marker.exists()


def test_a_planted_pickle_in_a_checkpoint_is_refused_not_loaded(setup, tmp_path):
    out = tmp_path / "out"
    overrides = {"DEEPSPEED_CONFIG": os.path.join(REPO_DIR, "scripts", "zero2.json"), "SAVE_STEPS": "1",
                 "SAVE_TOTAL": "2"}
    returncode, log = run_stage(setup, "train_stage2.sh", out, MAX_STEPS="2", **overrides)
    assert returncode == 0, log[-3000:]
    checkpoint = out / "checkpoint-2"
    states = next((checkpoint / "global_step2").glob("*optim_states.pt"))
    state = torch.load(states, map_location="cpu", weights_only=False)
    marker = tmp_path / "pickle_ran"
    state["planted"] = _Planted(str(marker))
    torch.save(state, states)
    checkpointing.mark_complete(str(checkpoint), 2)  # the planter keeps the checkpoint looking complete
    returncode, log = run_stage(setup, "train_stage2.sh", out, MAX_STEPS="3", **overrides)
    assert_refused_before_training(returncode, log, f"{states} holds the object io.open, which is not a "
                                                    "tensor, plain data or a known training-state class")
    assert not marker.exists()
