"""Tiny, offline building blocks for tests, benchmarks and the demo: nothing here is downloaded.

- ``build_tokenizer(dir)``: a BPE tokenizer trained locally with ``tokenizers`` on the task's own text,
  wrapped as ``PreTrainedTokenizerFast`` with Llama-style special tokens and a chat template.
- ``build_model(dir, tokenizer_dir)``: a randomly initialised Llama (hidden 64, 2 layers by default),
  saved as an HF checkpoint next to its tokenizer, loadable by OpenRLHF's ``Actor``.
- The *key-word task*: prompts ask for a short note on a topic; every response is filler plus a closing
  span of *good* or *bad* key words. The tokens that decide a preference are known exactly
  (``key_token_mask``, ``key_token_signs``), ``ground_truth_reward(text)`` scores any generated response and ``parse_answer`` /
  ``is_well_formed`` check that it follows the answer template (``ground_truth_rewards`` / ``well_formed``: the
  same per response, the task's scorers for ``evaluation.evaluate_models``). Three pair variants (``TASK_VARIANTS``):
  ``independent`` (the default: chosen and rejected draw their own filler and length, as real pairs do),
  ``shared`` (both share every token but the key words: the adversarial case for token selection) and
  ``mixed`` (independent, but chosen holds one bad key word and rejected one good one), each optionally with
  label noise (a fraction of pairs flipped).
- The *style task* (controllable generation, for TKPO): a prompt asks for the note in one of ``STYLES``
  ("... in a plain style."), the answer has the same template with its ``N_SLOTS`` closing words drawn from that
  style's word set (the sets are disjoint from each other and from every other word of both tasks).
  ``swap_style`` gives the counterfactual prompt, ``style_token_signs`` the true per-token signs,
  ``style_adherence`` scores any answer, ``parse_style_answer`` / ``is_well_formed_style`` check its format;
  ``build_style_tokenizer`` covers both tasks (``build_tokenizer``'s vocabulary is left as it was).
- ``write_sft_data`` (UltraChat-style message lists), ``write_preference_data`` (UltraFeedback-binarized
  shape or plain strings), ``write_ranked_lists`` (a prompt, K answers, their ground-truth scores), as JSONL that
  OpenRLHF's ``--data.dataset`` reads.
"""

import json
import os
import random
import re

GOOD_WORDS = ["accurate", "helpful", "clear", "honest", "careful", "precise", "kind", "thorough"]
BAD_WORDS = ["wrong", "rude", "vague", "careless", "sloppy", "harmful", "lazy", "misleading"]
TOPICS = [
    "river", "garden", "library", "mountain", "harbor", "market", "forest", "castle",
    "bridge", "village", "desert", "island", "station", "museum", "orchard", "valley",
]
# Prompts of these topics never appear in training data: the held-out test prompts, and (disjoint from them)
# the validation prompts that hyperparameters are chosen on.
HELD_OUT_TOPICS = ["lake", "tower", "farm", "canyon", "palace", "meadow"]
VALIDATION_TOPICS = ["beach", "temple", "field", "cave", "road", "hill"]
PROMPT_SPLITS = {"test": HELD_OUT_TOPICS, "validation": VALIDATION_TOPICS, "train": TOPICS}
FILLER = [
    "the", "a", "morning", "light", "was", "soft", "and", "people", "walked", "slowly", "near", "old",
    "stone", "walls", "while", "birds", "sang", "over", "quiet", "streets", "in", "of", "it", "is",
    "this", "note", "answer", "here", "with", "some", "long", "days", "water", "trees", "wind", "calm",
]
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]
# Each turn ends with the EOS token, so OpenRLHF's "append EOS unless present" keeps responses intact.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
N_SLOTS = 4  # with 3-5 filler words, key tokens are about 30% of a response: SePO's default k
TASK_VARIANTS = ("independent", "shared", "mixed")


def _prompt(topic: str) -> str:
    return f"Write a short note about the {topic}."


def _response(rng: random.Random, topic: str, slot_words: list, filler_words: list = None) -> str:
    """Filler, then the key span: "The {topic} is <filler>. My note is <w1> <w2> <w3> <w4>."

    Same rng state -> same filler. The key span closes the response so that a chosen and a rejected answer
    share every token before it: the tokens that decide the preference are exactly the slot words.
    ``filler_words``: the filler vocabulary (default ``FILLER``; ``OOD_SLICES`` uses halves of it).
    """
    filler = " ".join(rng.choice(filler_words or FILLER) for _ in range(rng.randint(3, 5)))
    return f"The {topic} is {filler}. My note is " + " ".join(slot_words) + "."


def ground_truth_reward(text: str) -> float:
    """Embedded task's truth: (good key words - bad key words) / N_SLOTS, in [-1, 1] for a well-formed answer."""
    words = [w.strip(".,!?") for w in text.lower().split()]
    good = sum(w in GOOD_WORDS for w in words)
    bad = sum(w in BAD_WORDS for w in words)
    return max(-1.0, min(1.0, (good - bad) / N_SLOTS))


_KEY_WORD = re.compile(r"\b(" + "|".join(GOOD_WORDS + BAD_WORDS) + r")\b")


def key_token_signs(pieces) -> list:
    """Per token of a response (its pieces, ``convert_ids_to_tokens``): +1 if it carries a planted good key word, -1
    a bad one, 0 otherwise: the task's true token-level reward.

    The pieces are joined back into text (Metaspace "\u2581" -> space), every key word is found on word
    boundaries (filler never contains one, so each occurrence is a planted slot word), and a token takes a key
    word's sign when its characters, its leading space aside, overlap that word. Exact even when BPE splits a key
    word; a token overlapping both a good and a bad word (never seen with this tokenizer) counts as bad.
    """
    return _token_signs(pieces, _KEY_WORD, lambda word: 1 if word in GOOD_WORDS else -1)


def _token_signs(pieces, words, sign_of) -> list:
    """Per piece, ``sign_of(word)`` of the match of the regex ``words`` its characters (leading "\u2581" aside)
    overlap in the text the pieces join back into, the smallest when several do, 0 when none does."""
    starts, text = [], ""
    for piece in pieces:
        starts.append(len(text))
        text += piece.replace("\u2581", " ")
    spans = [(m.span(), sign_of(m.group(0))) for m in words.finditer(text)]
    signs = []
    for start, piece in zip(starts, pieces):
        lo = start + (1 if piece.startswith("\u2581") else 0)
        hi = start + len(piece)
        hits = [sign for (a, b), sign in spans if lo < b and a < hi]
        signs.append(min(hits) if hits else 0)
    return signs


def key_token_mask(pieces) -> list:
    """Which tokens of a response carry a planted key word (good or bad): ``key_token_signs(pieces) != 0``."""
    return [sign != 0 for sign in key_token_signs(pieces)]


# Out-of-distribution slices: the oracle's pairs come from one (topics and filler words), the policy's from the
# other; the key words, the template and the held-out test prompts are shared.
OOD_SLICES = {"oracle": (TOPICS[:8], FILLER[:18]), "policy": (TOPICS[8:], FILLER[18:])}


def make_pairs(n: int, seed: int = 0, variant: str = "independent", label_noise: float = 0.0, ood_slice: str = None):
    """n preference rows ``{"prompt", "chosen", "rejected"}``: chosen has all slots good, rejected all bad (``mixed``:
    chosen one bad slot, rejected one good slot).

    variant ``independent``: chosen and rejected draw their own filler (words and length), so the pair
    differs throughout, as real preference pairs do; ``shared``: the same filler, so the pair differs only in
    its key span; ``mixed``: as ``independent``, but the chosen answer has one bad key word (3 good) and the
    rejected one good key word (3 bad), at random slots, as real preferred answers are better, not flawless: the
    case where token-level credit matters, since imitating the chosen answer also imitates its bad word.
    ``label_noise`` in [0, 1]: exactly ``round(label_noise * n)`` rows, drawn from the seed, have
    chosen and rejected swapped (noisy preference labels). ``ood_slice`` (``OOD_SLICES``: ``oracle`` or ``policy``)
    draws topics and filler words from that slice only (default: all). Deterministic in its arguments.
    """
    if ood_slice is not None and ood_slice not in OOD_SLICES:
        raise ValueError(f"ood_slice must be one of {sorted(OOD_SLICES)}, got {ood_slice!r}")
    topics, filler_words = OOD_SLICES[ood_slice] if ood_slice else (TOPICS, None)
    if variant not in TASK_VARIANTS:
        raise ValueError(f"variant must be one of {TASK_VARIANTS}, got {variant!r}")
    if not 0.0 <= label_noise <= 1.0:
        raise ValueError(f"label_noise must be in [0, 1], got {label_noise}")
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        topic = rng.choice(topics)
        filler_seed = rng.randrange(1 << 30)
        good = rng.sample(GOOD_WORDS, N_SLOTS)
        bad = rng.sample(BAD_WORDS, N_SLOTS)
        if variant == "mixed":  # swap one slot of each side (an extra draw, so the other variants keep their rows)
            i, j = rng.randrange(N_SLOTS), rng.randrange(N_SLOTS)
            good[i], bad[j] = bad[j], good[i]
        rejected_seed = filler_seed if variant == "shared" else rng.randrange(1 << 30)
        chosen = _response(random.Random(filler_seed), topic, good, filler_words)
        rejected = _response(random.Random(rejected_seed), topic, bad, filler_words)
        rows.append({"prompt": _prompt(topic), "chosen": chosen, "rejected": rejected})
    # A separate stream, so that the noise-free rows are the same rows whatever the noise level.
    for i in random.Random(f"label-noise-{seed}").sample(range(n), round(label_noise * n)):
        rows[i]["chosen"], rows[i]["rejected"] = rows[i]["rejected"], rows[i]["chosen"]
    return rows


def make_ranked_lists(n: int, k: int = 4, seed: int = 0):
    """n ranked-list rows ``{"prompt", "responses": [k answers], "scores": [k floats]}``: each answer has its own
    filler and a random number of good key words (the rest bad), scored by ``ground_truth_reward``, so ties occur
    (two answers with as many good words). Deterministic in (n, k, seed)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        topic = rng.choice(TOPICS)
        responses = []
        for _ in range(k):
            n_good = rng.randint(0, N_SLOTS)
            words = rng.sample(GOOD_WORDS, n_good) + rng.sample(BAD_WORDS, N_SLOTS - n_good)
            rng.shuffle(words)
            responses.append(_response(rng, topic, words))
        rows.append({"prompt": _prompt(topic), "responses": responses,
                     "scores": [ground_truth_reward(r) for r in responses]})
    return rows


_ANSWER = re.compile(r"The ([a-z]+) is ([a-z]+(?: [a-z]+)*)\. My note is ([a-z]+(?: [a-z]+)*)\.")


def parse_answer(text: str):
    """The parts of an answer that follows the task's template, else None.

    Template (what every SFT and preference response is): ``The <topic> is <filler>. My note is <k1> <k2> <k3>
    <k4>.``, with one or more filler words from ``FILLER`` and exactly ``N_SLOTS`` key words from ``GOOD_WORDS``
    or ``BAD_WORDS``; surrounding whitespace is ignored. Returns ``{"topic", "filler": [...], "key_words": [...]}``.
    """
    parts = _parse_template(text, lambda w: w in GOOD_WORDS or w in BAD_WORDS)
    return None if parts is None else dict(zip(("topic", "filler", "key_words"), parts))


def _parse_template(text: str, is_slot_word):
    """(topic, filler words, slot words) of an answer that follows the template with ``N_SLOTS`` slot words, each
    accepted by ``is_slot_word``, and filler words from ``FILLER``; else None."""
    match = _ANSWER.fullmatch(text.strip())
    if match is None:
        return None
    topic, filler, slot_words = match.group(1), match.group(2).split(), match.group(3).split()
    if len(slot_words) != N_SLOTS or not all(is_slot_word(w) for w in slot_words):
        return None
    if not all(w in FILLER for w in filler):
        return None
    return topic, filler, slot_words


def is_well_formed(text: str) -> bool:
    """True iff ``parse_answer(text)`` parses: the answer follows the template (format validity)."""
    return parse_answer(text) is not None


def ground_truth_rewards(responses) -> list:
    """``ground_truth_reward`` per response: the task's ``reward_fn`` for ``evaluation.evaluate_models``."""
    return [ground_truth_reward(r) for r in responses]


def well_formed(responses) -> list:
    """``is_well_formed`` per response: the task's ``format_fn`` for ``evaluation.evaluate_models``."""
    return [is_well_formed(r) for r in responses]


def make_prompts(n: int, seed: int = 0, split: str = "test"):
    """n prompts ``{"prompt": ...}`` on the topics of ``split``: ``test`` (HELD_OUT_TOPICS) and ``validation``
    (VALIDATION_TOPICS) are disjoint from each other and from every training row's topics; ``train`` (TOPICS)."""
    if split not in PROMPT_SPLITS:
        raise ValueError(f"split must be one of {sorted(PROMPT_SPLITS)}, got {split!r}")
    rng = random.Random(seed)
    return [{"prompt": _prompt(rng.choice(PROMPT_SPLITS[split]))} for _ in range(n)]


def make_sft_rows(n: int, seed: int = 0):
    """n instruction rows whose answers mix good and bad key words at random (a neutral reference)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        topic = rng.choice(TOPICS)
        words = [rng.choice(GOOD_WORDS if rng.random() < 0.5 else BAD_WORDS) for _ in range(N_SLOTS)]
        rows.append({"prompt": _prompt(topic), "response": _response(rng, topic, words)})
    return rows


def _write_jsonl(path: str, rows) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def write_sft_data(path: str, n: int = 64, seed: int = 0) -> str:
    """UltraChat-style rows: ``{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}``."""
    rows = [
        {"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]}
        for r in make_sft_rows(n, seed)
    ]
    return _write_jsonl(path, rows)


def write_preference_data(
    path: str, n: int = 64, seed: int = 0, shape: str = "ultrafeedback", variant: str = "independent",
    label_noise: float = 0.0, ood_slice: str = None,
) -> str:
    """``make_pairs(n, seed, variant, label_noise, ood_slice)`` rows in one of two shapes.

    ``ultrafeedback`` (UltraFeedback-binarized): ``prompt`` string; ``chosen`` and ``rejected`` message lists
    ``[user, assistant]`` (use ``--data.apply_chat_template``, no ``--data.prompt_key``).
    ``plain``: ``prompt``, ``chosen``, ``rejected`` strings (use ``--data.prompt_key prompt``).
    """
    rows = []
    for r in make_pairs(n, seed, variant, label_noise, ood_slice):
        if shape == "plain":
            rows.append(r)
        elif shape == "ultrafeedback":
            user = {"role": "user", "content": r["prompt"]}
            rows.append(
                {
                    "prompt": r["prompt"],
                    "chosen": [user, {"role": "assistant", "content": r["chosen"]}],
                    "rejected": [user, {"role": "assistant", "content": r["rejected"]}],
                }
            )
        else:
            raise ValueError(f"shape must be 'ultrafeedback' or 'plain', got {shape!r}")
    return _write_jsonl(path, rows)


def write_ranked_lists(path: str, n: int = 32, k: int = 4, seed: int = 0) -> str:
    """``make_ranked_lists(n, k, seed)`` as JSONL (use ``--data.prompt_key prompt``, with or without
    ``--data.apply_chat_template``: plain strings are wrapped as user / assistant messages)."""
    return _write_jsonl(path, make_ranked_lists(n, k, seed))


# ---- The style task (controllable generation: TKPO's negative is the same model under the swapped style) ----

# Disjoint from each other, from the style names, and from every word of the key-word task (FILLER, GOOD_WORDS,
# BAD_WORDS, all topics, the templates), so that each slot word names exactly one style.
STYLES = {
    "plain": ["bare", "brief", "terse", "crisp", "tidy", "basic", "brisk", "neat", "spare", "dry"],
    "florid": ["radiant", "luminous", "gilded", "velvet", "splendid", "glorious", "lavish", "majestic",
               "opulent", "shimmering"],
}
STYLE_SWAP = {"plain": "florid", "florid": "plain"}
_STYLE_OF = {word: style for style, words in STYLES.items() for word in words}
_STYLE_WORD = re.compile(r"\b(" + "|".join(_STYLE_OF) + r")\b")


def _check_style(style: str) -> None:
    if style not in STYLES:
        raise ValueError(f"style must be one of {sorted(STYLES)}, got {style!r}")


def style_prompt(topic: str, style: str) -> str:
    """``Write a short note about the {topic} in a {style} style.``"""
    _check_style(style)
    return f"Write a short note about the {topic} in a {style} style."


def swap_style(prompt: str, style: str, swap_map: dict = STYLE_SWAP) -> str:
    """The counterfactual prompt: ``prompt`` with the whole word ``style`` replaced by ``swap_map[style]``.

    Raises ValueError if ``style`` is not a key of ``swap_map`` or does not occur in ``prompt`` as a whole word.
    """
    if style not in swap_map:
        raise ValueError(f"style {style!r} is not in the swap map (keys: {sorted(swap_map)})")
    swapped, count = re.subn(r"\b" + re.escape(style) + r"\b", swap_map[style], prompt)
    if count == 0:
        raise ValueError(f"style {style!r} does not occur as a word in the prompt {prompt!r}")
    return swapped


def style_token_signs(pieces, style: str) -> list:
    """Per token of a response (its pieces, ``convert_ids_to_tokens``): +1 if it carries a word of the requested
    ``style``, -1 a word of another style, 0 otherwise: the style task's true token-level reward.

    Same method as ``key_token_signs``: pieces joined back into text (Metaspace "\u2581" -> space), style words found
    on word boundaries, a token takes a word's sign when its characters (leading space aside) overlap the word, so
    it is exact when BPE splits a word; a token overlapping words of both signs counts as -1.
    """
    _check_style(style)
    return _token_signs(pieces, _STYLE_WORD, lambda word: 1 if _STYLE_OF[word] == style else -1)


def style_adherence(text: str, style: str) -> float:
    """Style task's truth for any answer: (words of ``style`` - words of other styles) / N_SLOTS, clipped to
    [-1, 1]; +1 for a well-formed answer in the requested style, -1 for one in another style."""
    _check_style(style)
    words = [w.strip(".,!?") for w in text.lower().split()]
    own = sum(_STYLE_OF.get(w) == style for w in words)
    other = sum(w in _STYLE_OF and _STYLE_OF[w] != style for w in words)
    return max(-1.0, min(1.0, (own - other) / N_SLOTS))


def parse_style_answer(text: str):
    """The parts of a style-task answer, else None: ``The <topic> is <filler>. My note is <s1> <s2> <s3> <s4>.``
    with filler words from ``FILLER`` and exactly ``N_SLOTS`` slot words, each from some style's word set (not
    necessarily the same one). Returns ``{"topic", "filler": [...], "style_words": [...]}``."""
    parts = _parse_template(text, lambda w: w in _STYLE_OF)
    return None if parts is None else dict(zip(("topic", "filler", "style_words"), parts))


def is_well_formed_style(text: str) -> bool:
    """True iff ``parse_style_answer(text)`` parses (format validity of a style-task answer)."""
    return parse_style_answer(text) is not None


def _split_topics(split: str) -> list:
    if split not in PROMPT_SPLITS:
        raise ValueError(f"split must be one of {sorted(PROMPT_SPLITS)}, got {split!r}")
    return PROMPT_SPLITS[split]


def make_style_rows(n: int, seed: int = 0, split: str = "train"):
    """n rows ``{"prompt", "style", "response"}``: a random topic of ``split`` (as ``make_prompts``) and style, the
    answer's ``N_SLOTS`` slot words drawn without replacement from that style's set. Deterministic in its args."""
    topics = _split_topics(split)
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        topic, style = rng.choice(topics), rng.choice(list(STYLES))
        response = _response(rng, topic, rng.sample(STYLES[style], N_SLOTS))
        rows.append({"prompt": style_prompt(topic, style), "style": style, "response": response})
    return rows


def make_style_pairs(n: int, seed: int = 0):
    """n DPO rows ``{"prompt", "chosen", "rejected", "style"}`` on training topics: chosen answers in the
    requested style, rejected answers the same topic in ``STYLE_SWAP[style]``, each with its own filler."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        topic, style = rng.choice(TOPICS), rng.choice(list(STYLES))
        chosen_seed, rejected_seed = rng.randrange(1 << 30), rng.randrange(1 << 30)
        chosen_words = rng.sample(STYLES[style], N_SLOTS)
        rejected_words = rng.sample(STYLES[STYLE_SWAP[style]], N_SLOTS)
        rows.append({
            "prompt": style_prompt(topic, style),
            "chosen": _response(random.Random(chosen_seed), topic, chosen_words),
            "rejected": _response(random.Random(rejected_seed), topic, rejected_words),
            "style": style,
        })
    return rows


def make_style_prompts(n: int, seed: int = 0, split: str = "test"):
    """n evaluation rows ``{"prompt", "style"}`` on the topics of ``split`` (same splits as ``make_prompts``)."""
    topics = _split_topics(split)
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        topic, style = rng.choice(topics), rng.choice(list(STYLES))
        rows.append({"prompt": style_prompt(topic, style), "style": style})
    return rows


def write_style_sft_data(path: str, n: int = 64, seed: int = 0) -> str:
    """``make_style_rows(n, seed)`` with ``messages`` [user, assistant] (OpenRLHF's SFT dataset) beside the
    ``prompt``, ``response`` and ``style`` columns (a TKPO dataset)."""
    rows = [
        {"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}],
         **r}
        for r in make_style_rows(n, seed)
    ]
    return _write_jsonl(path, rows)


def write_style_pairs(path: str, n: int = 64, seed: int = 0) -> str:
    """``make_style_pairs(n, seed)`` in the UltraFeedback shape of ``write_preference_data``: ``prompt`` string,
    ``chosen`` / ``rejected`` message lists [user, assistant], plus ``style``."""
    rows = []
    for r in make_style_pairs(n, seed):
        user = {"role": "user", "content": r["prompt"]}
        rows.append({
            "prompt": r["prompt"],
            "chosen": [user, {"role": "assistant", "content": r["chosen"]}],
            "rejected": [user, {"role": "assistant", "content": r["rejected"]}],
            "style": r["style"],
        })
    return _write_jsonl(path, rows)


def write_style_prompts(path: str, n: int = 64, seed: int = 0, split: str = "test") -> str:
    """``make_style_prompts(n, seed, split)`` as JSONL (``--data.prompt_key prompt``)."""
    return _write_jsonl(path, make_style_prompts(n, seed, split))


def _style_corpus():
    topics = TOPICS + HELD_OUT_TOPICS + VALIDATION_TOPICS
    text = [style_prompt(t, s) for t in topics for s in STYLES]
    text += [" ".join(words) for words in STYLES.values()]
    text += [r["response"] for r in make_style_rows(200, seed=12345)]
    return text


def _corpus():
    text = [_prompt(t) for t in TOPICS + HELD_OUT_TOPICS + VALIDATION_TOPICS]
    text += [" ".join(GOOD_WORDS), " ".join(BAD_WORDS), " ".join(FILLER), "The . , ! ?"]
    text += [r["response"] for r in make_sft_rows(200, seed=12345)]
    return text


def build_tokenizer(output_dir: str, vocab_size: int = 512, corpus: list = None):
    """Train a Metaspace BPE tokenizer on the task's text (``corpus``, default the key-word task's); save it
    (with chat template) to output_dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.decoder = decoders.Metaspace(prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=["\n"], show_progress=False
    )
    tok.train_from_iterator(_corpus() if corpus is None else corpus, trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=SPECIAL_TOKENS[4:],
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(output_dir)
    return hf_tok


def build_style_tokenizer(output_dir: str, vocab_size: int = 512):
    """``build_tokenizer`` trained on the key-word task's text plus the style task's (prompts in every style,
    answers): same special tokens and chat template. A separate vocabulary, so that ``build_tokenizer``'s stays
    exactly as the existing benchmark results were computed with."""
    return build_tokenizer(output_dir, vocab_size, corpus=_corpus() + _style_corpus())


def build_model(
    output_dir: str,
    tokenizer_dir: str = None,
    hidden_size: int = 64,
    num_layers: int = 2,
    vocab_size: int = None,
    seed: int = 0,
):
    """A randomly initialised tiny Llama saved with its tokenizer. ``vocab_size`` defaults to the tokenizer's;
    a larger one pads the embedding (the benchmarks use this to make the log-softmax cost realistic)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if tokenizer_dir is None:
        tokenizer = build_tokenizer(output_dir)
    else:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        tokenizer.save_pretrained(output_dir)
    config = LlamaConfig(
        vocab_size=max(vocab_size or 0, len(tokenizer)),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(output_dir)
    return output_dir


def main(argv=None):
    """``python -m openrlhf_sepo.tiny OUT_DIR``: tokenizer, base model and data for a tiny CPU run."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("output_dir")
    parser.add_argument("--n_sft", type=int, default=64)
    parser.add_argument("--n_pairs", type=int, default=64)
    parser.add_argument("--hidden_size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = args.output_dir
    build_tokenizer(os.path.join(out, "tokenizer"))
    build_model(os.path.join(out, "base"), os.path.join(out, "tokenizer"), args.hidden_size, seed=args.seed)
    write_sft_data(os.path.join(out, "sft.jsonl"), args.n_sft, args.seed)
    write_preference_data(os.path.join(out, "pairs.jsonl"), args.n_pairs, args.seed + 1)
    write_preference_data(os.path.join(out, "pairs_plain.jsonl"), args.n_pairs, args.seed + 1, shape="plain")
    print(f"tiny model, tokenizer and data written to {out}")


if __name__ == "__main__":
    main()
