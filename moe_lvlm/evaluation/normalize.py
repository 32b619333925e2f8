"""VQA answer normalisation and accuracy, with the semantics of the official scorers.

Two normalisers exist in the wild and benchmarks use different ones:
- `normalize_vqa_answer`: the VQA challenge scorer (GT-Vision-Lab/VQA `vqaEval.py`), used for VQAv2.
- `normalize_evalai_answer`: the EvalAI/m4c answer processor (lower-case, drop commas and '?',
  split "'s", then the same two steps), used by the TextVQA scorer.
Both apply `process_punctuation` then `process_digit_article`; their quirks are kept on purpose
(they change scores): a digit-comma-digit anywhere deletes every punctuation mark instead of
turning it into a space, a period is removed unless a digit follows it, and at most 32 periods
are removed (the official call passes `re.UNICODE` where `count` goes).
"""

import re
from collections.abc import Sequence

# The official contractions table: "word without apostrophes" -> "word with apostrophes".
# It has a few odd entries (keys with capitals never match lower-cased text; one is reversed);
# they are kept because they decide which answers match.
_CONTRACTIONS_TABLE = """
aint ain't|arent aren't|cant can't|couldve could've|couldnt couldn't|couldn'tve couldn't've
couldnt've couldn't've|didnt didn't|doesnt doesn't|dont don't|hadnt hadn't|hadnt've hadn't've
hadn'tve hadn't've|hasnt hasn't|havent haven't|hed he'd|hed've he'd've|he'dve he'd've|hes he's
howd how'd|howll how'll|hows how's|Id've I'd've|I'dve I'd've|Im I'm|Ive I've|isnt isn't|itd it'd
itd've it'd've|it'dve it'd've|itll it'll|let's let's|maam ma'am|mightnt mightn't
mightnt've mightn't've|mightn'tve mightn't've|mightve might've|mustnt mustn't|mustve must've
neednt needn't|notve not've|oclock o'clock|oughtnt oughtn't|ow's'at 'ow's'at|'ows'at 'ow's'at
'ow'sat 'ow's'at|shant shan't|shed've she'd've|she'dve she'd've|she's she's|shouldve should've
shouldnt shouldn't|shouldnt've shouldn't've|shouldn'tve shouldn't've|somebody'd somebodyd
somebodyd've somebody'd've|somebody'dve somebody'd've|somebodyll somebody'll|somebodys somebody's
someoned someone'd|someoned've someone'd've|someone'dve someone'd've|someonell someone'll
someones someone's|somethingd something'd|somethingd've something'd've
something'dve something'd've|somethingll something'll|thats that's|thered there'd
thered've there'd've|there'dve there'd've|therere there're|theres there's|theyd they'd
theyd've they'd've|they'dve they'd've|theyll they'll|theyre they're|theyve they've|twas 'twas
wasnt wasn't|wed've we'd've|we'dve we'd've|weve we've|werent weren't|whatll what'll
whatre what're|whats what's|whatve what've|whens when's|whered where'd|wheres where's
whereve where've|whod who'd|whod've who'd've|who'dve who'd've|wholl who'll|whos who's
whove who've|whyll why'll|whyre why're|whys why's|wont won't|wouldve would've|wouldnt wouldn't
wouldnt've wouldn't've|wouldn'tve wouldn't've|yall y'all|yall'll y'all'll|y'allll y'all'll
yall'd've y'all'd've|y'alld've y'all'd've|y'all'dve y'all'd've|youd you'd|youd've you'd've
you'dve you'd've|youll you'll|youre you're|youve you've
"""
CONTRACTIONS: dict[str, str] = dict(
    pair.split(" ") for pair in _CONTRACTIONS_TABLE.replace("\n", "|").split("|") if pair
)
NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
               "@", "`", ",", "?", "!")  # fmt: skip
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_MAX_PERIODS_REMOVED = 32


def process_punctuation(text: str) -> str:
    """Removes or spaces out punctuation as the official `processPunctuation` does.

    A mark is deleted when it touches a space somewhere in the text (or when the text has a
    digit-comma-digit, e.g. "1,000"), otherwise every occurrence becomes a space ("black/white"
    -> "black white"). Periods not followed by a digit are deleted ("2.5" keeps its period).
    """
    out = text
    delete_all = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for mark in PUNCTUATION:
        if delete_all or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_MAX_PERIODS_REMOVED)


def process_digit_article(text: str) -> str:
    """Lower-cases, maps number words to digits, drops articles, restores contractions."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES]
    return " ".join(words)


def normalize_vqa_answer(text: str) -> str:
    """A model answer as the VQA challenge scorer compares it ("Two dogs." -> "2 dogs")."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def normalize_evalai_answer(text: str) -> str:
    """An answer as the EvalAI/m4c processor (TextVQA scorer) compares it."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def vqa_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """min(#other humans who gave `prediction` / 3, 1), averaged over leaving each human out.

    Both sides must already be normalised; with 10 answers this is the mean over the 10 subsets
    of 9 humans.
    """
    if not human_answers:
        raise ValueError("vqa_accuracy needs at least one human answer")
    total_matches = sum(answer == prediction for answer in human_answers)
    scores = [
        min(1.0, (total_matches - (answer == prediction)) / 3.0) for answer in human_answers
    ]
    return sum(scores) / len(scores)
