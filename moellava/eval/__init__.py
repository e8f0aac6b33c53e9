"""Benchmark evaluation, with the original MoE-LLaVA's module names, flags and file formats.

Answer generation (one module per question format, all through `generation.AnswerGenerator`):
  model_vqa_loader   jsonl {question_id, image, text}: VQAv2, GQA, TextVQA, POPE, MME, VizWiz, SEED
  model_vqa          the same format, long answers: LLaVA-Bench, MM-Vet
  model_vqa_science  ScienceQA (LLaVA's JSON list), --single-pred-prompt, --answer-prompter
  model_vqa_mmbench  MMBench TSV with base64 images, --lang en|cn, --all-rounds
Scoring and conversion (pure functions of files, no model import, each with its command line):
  eval_pope, eval_science_qa, eval_textvqa (+ m4c_evaluator), eval_gqa, convert_answer_to_mme +
  mme_calculation, convert_gqa_for_eval, convert_vqav2_for_submission, convert_vizwiz_for_submission,
  convert_mmbench_for_submission, convert_seed_for_submission, convert_mmvet_for_eval,
  eval_gpt_review_bench + summarize_gpt_review (LLaVA-Bench), eval_gpt_mmvet (MM-Vet)
  report: one table of every benchmark scored for a checkpoint.
See docs/EVAL.md.
"""
