"""Answers for a jsonl question file `{question_id, image, text}` with long answers
(`--max_new_tokens 1024`, the original's fixed value): LLaVA-Bench and MM-Vet. Same input, output and
image preprocessing as `model_vqa_loader` (the original skipped the RGB conversion and the padding here).
"""

from moellava.eval import model_vqa_loader


def main(argv=None) -> None:
    model_vqa_loader.main(argv, max_new_tokens=1024, description=__doc__)


if __name__ == "__main__":
    main()
