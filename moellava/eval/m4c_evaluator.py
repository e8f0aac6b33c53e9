"""The VQA answer normalisation of EvalAI (`EvalAIAnswerProcessor`, as in MMF's m4c evaluator, which the
original's TextVQA scorer and VQAv2/VizWiz converters use) and TextVQA's soft accuracy.

Reproduced exactly, quirks included, so the numbers match the official scripts':
- punctuation next to a space (or anywhere, once the text has a digit,digit comma) is deleted, elsewhere it
  becomes a space; the test looks at the text before any replacement;
- a period not followed by a digit is deleted, but only the first 32 of them: the official call passes
  `re.UNICODE` (32) where `re.sub` takes its `count`;
- number words zero..ten (and "none") become digits, articles are dropped, contractions missing their
  apostrophe get it back ("dont" -> "don't"; the table also maps "somebody'd" -> "somebodyd").
"""

import re
from typing import Dict, List, Sequence

# Written as "missing=restored" pairs; entries that mapped a word to itself are left out (no effect).
_CONTRACTION_PAIRS = """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've
couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've
hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's howd=how'd
howll=how'll hows=how's Id've=I'd've I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd itd've=it'd've
it'dve=it'd've itll=it'll maam=ma'am mightnt=mightn't mightnt've=mightn't've mightn'tve=mightn't've
mightve=might've mustnt=mustn't mustve=must've neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't
ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at shant=shan't shed've=she'd've she'dve=she'd've
shouldve=should've shouldnt=shouldn't shouldnt've=shouldn't've shouldn'tve=shouldn't've
somebody'd=somebodyd somebodyd've=somebody'd've somebody'dve=somebody'd've somebodyll=somebody'll
somebodys=somebody's someoned=someone'd someoned've=someone'd've someone'dve=someone'd've
someonell=someone'll someones=someone's somethingd=something'd somethingd've=something'd've
something'dve=something'd've somethingll=something'll thats=that's thered=there'd thered've=there'd've
there'dve=there'd've therere=there're theres=there's theyd=they'd theyd've=they'd've they'dve=they'd've
theyll=they'll theyre=they're theyve=they've twas='twas wasnt=wasn't wed've=we'd've we'dve=we'd've
weve=we've werent=weren't whatll=what'll whatre=what're whats=what's whatve=what've whens=when's
whered=where'd wheres=where's whereve=where've whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll
whos=who's whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't
wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll
yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've
you'dve=you'd've youll=you'll youre=you're youve=you've
"""
CONTRACTIONS: Dict[str, str] = dict(pair.split("=", 1) for pair in _CONTRACTION_PAIRS.split())
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!")
# The official lookbehind is misspelt as a lookahead for "<=" + digit, which never matches at a period:
# every period not followed by a digit goes.
PERIOD = re.compile(r"\.(?!\d)")
DIGIT_COMMA_DIGIT = re.compile(r"(?<=\d)(\,)+(?=\d)")
OFFICIAL_PERIOD_COUNT = 32  # re.UNICODE, passed as re.sub's count by the official processor


class EvalAIAnswerProcessor:
    """Normalise an answer as EvalAI does before comparing it with the human answers."""

    def word_tokenize(self, word: str) -> str:
        word = word.lower()
        word = word.replace(",", "").replace("?", "").replace("'s", " 's")
        return word.strip()

    def process_punctuation(self, in_text: str) -> str:
        out_text = in_text
        has_digit_comma = DIGIT_COMMA_DIGIT.search(in_text) is not None
        for mark in PUNCTUATION:
            if mark + " " in in_text or " " + mark in in_text or has_digit_comma:
                out_text = out_text.replace(mark, "")
            else:
                out_text = out_text.replace(mark, " ")
        return PERIOD.sub("", out_text, count=OFFICIAL_PERIOD_COUNT)

    def process_digit_article(self, in_text: str) -> str:
        words = [NUMBER_WORDS.get(word, word) for word in in_text.lower().split()]
        words = [CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES]
        return " ".join(words)

    def __call__(self, item: str) -> str:
        item = self.word_tokenize(item)
        item = item.replace("\n", " ").replace("\t", " ").strip()
        item = self.process_punctuation(item)
        return self.process_digit_article(item)


class TextVQAAccuracyEvaluator:
    """VQA soft accuracy over 10 human answers: for an answer given by k of the other 9 humans, min(1, k/3),
    averaged over the 10 ways of leaving one human out."""

    def __init__(self):
        self.answer_processor = EvalAIAnswerProcessor()

    def _compute_answer_scores(self, raw_answers: Sequence[str]) -> Dict[str, float]:
        answers = [self.answer_processor(a) for a in raw_answers]
        if len(answers) != 10:
            raise ValueError(f"TextVQA soft accuracy needs 10 human answers per question, got {len(answers)}.")
        scores = {}
        for candidate in set(answers):
            per_left_out = []
            for left_out in range(len(answers)):
                matches = sum(1 for i, a in enumerate(answers) if i != left_out and a == candidate)
                per_left_out.append(min(1.0, matches / 3))
            scores[candidate] = sum(per_left_out) / len(per_left_out)
        return scores

    def eval_pred_list(self, pred_list: List[dict]) -> float:
        """Mean soft accuracy of `[{"pred_answer": str, "gt_answers": [10 str]}]`."""
        scores = [self._compute_answer_scores(entry["gt_answers"]).get(self.answer_processor(entry["pred_answer"]), 0.0)
                  for entry in pred_list]
        return sum(scores) / len(scores)
