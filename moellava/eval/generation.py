"""Answer generation shared by every `model_vqa*` module: the command line, the prompt encoder, the batched
generator and the loop that writes the answers file.

- Prompts use the checkpoint's conversation template (`config.conv_template`; `--conv-mode` wins).
- Images go through `mm_utils.process_images`, i.e. exactly the training preprocessing (the original padded
  in some modules and not in others).
- `--batch-size N` generates N answers at once, left-padded; each answer is cut where a batch-1 run stops
  (end token, stop string or `--max_new_tokens`), so greedy answers are the batch-1 answers.
- A DataLoader prepares the next batch (image decoding, preprocessing, tokenization) while the model runs.
"""

import argparse
import contextlib
import logging
import os
import sys
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from moellava.conversation import get_conv_template
from moellava.eval.answers import AnswersFile, Question, get_chunk
from moellava.eval.records import EvalInputError
from moellava.mm_utils import (
    KeywordsStoppingCriteria,
    decode_answer,
    get_model_name_from_path,
    image_prompt_prefix,
    process_images,
    tokenizer_image_token,
    unused_vocabulary_rows,
)
from moellava.utils import add_local_rank_argument

logger = logging.getLogger("moellava.eval")


def build_parser(description: str, question_file: str, max_new_tokens: int) -> argparse.ArgumentParser:
    """The original's flags (same names and defaults, except `--conv-mode`: the checkpoint's template), plus
    `--batch-size`, `--num-workers`, `--device` and `--dtype`."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", required=True, help="checkpoint folder (or a Stage-1 folder with --model-base)")
    parser.add_argument("--model-base", default=None, help="base LLM folder under a Stage-1 output")
    parser.add_argument("--image-folder", default="")
    parser.add_argument("--question-file", default=question_file)
    parser.add_argument("--answers-file", default="answer.jsonl")
    parser.add_argument("--conv-mode", default=None, help="conversation template (default: the checkpoint's)")
    parser.add_argument("--num-chunks", type=int, default=1, help="split the questions into this many chunks")
    parser.add_argument("--chunk-idx", type=int, default=0, help="answer this chunk")
    parser.add_argument("--temperature", type=float, default=0.2, help="0 = greedy")
    parser.add_argument("--top_p", type=float, default=None)
    parser.add_argument("--num_beams", type=int, default=1)
    parser.add_argument("--max_new_tokens", type=int, default=max_new_tokens)
    parser.add_argument("--batch-size", type=int, default=1, help="questions generated together (left padding)")
    parser.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="processes preparing the next batches")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="default: float32 on CPU, float16 on GPU")
    add_local_rank_argument(parser)
    parser.add_argument("--return_gating_logit", default=None, metavar="NAME",
                        help="also capture the MoE routing of every question into NAME.safetensors + NAME.json "
                             "(docs/VISUALIZATION.md; the original wrote NAME.pt)")
    return parser


def check_generation_args(args: argparse.Namespace) -> None:
    for flag, value in (("--batch-size", args.batch_size), ("--num_beams", args.num_beams),
                        ("--max_new_tokens", args.max_new_tokens)):
        if value < 1:
            raise EvalInputError(f"{flag} {value} must be at least 1.")
    if args.temperature < 0:
        raise EvalInputError(f"--temperature {args.temperature} is negative: use 0 (greedy) or more.")
    if args.num_workers < 0:
        raise EvalInputError(f"--num-workers {args.num_workers} is negative.")


@dataclass
class Encoded:
    """A question ready for the model: prompt ids (with -200 at the image) and its pixels, if any."""

    index: int
    input_ids: torch.Tensor
    pixels: Optional[torch.Tensor]


class PromptEncoder:
    """Question -> prompt ids and pixels, as in training; light enough to copy into DataLoader workers."""

    def __init__(self, tokenizer, image_processor, model_config, conv_mode: str):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.model_config = model_config
        self.template = get_conv_template(conv_mode)
        self.image_prefix = image_prompt_prefix(model_config)

    def prompt(self, question: Question) -> str:
        conv = self.template.copy()
        text = self.image_prefix + question.text if question.image is not None else question.text
        conv.append_message(conv.roles[0], text)
        conv.append_message(conv.roles[1], None)
        return conv.get_prompt()

    def ids(self, prompt: str) -> torch.Tensor:
        return tokenizer_image_token(prompt, self.tokenizer, return_tensors="pt")

    def encode(self, index: int, question: Question) -> Encoded:
        pixels = None
        if question.image is not None:
            if self.image_processor is None:
                raise EvalInputError(f"{question.describe()} has an image but the checkpoint has no image tower.")
            pixels = process_images([question.image.open()], self.image_processor, self.model_config)[0]
        return Encoded(index, self.ids(self.prompt(question)), pixels)


@dataclass
class GenerationSettings:
    temperature: float = 0.2
    top_p: Optional[float] = None
    num_beams: int = 1
    max_new_tokens: int = 128


class AnswerGenerator:
    """Batched generation: one `model.generate` call per batch of prompts, left-padded.

    Generation of a batch runs until every row has stopped; each row's answer is then cut where it alone
    would have stopped (its first end token, or the first step at which the stop string ends it), which
    is what makes batched greedy answers equal the batch-1 ones.
    """

    def __init__(self, tokenizer, model, stop_str: str, settings: GenerationSettings, recorder=None):
        self.tokenizer = tokenizer
        self.model = model
        self.stop_str = stop_str
        self.settings = settings
        self.recorder = recorder  # a moellava.vis.capture.RoutingRecorder (--return_gating_logit), or None
        self.suppress_tokens = unused_vocabulary_rows(model, tokenizer)
        self.dtype = next(model.parameters()).dtype
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        # The end tokens generate() stops a row at (the generation config's, as in a batch-1 run).
        eos = model.generation_config.eos_token_id
        self.end_ids = set() if eos is None else set(eos if isinstance(eos, list) else [eos])

    def left_pad(self, sequences: Sequence[torch.Tensor]):
        width = max(len(ids) for ids in sequences)
        input_ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, ids in enumerate(sequences):
            input_ids[row, width - len(ids):] = ids
            attention_mask[row, width - len(ids):] = 1
        return input_ids.to(self.model.device), attention_mask.to(self.model.device)

    @torch.inference_mode()
    def generate(self, input_ids: Sequence[torch.Tensor], pixels: Sequence[Optional[torch.Tensor]],
                 max_new_tokens: Optional[int] = None, sample_ids: Optional[Sequence] = None) -> List[str]:
        """Answers for prompts (1-D ids) with their pixels (None for a text-only prompt), in order;
        `sample_ids` name the prompts in the routing capture."""
        ids, mask = self.left_pad(input_ids)
        present = [p for p in pixels if p is not None]
        images = torch.stack(present).to(device=self.model.device, dtype=self.dtype) if present else None
        stop = KeywordsStoppingCriteria([self.stop_str], self.tokenizer, ids)
        settings = self.settings
        sampling = {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p} \
            if settings.temperature > 0 else {"do_sample": False}
        with self.recorder if self.recorder is not None else contextlib.nullcontext():
            output = self.model.generate(
                ids,
                attention_mask=mask,
                images=images,
                num_beams=settings.num_beams,
                max_new_tokens=max_new_tokens or settings.max_new_tokens,
                use_cache=True,
                stopping_criteria=[stop],
                suppress_tokens=self.suppress_tokens,
                pad_token_id=self.pad_id,
                **sampling,
            )
        new_ids = output[:, ids.shape[1]:]
        lengths = [self._length(ids[row], new_ids[row], stop) for row in range(len(input_ids))]
        if self.recorder is not None:
            self.recorder.finish(new_ids, sample_ids=sample_ids, lengths=lengths)
        return [decode_answer(self.tokenizer, new_ids[row, :length], self.stop_str)
                for row, length in enumerate(lengths)]

    def _length(self, prompt_ids: torch.Tensor, new_ids: torch.Tensor, stop: KeywordsStoppingCriteria) -> int:
        """The tokens of a row's answer: up to where it alone would have stopped."""
        for step in range(1, len(new_ids) + 1):
            ended = new_ids[step - 1].item() in self.end_ids
            if ended or stop.sequence_ended(torch.cat([prompt_ids, new_ids[:step]])):
                return step
        return len(new_ids)


class _QuestionDataset(Dataset):
    def __init__(self, questions: Sequence[Question], encoder: PromptEncoder):
        self.questions = questions
        self.encoder = encoder

    def __len__(self) -> int:
        return len(self.questions)

    def __getitem__(self, index: int) -> Encoded:
        return self.encoder.encode(index, self.questions[index])


def _as_list(batch: List[Encoded]) -> List[Encoded]:
    return batch


# One batch of encoded questions -> their answers; the default is `AnswerGenerator.generate`.
AnswerBatch = Callable[[List[Encoded]], List[str]]


def load_for_eval(args: argparse.Namespace):
    """`(tokenizer, model, image_processor, conv_mode)` for the eval flags; left padding for batches."""
    # DeepSpeed (imported with the MoE layers) logs on stdout; the scores printed later keep stdout.
    with contextlib.redirect_stdout(sys.stderr):
        from moellava.model.builder import load_pretrained_model
        from moellava.serve.cli import resolve_conv_mode

        tokenizer, model, processor, _ = load_pretrained_model(
            os.path.expanduser(args.model_path), args.model_base, device=args.device, torch_dtype=args.dtype,
            padding_side="left",
        )
    moe = getattr(model.config, "moe", None)
    if moe and moe.get("drop_tokens") and args.batch_size > 1:
        logger.warning("This checkpoint's MoE layers drop tokens over capacity (moe.drop_tokens): in a batch the "
                       "questions (and their padding) share expert capacity, so answers can differ from batch-1 "
                       "answers. Use --batch-size 1 to reproduce batch-1 numbers.")
    return tokenizer, model, processor["image"], resolve_conv_mode(model.config, args.conv_mode)


def answer_questions(args: argparse.Namespace, questions: Sequence[Question],
                     make_answer_batch: Optional[Callable[[AnswerGenerator, PromptEncoder, Sequence[Question]],
                                                          AnswerBatch]] = None) -> None:
    """Answer this chunk's questions into `--answers-file`, continuing after the answers already there.

    `make_answer_batch(generator, encoder, questions)` returns the batch function when a format needs more
    than one generation per question (ScienceQA's `--answer-prompter`).
    """
    check_generation_args(args)
    chunk = get_chunk(list(questions), args.num_chunks, args.chunk_idx)
    answers = AnswersFile(os.path.expanduser(args.answers_file), get_model_name_from_path(args.model_path))
    todo = answers.remaining(chunk)
    missing = [q for q in todo if q.image is not None and q.image.missing()]
    if missing:
        raise EvalInputError(
            f"{len(missing)} image(s) of {args.question_file} are not under --image-folder {args.image_folder!r}, "
            f"e.g. {missing[0].image.path} ({missing[0].describe()}). Pass the folder that holds them."
        )
    if not todo:
        logger.warning("All %d questions of %s are already answered.", len(chunk), answers.path)
        return
    if len(todo) < len(chunk):
        logger.warning("Resuming %s: %d of %d questions already answered.", answers.path, len(chunk) - len(todo),
                       len(chunk))

    tokenizer, model, image_processor, conv_mode = load_for_eval(args)
    encoder = PromptEncoder(tokenizer, image_processor, model.config, conv_mode)
    recorder = routing_recorder(args, model, done=len(chunk) - len(todo))
    generator = AnswerGenerator(tokenizer, model, encoder.template.stop_str, GenerationSettings(
        args.temperature, args.top_p, args.num_beams, args.max_new_tokens), recorder)
    answer_batch = make_answer_batch(generator, encoder, todo) if make_answer_batch else None
    write_answers(generator, encoder, todo, answers, args.batch_size, args.num_workers, answer_batch,
                  already_done=len(chunk) - len(todo))
    if recorder is not None:
        logger.warning("Routing of %d questions written to %s", len(todo), recorder.save(args.return_gating_logit))


def routing_recorder(args: argparse.Namespace, model, done: int):
    """The routing capture of `--return_gating_logit NAME` (None without it)."""
    if not args.return_gating_logit:
        return None
    if args.num_beams != 1:
        raise EvalInputError(f"--return_gating_logit records one route per prompt: use --num_beams 1, not "
                             f"{args.num_beams}.")
    from moellava.vis.capture import RoutingRecorder

    if done:
        logger.warning("--return_gating_logit captures the questions this run answers; the %d answered before "
                       "(resumed answers file) are not in it.", done)
    return RoutingRecorder(model, description={"question_file": args.question_file})


def write_answers(generator: AnswerGenerator, encoder: PromptEncoder, questions: Sequence[Question],
                  answers: AnswersFile, batch_size: int, num_workers: int, answer_batch: Optional[AnswerBatch] = None,
                  already_done: int = 0) -> None:
    """Answer `questions` batch by batch into `answers`, with a progress bar in questions/s."""
    if answer_batch is None:
        answer_batch = lambda batch: generator.generate([e.input_ids for e in batch], [e.pixels for e in batch],
                                                        sample_ids=[questions[e.index].question_id for e in batch])
    loader = DataLoader(_QuestionDataset(questions, encoder), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=_as_list, shuffle=False)
    with tqdm(total=already_done + len(questions), initial=already_done, unit="question", dynamic_ncols=True,
              desc=os.path.basename(answers.path)) as progress:
        for batch in loader:
            texts = answer_batch(batch)
            answers.write([questions[e.index] for e in batch], texts)
            progress.update(len(batch))
