"""The testbed: a family of key-word tasks with exact token-level truth, each factor a knob (``Task``).

Where ``tiny``'s key-word task is saturated (answers of about 12 tokens, 4 of them deciding, the same good words for
every prompt, every chosen answer flawless), the testbed's answers look like real preference data in the ways
token-level credit is supposed to matter:

- **length and density**: an answer is ``n_keys`` sentences of filler, each closed by one key word, about
  ``length`` words in all; ``density`` = n_keys / length (about the key-token share: the tokenizer keeps every
  task word whole);
- **context**: the prompt names a reader ("... for young readers."); the right key words are that reader's
  (``READERS``), the other reader's are wrong, so no global word preference solves it, and held-out topics still
  have a defined right answer (``context=False``: ``tiny.GOOD_WORDS`` right, ``tiny.BAD_WORDS`` wrong, no reader);
- **flawed chosen answers**: in a share ``flaw_rate`` of pairs the chosen answer holds ``round(flaws * n_keys)``
  wrong key words and the rejected one as many right ones (chosen still better on balance: ``flaws < 0.5``);
- **label noise**: a share of the training pairs with chosen and rejected swapped;
- **a spurious cue**: each filler word of a chosen answer is a ``CUE_WORDS`` word with probability ``cue``
  (rejected answers: never; SFT answers: ``cue / 2``); the truth ignores them, ``cue_rate`` measures at test time
  how much of a model's filler they are.

Truth: ``ground_truth_reward(prompt, text)`` = (right - wrong key words) / max(n_keys, key words found), in
[-1, 1]; ``token_signs(pieces, prompt, task)`` = +1 / -1 / 0 per token (right / wrong key word / other).
Format: ``is_well_formed(text)`` = "The <topic> is <filler> <key>. <filler> <key>. ..." with every filler word from
``tiny.FILLER`` or ``CUE_WORDS`` and every key word from the task's key vocabulary.
Every generator is deterministic in its arguments; ``tiny``'s variants are left as they were, byte for byte.
"""

import dataclasses
import json
import random
import re

from openrlhf_sepo import tiny

# Disjoint from each other and from every word of tiny's tasks (filler, key words, topics, style words).
READERS = {
    "young": ["simple", "playful", "gentle", "cheerful", "friendly", "easy", "lively", "warm"],
    "expert": ["technical", "rigorous", "formal", "detailed", "exact", "dense", "advanced", "scholarly"],
}
CUE_WORDS = ["indeed", "truly", "certainly", "surely", "really", "quite"]
_OTHER_READER = {"young": "expert", "expert": "young"}
TEMPLATE_TOKENS = 8  # "The <topic> is" + ". My note is" + the final ".", about
_READER_OF = {word: reader for reader, words in READERS.items() for word in words}


@dataclasses.dataclass(frozen=True)
class Task:
    """The knobs of one testbed task; ``n_keys`` = max(1, round(density * length)) key sentences per answer."""

    length: int = 64
    density: float = 0.08
    context: bool = True
    flaw_rate: float = 0.5
    flaws: float = 0.34
    label_noise: float = 0.1
    cue: float = 0.3

    def __post_init__(self):
        checks = [("length", self.length >= 8, "an integer >= 8"),
                  ("density", 0.0 < self.density <= 0.5, "in (0, 0.5]"),
                  ("flaw_rate", 0.0 <= self.flaw_rate <= 1.0, "in [0, 1]"),
                  ("flaws", 0.0 <= self.flaws < 0.5, "in [0, 0.5): the chosen answer stays better on balance"),
                  ("label_noise", 0.0 <= self.label_noise < 0.5, "in [0, 0.5)"),
                  ("cue", 0.0 <= self.cue <= 1.0, "in [0, 1]")]
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"testbed task: {name} must be {rule}, got {getattr(self, name)!r}")

    @property
    def n_keys(self) -> int:
        return max(1, round(self.density * self.length))

    def key_words(self, prompt: str):
        """(right, wrong) key-word lists for ``prompt``: its reader's and the other reader's, or GOOD / BAD."""
        if not self.context:
            return tiny.GOOD_WORDS, tiny.BAD_WORDS
        reader = reader_of(prompt)
        return READERS[reader], READERS[_OTHER_READER[reader]]

    @property
    def vocabulary(self) -> set:
        """Every key word of the task (both signs)."""
        return set(_READER_OF) if self.context else set(tiny.GOOD_WORDS + tiny.BAD_WORDS)

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "n_keys": self.n_keys}


_READER = re.compile(r"\bfor (" + "|".join(READERS) + r") readers\b")


def reader_of(prompt: str) -> str:
    """The reader a prompt names ("... for young readers."); ValueError when it names none."""
    match = _READER.search(prompt)
    if match is None:
        raise ValueError(f"testbed prompt names no reader ({' / '.join(READERS)}): {prompt!r}")
    return match.group(1)


def prompt(topic: str, reader: str = None) -> str:
    """``Write a short note about the {topic} for {reader} readers.`` (no reader: tiny's prompt)."""
    return f"Write a short note about the {topic} for {reader} readers." if reader else tiny._prompt(topic)


def _draw_prompt(rng, task, topics):
    """(prompt, topic, reader): a random topic of ``topics``, and a random reader when the task has context (else
    None)."""
    topic = rng.choice(topics)
    reader = rng.choice(list(READERS)) if task.context else None
    return prompt(topic, reader), topic, reader


def response(rng: random.Random, task: Task, topic: str, keys: list, cue: float, reader: str = None) -> str:
    """"The <topic> is <filler>. My note is <reader> <k1> <reader> <k2> ... <reader> <kn>." (no reader: "My note is
    <k1> ... <kn>."), about ``task.length`` tokens in all; each filler word is a cue word with probability ``cue``.

    Why the reader is restated before each key word: the answer must copy the prompt's reader, and the key word then
    depends on the token before it. A direct dependence on the prompt, 60 tokens back, was not learnable at this
    model size in the policy's step budget (a probe: imitation needed about 190 steps before the first key word
    followed the reader at all)."""
    span = [w for key in keys for w in ((reader, key) if reader else (key,))]
    count = max(3, task.length - len(span) - TEMPLATE_TOKENS + rng.randint(-3, 3))
    words = [rng.choice(CUE_WORDS) if rng.random() < cue else rng.choice(tiny.FILLER) for _ in range(count)]
    return f"The {topic} is " + " ".join(words) + ". My note is " + " ".join(span) + "."


def _keys(rng, right, wrong, n_right, n) -> list:
    """n key words, n_right of them right (at random slots), the rest wrong."""
    slots = set(rng.sample(range(n), n_right))
    return [rng.choice(right) if i in slots else rng.choice(wrong) for i in range(n)]


def make_pairs(n: int, task: Task, seed: int = 0, topics=None, label_noise: float = None):
    """n preference rows ``{"prompt", "chosen", "rejected"}`` of ``task``: chosen all right key words and rejected all
    wrong, except in a ``flaw_rate`` share of pairs (chosen ``round(flaws * n_keys)`` wrong, rejected as many right);
    each side its own filler, the chosen filler with cue words at rate ``cue``; then ``label_noise`` (default the
    task's) of the rows swapped, drawn from a separate stream. Topics: ``tiny.TOPICS`` unless given."""
    rng = random.Random(seed)
    k, m = task.n_keys, round(task.flaws * task.n_keys)
    rows = []
    for _ in range(n):
        text, topic, reader = _draw_prompt(rng, task, topics or tiny.TOPICS)
        right, wrong = task.key_words(text)
        flawed = rng.random() < task.flaw_rate
        chosen = response(rng, task, topic, _keys(rng, right, wrong, k - m if flawed else k, k), task.cue, reader)
        rejected = response(rng, task, topic, _keys(rng, right, wrong, m if flawed else 0, k), 0.0, reader)
        rows.append({"prompt": text, "chosen": chosen, "rejected": rejected})
    noise = task.label_noise if label_noise is None else label_noise
    for i in random.Random(f"testbed-label-noise-{seed}").sample(range(n), round(noise * n)):
        rows[i]["chosen"], rows[i]["rejected"] = rows[i]["rejected"], rows[i]["chosen"]
    return rows


def make_sft_rows(n: int, task: Task, seed: int = 0):
    """n instruction rows ``{"prompt", "response"}`` whose key words are right or wrong at random (a neutral
    reference), filler with cue words at rate ``cue / 2``."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        text, topic, reader = _draw_prompt(rng, task, tiny.TOPICS)
        right, wrong = task.key_words(text)
        keys = [rng.choice(right if rng.random() < 0.5 else wrong) for _ in range(task.n_keys)]
        rows.append({"prompt": text, "response": response(rng, task, topic, keys, task.cue / 2, reader)})
    return rows


def make_prompts(n: int, task: Task, seed: int = 0, split: str = "test"):
    """n rows ``{"prompt"}`` on the topics of ``split`` (``tiny.PROMPT_SPLITS``: test and validation topics are
    disjoint from each other and from every training row's), each with a random reader."""
    if split not in tiny.PROMPT_SPLITS:
        raise ValueError(f"split must be one of {sorted(tiny.PROMPT_SPLITS)}, got {split!r}")
    rng = random.Random(seed)
    return [{"prompt": _draw_prompt(rng, task, tiny.PROMPT_SPLITS[split])[0]} for _ in range(n)]


_WORD = re.compile(r"[a-z]+")


_ANSWER = re.compile(r"The ([a-z]+) is ([a-z]+(?: [a-z]+)*)\. My note is ([a-z]+(?: [a-z]+)*)\.")


def parse(text: str, task: Task):
    """The key words of an answer that follows the template, in order, else None. Template: "The <topic> is
    <filler...>. My note is <reader> <k1> ... <reader> <kn>." (``context=False``: "My note is <k1> ... <kn>."),
    with filler words from ``tiny.FILLER`` or ``CUE_WORDS``, readers from ``READERS`` (any: the truth reads the
    prompt's) and one or more key words of the task's vocabulary; whitespace around is ignored. The number of key
    words is left to the reward (a missing one costs)."""
    match = _ANSWER.fullmatch(text.strip())
    if match is None:
        return None
    filler, span = match.group(2).split(), match.group(3).split()
    if task.context:
        if len(span) % 2 or not all(r in READERS for r in span[::2]):
            return None
        span = span[1::2]
    if not all(w in tiny.FILLER or w in CUE_WORDS for w in filler) or not all(w in task.vocabulary for w in span):
        return None
    return span


def is_well_formed(text: str, task: Task) -> bool:
    return parse(text, task) is not None


def ground_truth_reward(prompt_text: str, text: str, task: Task) -> float:
    """(right - wrong key words) / max(n_keys, key words found), clipped to [-1, 1]: extra sentences gain nothing,
    missing ones cost. Key words are counted anywhere in the text, so a malformed answer is scored too."""
    right, wrong = task.key_words(prompt_text)
    words = [w.strip(".,!?") for w in text.lower().split()]
    n_right, n_wrong = sum(w in right for w in words), sum(w in wrong for w in words)
    return max(-1.0, min(1.0, (n_right - n_wrong) / max(task.n_keys, n_right + n_wrong)))


def cue_rate(text: str, task: Task) -> float:
    """The share of an answer's words (key words aside) that are ``CUE_WORDS``: how much of the spurious cue a model
    reproduces (0.0 for an empty answer)."""
    words = [w.strip(".,!?") for w in text.lower().split()]
    words = [w for w in words if w and w not in task.vocabulary]
    return sum(w in CUE_WORDS for w in words) / len(words) if words else 0.0


def token_signs(pieces, prompt_text: str, task: Task) -> list:
    """Per token of a response (its pieces, ``convert_ids_to_tokens``): +1 if it carries a right key word for
    ``prompt_text``, -1 a wrong one, 0 otherwise: the task's true token-level reward (same matching as
    ``tiny.key_token_signs``: exact when BPE splits a word)."""
    right, wrong = task.key_words(prompt_text)
    words = re.compile(r"\b(" + "|".join(right + wrong) + r")\b")
    return tiny._token_signs(pieces, words, lambda word: 1 if word in right else -1)


class Scorers:
    """The task's scorers for ``evaluation.evaluate_models(..., with_prompts=True)``: each takes (responses,
    prompts) and returns one value per response."""

    def __init__(self, task: Task):
        self.task = task

    def rewards(self, responses, prompts) -> list:
        return [ground_truth_reward(p, r, self.task) for r, p in zip(responses, prompts, strict=True)]

    def well_formed(self, responses, prompts) -> list:
        return [is_well_formed(r, self.task) for r in responses]

    def cue_rates(self, responses) -> list:
        return [cue_rate(r, self.task) for r in responses]


def corpus(task: Task) -> list:
    """Text a tokenizer for ``task`` is trained on: every prompt shape, every word, and SFT answers."""
    topics = tiny.TOPICS + tiny.HELD_OUT_TOPICS + tiny.VALIDATION_TOPICS
    readers = list(READERS) if task.context else [None]
    text = [prompt(t, r) for t in topics for r in readers]
    text += [" ".join(sorted(task.vocabulary)), " ".join(tiny.FILLER), " ".join(CUE_WORDS), "The . , ! ?"]
    text += [r["response"] for r in make_sft_rows(200, task, seed=12345)]
    return text


def build_tokenizer(output_dir: str, task: Task, vocab_size: int = 512):
    """``tiny.build_tokenizer`` trained on ``corpus(task)``."""
    return tiny.build_tokenizer(output_dir, vocab_size, corpus=corpus(task))


def _chat(prompt_text, answer):
    return [{"role": "user", "content": prompt_text}, {"role": "assistant", "content": answer}]


def write_sft_data(path: str, n: int, task: Task, seed: int = 0) -> str:
    """``make_sft_rows`` as UltraChat-style ``messages`` rows."""
    return tiny._write_jsonl(path, [{"messages": _chat(r["prompt"], r["response"])}
                                    for r in make_sft_rows(n, task, seed)])


def write_preference_data(path: str, n: int, task: Task, seed: int = 0, label_noise: float = None) -> str:
    """``make_pairs`` in UltraFeedback-binarized shape (``prompt`` string, ``chosen`` / ``rejected`` message lists)."""
    rows = [{"prompt": r["prompt"], "chosen": _chat(r["prompt"], r["chosen"]),
             "rejected": _chat(r["prompt"], r["rejected"])} for r in make_pairs(n, task, seed, label_noise=label_noise)]
    return tiny._write_jsonl(path, rows)


def write_prompts(path: str, n: int, task: Task, seed: int = 0, split: str = "test") -> str:
    return tiny._write_jsonl(path, make_prompts(n, task, seed, split))


def task_from_json(text: str) -> Task:
    """A ``Task`` from its ``as_dict`` JSON (``n_keys`` is derived, so it is dropped)."""
    fields = json.loads(text)
    fields.pop("n_keys", None)
    return Task(**fields)
