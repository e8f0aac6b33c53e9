"""Every scripts/eval/<bench>.sh end to end on a tiny MoE checkpoint and a tiny eval/ folder in LLaVA's
layout: answers (over two "GPUs" for the chunked ones), conversion, scores, the GPT-judged benchmarks'
requests and summaries, and the report table."""

import json
import os
import subprocess
import sys

import pytest

from moellava.demo.run import REPO_DIR, script_environment

import eval_fixtures
import tiny_llava
from eval_fixtures import write_jsonl

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_scripts")
    tokenizer = tiny_llava.build_tiny_llama_tokenizer(root / "tokenizer")
    tower = tiny_llava.build_tiny_clip_tower(root / "clip")
    checkpoint = tiny_llava.build_tiny_llava_llama(root / "checkpoints" / "tiny-moe", tokenizer, tower, seed=3,
                                                   moe=dict(num_experts=2, top_k_experts=1))
    eval_dir = eval_fixtures.build_eval_tree(root)
    env = script_environment({"CKPT": checkpoint, "EVAL": str(eval_dir), "PYTHON": sys.executable, "BATCH": "2",
                              "WORKERS": "0", "GPUS": "0", "EXTRA_ARGS": "--max_new_tokens 4 --device cpu"})
    return {"root": root, "eval": eval_dir, "env": env}


def run_script(setup, name, **overrides):
    env = {**setup["env"], **overrides}
    result = subprocess.run(["bash", os.path.join(REPO_DIR, "scripts", "eval", name)], env=env, cwd=str(setup["root"]),
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{name}:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result.stdout


def lines(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_every_eval_script(setup):
    eval_dir = setup["eval"]
    out = run_script(setup, "pope.sh", GPUS="0,1")  # a single-file benchmark answered in two chunks, merged
    assert "+ " in out and "Mean over 3 categories: F1" in out
    pope = lines(eval_dir / "pope" / "answers" / "tiny-moe.jsonl")
    assert [a["question_id"] for a in pope] == list(range(9))
    assert os.path.isfile(eval_dir / "pope" / "answers" / "tiny-moe" / "2_1.jsonl")

    assert "Samples: 3\nAccuracy: " in run_script(setup, "textvqa.sh")
    assert "Total: 4, Correct: " in run_script(setup, "sqa.sh")
    assert os.path.isfile(eval_dir / "scienceqa" / "answers" / "tiny-moe_result.json")
    out = run_script(setup, "mme.sh")
    assert "=========== Perception ===========" in out and "\t code_reasoning  score:" in out

    out = run_script(setup, "gqa.sh", GPUS="0,1")
    assert "Accuracy: " in out and "Accuracy / steps number:" in out
    merged = lines(eval_dir / "gqa" / "answers" / "llava_gqa_testdev_balanced" / "tiny-moe" / "merge.jsonl")
    assert [a["question_id"] for a in merged] == ["200", "201", "202"]

    assert "total results: 3, total split: 4, error_line: 0" in run_script(setup, "vqav2.sh")
    upload = json.loads((eval_dir / "vqav2" / "answers_upload" / "llava_vqav2_mscoco_test-dev2015" /
                         "tiny-moe.json").read_text())
    assert [a["question_id"] for a in upload] == [1000, 1001, 1002, 1003] and upload[3]["answer"] == ""
    run_script(setup, "vizwiz.sh")
    assert len(json.loads((eval_dir / "vizwiz" / "answers_upload" / "tiny-moe.json").read_text())) == 2
    assert "image accuracy: " in run_script(setup, "seed.sh")
    assert len(lines(eval_dir / "seed_bench" / "answers_upload" / "tiny-moe.jsonl")) == 3

    pytest.importorskip("openpyxl")
    run_script(setup, "mmbench.sh")
    run_script(setup, "mmbench_cn.sh")
    assert os.path.isfile(eval_dir / "mmbench" / "answers_upload" / "mmbench_dev_20230712" / "tiny-moe.xlsx")
    assert os.path.isfile(eval_dir / "mmbench" / "answers_upload" / "mmbench_dev_cn_20231003" / "tiny-moe.xlsx")
    cn = lines(eval_dir / "mmbench" / "answers" / "mmbench_dev_cn_20231003" / "tiny-moe.jsonl")
    assert cn[0]["prompt"].startswith("A hint.\n这是什么 0?")

    bench = eval_dir / "llava-bench-in-the-wild"
    assert "3 review requests for gpt-3.5-turbo" in run_script(setup, "llavabench.sh")
    requests = lines(bench / "reviews" / "requests" / "tiny-moe.jsonl")
    write_jsonl(setup["root"] / "review_replies.jsonl",
                [{"id": r["id"], "content": f"8 {4 + r['id']}\nok"} for r in requests])
    out = run_script(setup, "llavabench.sh", REVIEW_RESPONSES=str(setup["root"] / "review_replies.jsonl"))
    assert "all 75.0 80.0 60.0" in out  # scores 8 and 5, 6, 7: 6 / 8

    assert "2 grading requests for gpt-4-0613" in run_script(setup, "mmvet.sh")
    assert set(json.loads((eval_dir / "mm-vet" / "results" / "tiny-moe.json").read_text())) == {"v1_0", "v1_1"}
    write_jsonl(setup["root"] / "grades.jsonl", [{"id": "v1_0", "content": "0.5"}, {"id": "v1_1", "content": "1.0"}])
    out = run_script(setup, "mmvet.sh", GRADE_RESPONSES=str(setup["root"] / "grades.jsonl"))
    assert "rec: 75.0  ocr: 100.0  total: 75.0" in out

    report = subprocess.run([sys.executable, "-m", "moellava.eval.report", "--answers-dir",
                             str(eval_dir / "scores" / "tiny-moe")], capture_output=True, text=True, cwd=REPO_DIR)
    assert report.returncode == 0, report.stderr
    row = report.stdout.splitlines()[2].split(" | ")
    assert row[0] == "| tiny-moe" and row[1] == "–"  # no server scores: no Avg
    cells = dict(zip(["VQAv2", "GQA", "VizWiz", "SQA-IMG", "T-VQA", "POPE", "MME", "MM-Bench", "MM-Vet", "MMBench-CN",
                      "SEED-IMG", "LLaVA-Bench"], row[2:]))
    assert cells["VQAv2"] == cells["VizWiz"] == cells["MM-Bench"] == cells["MMBench-CN"] == "server"
    assert cells["MM-Vet"] == "75.0" and cells["LLaVA-Bench"] == "75.0 |"
    assert all(cells[c] not in ("–", "server") for c in ("GQA", "SQA-IMG", "T-VQA", "POPE", "MME", "SEED-IMG"))


def test_scripts_need_a_checkpoint(setup):
    env = {k: v for k, v in setup["env"].items() if k not in ("CKPT", "CKPT_NAME")}
    result = subprocess.run(["bash", os.path.join(REPO_DIR, "scripts", "eval", "pope.sh")], env=env,
                            capture_output=True, text=True)
    assert result.returncode == 2 and "Set CKPT" in result.stderr
