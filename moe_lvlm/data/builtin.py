"""The built-in dataset: scenes of coloured handwritten digits, for all three stages, no download.

Scenes are 64x64 RGB canvases split into a 2x2 grid of cells; 1-3 distinct digits from
scikit-learn's bundled handwritten digits (`sklearn.datasets.load_digits`, 8x8) are upscaled to
28x28, coloured and placed in distinct cells (at the demo's 32x32 model input, each cell is one
16x16 patch).

Splits (LLaVA conversation records; `answer` and `question_type` set for short-answer records):
  stage1  captions ("A red 3 at the top left and a blue 7 at the bottom right.")
  stage2  two-turn instructions with sentence answers, and detailed descriptions
  stage3  short-answer VQA (count, color, digit, position) and POPE-style yes/no existence questions
  test    like stage3, drawn from held-out digit images that no train split uses
A SentencePiece tokenizer (`tokenizer.model`, pad 0, <= 512 pieces) trained on the train text and
the chat templates' fixed text is written next to the ArrayRecord files.

Build once (seconds): `python -m moe_lvlm.data.builtin [DATA_DIR]` (default ~/tensorflow_datasets).
"""

import io
import json
import os
import sys
import tempfile

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from moe_lvlm import paths
from moe_lvlm.data import conversation
from moe_lvlm.data.tokenizer import IMAGE_TOKEN, Tokenizer, train_tokenizer

NAME = "digit_scenes"
CANVAS, CELL, DIGIT = 64, 32, 28
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
COLORS = {
    "red": (235, 40, 40),
    "green": (40, 205, 60),
    "blue": (55, 95, 255),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
}
_COLOR_NAMES = tuple(COLORS)
# Per-channel pixel mean and std of the scenes (in [0, 1]; mostly black background). A vision
# tower trained from scratch on them (the demo) normalises with these rather than CLIP's, so that
# the digits, not the constant background, dominate its input.
PIXEL_MEAN = (0.076, 0.072, 0.061)
PIXEL_STD = (0.187, 0.174, 0.166)
SPLIT_SIZES = {"stage1": 5000, "stage2": 5000, "stage3": 10000, "test": 1000}
QUESTION_TYPES = ("count", "color", "digit", "position", "yes_no")
_TYPE_PROBS = (0.15, 0.2, 0.2, 0.15, 0.3)
SHORT = "Answer with a single word or phrase."
TOKENIZER_FILE = "tokenizer.model"
VOCAB_SIZE = 512
_HELD_OUT_FRACTION = 0.2
_SEED = 20260101


def digit_pools() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(masks [1797, 28, 28] in [0, 1], labels, train indices, held-out indices): the sklearn
    digits upscaled, and a split of their indices so that the pools share no source image."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    masks = np.stack([
        np.asarray(Image.fromarray((img * (255 / 16)).astype(np.uint8)).resize(
            (DIGIT, DIGIT), Image.Resampling.BILINEAR), np.float32) / 255.0
        for img in digits.images
    ])
    order = np.random.default_rng(_SEED).permutation(len(masks))
    n_test = int(len(masks) * _HELD_OUT_FRACTION)
    return masks, digits.target, np.sort(order[n_test:]), np.sort(order[:n_test])


def sample_scene(rng: np.random.Generator, by_digit: list[np.ndarray]) -> list[dict]:
    """1-3 objects {digit, index (a sklearn digit index from by_digit[digit]), cell, color} with
    distinct digits and cells, sorted by cell."""
    k = int(rng.integers(1, 4))
    digits = rng.permutation(10)[:k]
    cells = rng.permutation(len(POSITIONS))[:k]
    objs = []
    for d, c in zip(digits, cells, strict=True):
        pool = by_digit[d]
        objs.append({"digit": int(d), "index": int(pool[rng.integers(len(pool))]), "cell": int(c),
                     "color": _COLOR_NAMES[rng.integers(len(_COLOR_NAMES))]})
    return sorted(objs, key=lambda o: o["cell"])


def render(objs: list[dict], masks: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 [CANVAS, CANVAS, 3] black canvas with the coloured digits, jittered inside cells."""
    canvas = np.zeros((CANVAS, CANVAS, 3), np.float32)
    for o in objs:
        y = (o["cell"] // 2) * CELL + int(rng.integers(0, CELL - DIGIT + 1))
        x = (o["cell"] % 2) * CELL + int(rng.integers(0, CELL - DIGIT + 1))
        colored = masks[o["index"]][..., None] * np.asarray(COLORS[o["color"]], np.float32)
        region = canvas[y:y + DIGIT, x:x + DIGIT]
        np.maximum(region, colored, out=region)
    return canvas.round().astype(np.uint8)


def _phrase(o: dict) -> str:
    return f"a {o['color']} {o['digit']} at the {POSITIONS[o['cell']]}"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def caption(objs: list[dict]) -> str:
    text = _join([_phrase(o) for o in objs])
    return text[0].upper() + text[1:] + "."


def description(objs: list[dict]) -> str:
    n = len(objs)
    head = "The image shows one digit" if n == 1 else f"The image shows {n} digits"
    parts = [f"{head} on a black background."]
    parts += [f"At the {POSITIONS[o['cell']]} there is a {o['color']} {o['digit']}." for o in objs]
    empty = [POSITIONS[c] for c in range(len(POSITIONS)) if c not in {o["cell"] for o in objs}]
    parts.append(f"The {_join(empty)} {'is' if len(empty) == 1 else 'are'} empty.")
    return " ".join(parts)


def question(kind: str, objs: list[dict], rng: np.random.Generator) -> tuple[str, str, str]:
    """(question, short answer, sentence answer) of type `kind` about the scene."""
    o = objs[int(rng.integers(len(objs)))]
    n = len(objs)
    if kind == "count":
        return ("How many digits are in the image?", str(n),
                f"There {'is one digit' if n == 1 else f'are {n} digits'} in the image.")
    if kind == "color":
        return (f"What color is the {o['digit']}?", o["color"],
                f"The {o['digit']} is {o['color']}.")
    if kind == "digit":
        where = POSITIONS[o["cell"]]
        return (f"Which digit is at the {where}?", str(o["digit"]),
                f"The digit at the {where} is {o['digit']}.")
    if kind == "position":
        where = POSITIONS[o["cell"]]
        return f"Where is the {o['digit']}?", where, f"The {o['digit']} is at the {where}."
    present = {x["digit"] for x in objs}
    if rng.random() < 0.5:
        return (f"Is there a {o['digit']} in the image?", "yes",
                f"Yes, there is a {o['digit']} at the {POSITIONS[o['cell']]}.")
    d = int(rng.choice([x for x in range(10) if x not in present]))
    return f"Is there a {d} in the image?", "no", f"No, there is no {d} in the image."


_CAPTION_PROMPTS = ("Describe the image briefly.", "Write a short caption for the image.",
                    "What is in this picture?")


# Where the first user turn puts the image: "{q}" is the question. The question comes first so
# that, under causal attention, the image tokens can read which digit it names (docs/training.md,
# "The demo's limits").
IMAGE_LAYOUT = "{q}\n<image>"


def _turns(pairs: list[tuple[str, str]]) -> list[dict]:
    out = []
    for i, (q, a) in enumerate(pairs):
        out += [{"from": "human", "value": IMAGE_LAYOUT.format(q=q) if i == 0 else q},
                {"from": "gpt", "value": a}]
    return out


def make_record(split: str, objs: list[dict], rng: np.random.Generator) -> dict:
    """Conversation, answer and question_type of one record of `split` about the scene `objs`."""
    if split == "stage1":
        prompt = _CAPTION_PROMPTS[int(rng.integers(len(_CAPTION_PROMPTS)))]
        return {"conversations": _turns([(prompt, caption(objs))]), "answer": "",
                "question_type": "caption"}
    if split == "stage2":
        if rng.random() < 0.3:
            return {"conversations": _turns([("Describe the image in detail.", description(objs))]),
                    "answer": "", "question_type": "description"}
        kinds = rng.choice(QUESTION_TYPES, size=2, replace=False)
        pairs = [question(str(k), objs, rng) for k in kinds]
        return {"conversations": _turns([(q, long) for q, _, long in pairs]), "answer": "",
                "question_type": "instruction"}
    kind = str(rng.choice(QUESTION_TYPES, p=_TYPE_PROBS))
    q, short, _ = question(kind, objs, rng)
    return {"conversations": _turns([(f"{q} {SHORT}", short)]), "answer": short,
            "question_type": kind}


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _scenes(split: str, size: int, masks: np.ndarray, labels: np.ndarray, pool: np.ndarray):
    """Yields (objects, record, pixels) of `split`'s scenes from the digit indices in `pool`,
    deterministically."""
    rng = np.random.default_rng([_SEED, list(SPLIT_SIZES).index(split)])
    by_digit = [pool[labels[pool] == d] for d in range(10)]
    for _ in range(size):
        objs = sample_scene(rng, by_digit)
        rec = make_record(split, objs, rng)
        yield objs, rec, render(objs, masks, rng)


def generate_split(split: str, size: int, masks: np.ndarray, labels: np.ndarray, pool: np.ndarray):
    """Yields (key, example) for `split` from the digit indices in `pool`, deterministically."""
    for i, (objs, rec, pixels) in enumerate(_scenes(split, size, masks, labels, pool)):
        yield i, {"id": f"{split}-{i}", "image": _png(pixels),
                  "conversations": json.dumps(rec["conversations"]), "answer": rec["answer"],
                  "question_type": rec["question_type"],
                  "digit_ids": ",".join(str(o["index"]) for o in objs)}


def split_scenes(split: str) -> dict[str, list[dict]]:
    """The objects ({digit, index, cell, color}) of every scene of `split`, by record id, as the
    builder draws them (without building): for analyses of answers by what the scene holds."""
    masks, labels, train_pool, test_pool = digit_pools()
    pool = test_pool if split == "test" else train_pool
    scenes = _scenes(split, SPLIT_SIZES[split], masks, labels, pool)
    return {f"{split}-{i}": objs for i, (objs, _, _) in enumerate(scenes)}


def tokenizer_corpus(records) -> list[str]:
    """The text the built-in tokenizer is trained on: conversations plus the templates' own text."""
    texts = [conversation.VICUNA_SYSTEM, conversation.CHATML_SYSTEM, "USER: ASSISTANT:",
             "system\nuser\nassistant\n"]
    for rec in records:
        texts += [part.strip() for t in json.loads(rec["conversations"])
                  for part in t["value"].split(IMAGE_TOKEN) if part.strip()]
    return texts


class DigitScenes(tfds.core.GeneratorBasedBuilder):
    """TFDS builder of the built-in dataset (prepare with file_format='array_record')."""

    VERSION = tfds.core.Version("1.2.0")
    RELEASE_NOTES = {"1.0.0": "Digit scenes for stages I-III and a held-out test split.",
                     "1.1.0": "A BPE tokenizer: whole words are one piece each.",
                     "1.2.0": "The question comes before the image in the first user turn."}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        """None: no checksums or metadata files to look up (tfds's lookup needs the
        `importlib_resources` backport for builders defined inside a package)."""
        return None

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "id": tfds.features.Text(),
                "image": tfds.features.Image(shape=(CANVAS, CANVAS, 3), encoding_format="png"),
                "conversations": tfds.features.Text(),
                "answer": tfds.features.Text(),
                "question_type": tfds.features.Text(),
                # sklearn digit indices drawn in the scene (train and test never share one).
                "digit_ids": tfds.features.Text(),
            }),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        masks, labels, train_pool, test_pool = digit_pools()
        splits = {}
        for split, size in SPLIT_SIZES.items():
            pool = test_pool if split == "test" else train_pool
            splits[split] = list(generate_split(split, size, masks, labels, pool))
        corpus = tokenizer_corpus(ex for s in ("stage1", "stage2", "stage3") for _, ex in splits[s])
        # BPE: on this small, repetitive corpus unigram keeps mostly letters ("What" in 3 pieces).
        tokenizer = train_tokenizer(corpus, VOCAB_SIZE, model_type="bpe")
        tokenizer.save(paths.join(self.data_dir, TOKENIZER_FILE))
        return {split: self._generate_examples(ex) for split, ex in splits.items()}

    def _generate_examples(self, examples):
        yield from examples


def ensure_built(data_dir: str) -> str:
    """Builds the dataset into `data_dir` unless it is there; returns its version directory."""
    builder = DigitScenes(data_dir=os.fspath(paths.path(data_dir)), file_format="array_record")
    if not builder.is_prepared():
        if paths.is_remote(data_dir):  # ArrayRecord writes local files: build here, upload
            with tempfile.TemporaryDirectory() as local:
                ensure_built(local)
                paths.upload(local, data_dir)
        else:
            builder.download_and_prepare()
    return builder.data_dir


def load_tokenizer(data_dir: str) -> Tokenizer:
    """The built-in tokenizer (building the dataset first if needed)."""
    return Tokenizer.from_file(paths.join(ensure_built(data_dir), TOKENIZER_FILE))


if __name__ == "__main__":
    from moe_lvlm import cli

    argv, debug = cli.take_debug_flag(sys.argv[1:])
    print(cli.run(lambda: ensure_built(argv[0] if argv else "~/tensorflow_datasets"), debug))
