"""The embedded style task (TKPO's controllable attribute): word sets, prompt swap, exact token truth, scorer,
parser, splits, writers and its tokenizer; and the key-word tokenizer left exactly as it was."""

import json

import pytest

from openrlhf_sepo import tiny
from openrlhf_sepo.scoring import tokenizer_fingerprint

# tokenizer_fingerprint(tiny.build_tokenizer(tmp_dir)) computed on the unmodified tiny.py, before the style task
# was added (same value on two fresh builds). Existing benchmark results depend on this vocabulary.
BUILD_TOKENIZER_FINGERPRINT = "d17d93152f9b476b"

PLAIN = tiny.STYLES["plain"]
FLORID = tiny.STYLES["florid"]


@pytest.fixture(scope="module")
def style_tokenizers(tmp_path_factory):
    """The default style tokenizer (every style word one token) and a 300-token one (BPE splits some)."""
    full = tiny.build_style_tokenizer(str(tmp_path_factory.mktemp("style_tok")))
    small = tiny.build_style_tokenizer(str(tmp_path_factory.mktemp("style_tok_300")), vocab_size=300)
    return {"full": full, "small": small}


def test_build_tokenizer_unchanged(tmp_path):
    assert tokenizer_fingerprint(tiny.build_tokenizer(str(tmp_path))) == BUILD_TOKENIZER_FINGERPRINT


def test_word_sets_are_disjoint_from_each_other_and_the_key_word_task():
    assert len(tiny.STYLES) >= 2
    all_style_words = [w for words in tiny.STYLES.values() for w in words]
    assert len(all_style_words) == len(set(all_style_words))
    for words in tiny.STYLES.values():
        assert 8 <= len(words) <= 12 and len(words) >= tiny.N_SLOTS
    topics = tiny.TOPICS + tiny.HELD_OUT_TOPICS + tiny.VALIDATION_TOPICS
    template = "write a short note about the in style my is".split()
    others = set(tiny.FILLER + tiny.GOOD_WORDS + tiny.BAD_WORDS + topics + template + list(tiny.STYLES))
    assert not set(all_style_words) & others
    assert not set(tiny.STYLES) & set(tiny.FILLER + tiny.GOOD_WORDS + tiny.BAD_WORDS + topics + template)
    assert set(tiny.STYLE_SWAP) == set(tiny.STYLES)
    assert all(tiny.STYLE_SWAP[s] != s and tiny.STYLE_SWAP[s] in tiny.STYLES for s in tiny.STYLES)


def test_swap_style_round_trip_and_errors():
    prompt = tiny.style_prompt("river", "plain")
    assert prompt == "Write a short note about the river in a plain style."
    swapped = tiny.swap_style(prompt, "plain")
    assert swapped == "Write a short note about the river in a florid style."
    assert tiny.swap_style(swapped, "florid") == prompt
    for row in tiny.make_style_prompts(20, seed=1):
        other = tiny.STYLE_SWAP[row["style"]]
        assert tiny.swap_style(row["prompt"], row["style"]) == tiny.style_prompt(
            row["prompt"].split()[6], other)
        assert tiny.swap_style(tiny.swap_style(row["prompt"], row["style"]), other) == row["prompt"]
    assert tiny.swap_style(prompt, "plain", {"plain": "terse"}).endswith("in a terse style.")
    with pytest.raises(ValueError, match="not in the swap map"):
        tiny.swap_style(prompt, "casual")
    with pytest.raises(ValueError, match="does not occur"):
        tiny.swap_style(prompt, "florid")
    with pytest.raises(ValueError, match="does not occur"):  # whole words only: "plainly" is not "plain"
        tiny.swap_style("Write it plainly.", "plain")
    with pytest.raises(ValueError, match="style must be one of"):
        tiny.style_prompt("river", "casual")


def _expected_signs(pieces, style):
    """Independent of the implementation: group pieces into words (a Metaspace piece starting with the marker
    starts a word), and give a style word's sign to every piece of it that holds one of its letters."""
    words, current = [], []
    for piece in pieces:
        if piece.startswith("\u2581") and current:
            words.append(current)
            current = []
        current.append(piece)
    words.append(current)
    signs = []
    for group in words:
        word = "".join(group).replace("\u2581", "").strip(".")
        sign = 0
        for s, ws in tiny.STYLES.items():
            if word in ws:
                sign = 1 if s == style else -1
        signs += [sign if p.replace("\u2581", "").strip(".") else 0 for p in group]
    return signs


def test_style_token_signs_exact_on_tokenized_answers(style_tokenizers):
    rows = tiny.make_style_pairs(40, seed=3)
    n_split = 0
    for name, tok in style_tokenizers.items():
        for row in rows:
            for answer, sign in ((row["chosen"], 1), (row["rejected"], -1)):
                pieces = tok.convert_ids_to_tokens(tok(answer, add_special_tokens=False)["input_ids"])
                assert tok.unk_token not in pieces
                signs = tiny.style_token_signs(pieces, row["style"])
                assert signs == _expected_signs(pieces, row["style"])
                assert set(signs) == {0, sign}
                # every slot word is covered, and the key-word truth sees nothing here
                covered = "".join(p for p, s in zip(pieces, signs) if s).replace("\u2581", " ")
                slot_words = tiny.parse_style_answer(answer)["style_words"]
                assert sorted(covered.replace(".", "").split()) == sorted(slot_words)
                assert tiny.key_token_signs(pieces) == [0] * len(pieces)
                if name == "small":
                    n_split += sum(len(p) < len(w) for p, w in _word_pieces(pieces) if w in tiny._STYLE_OF)
    assert n_split > 0, "the 300-token vocabulary should split some style words"


def _word_pieces(pieces):
    """(piece, its whole word without punctuation) for each piece."""
    out, text = [], "".join(pieces).replace("\u2581", " ")
    pos = 0
    for piece in pieces:
        lo = pos + (1 if piece.startswith("\u2581") else 0)
        pos += len(piece)
        start = text.rfind(" ", 0, lo) + 1
        end = text.find(" ", lo)
        out.append((piece.replace("\u2581", "").strip("."), text[start:end if end >= 0 else None].strip(".")))
    return out


def test_style_token_signs_split_word_by_hand(style_tokenizers):
    tok = style_tokenizers["small"]
    answer = "The river is calm. My note is lavish bare gilded luminous."
    pieces = tok.convert_ids_to_tokens(tok(answer, add_special_tokens=False)["input_ids"])
    assert "\u2581lavish" not in pieces  # split by this vocabulary
    signs = tiny.style_token_signs(pieces, "florid")
    by_word = {}
    for (piece, word), sign in zip(_word_pieces(pieces), signs):
        if piece:
            by_word.setdefault(word, set()).add(sign)
    assert by_word["lavish"] == {1} and by_word["gilded"] == {1} and by_word["luminous"] == {1}
    assert by_word["bare"] == {-1}
    assert all(by_word[w] == {0} for w in ("The", "river", "is", "calm", "My", "note"))
    assert tiny.style_token_signs(pieces, "plain") == [-s for s in signs]
    with pytest.raises(ValueError):
        tiny.style_token_signs(pieces, "casual")


def test_style_adherence_and_parse_by_hand():
    def answer(words, filler="calm water"):
        return f"The river is {filler}. My note is {' '.join(words)}."

    plain, florid = answer(PLAIN[:4]), answer(FLORID[:4])
    assert tiny.style_adherence(plain, "plain") == 1.0 and tiny.style_adherence(plain, "florid") == -1.0
    assert tiny.style_adherence(florid, "florid") == 1.0 and tiny.style_adherence(florid, "plain") == -1.0
    mixed = answer(PLAIN[:2] + FLORID[:2])
    assert tiny.style_adherence(mixed, "plain") == 0.0
    assert tiny.style_adherence(answer(PLAIN[:3] + FLORID[:1]), "plain") == 0.5
    assert tiny.style_adherence(answer(PLAIN[:3] + FLORID[:1]), "florid") == -0.5
    assert tiny.style_adherence(answer(PLAIN[:3] + ["accurate"]), "plain") == 0.75
    assert tiny.style_adherence("Bare, TERSE! crisp tidy neat spare.", "plain") == 1.0  # clipped, case-free
    assert tiny.style_adherence("The river is calm.", "plain") == 0.0
    with pytest.raises(ValueError):
        tiny.style_adherence(plain, "casual")

    assert tiny.parse_style_answer(plain) == {"topic": "river", "filler": ["calm", "water"], "style_words": PLAIN[:4]}
    assert tiny.is_well_formed_style("  " + mixed + "\n")  # a mixed-style answer is still well formed
    assert tiny.parse_answer(plain) is None  # the key-word parser does not take style words
    malformed = [
        answer(PLAIN[:3]),  # too few slot words
        answer(PLAIN[:5]),  # too many
        answer(PLAIN[:3] + ["accurate"]),  # a key word in a slot
        answer(PLAIN[:4], filler="calm dragon"),  # filler word not in FILLER
        answer(PLAIN[:4])[:-1],  # no closing period
        "My note is bare brief terse crisp.",  # no topic sentence
        "",
        "The river is calm. My note is bare brief terse crisp. Extra.",
    ]
    for text in malformed:
        assert tiny.parse_style_answer(text) is None and not tiny.is_well_formed_style(text), text


def test_rows_pairs_prompts_deterministic_and_correct():
    assert tiny.make_style_rows(30, seed=5) == tiny.make_style_rows(30, seed=5)
    assert tiny.make_style_rows(30, seed=5) != tiny.make_style_rows(30, seed=6)
    assert tiny.make_style_pairs(30, seed=5) == tiny.make_style_pairs(30, seed=5)
    assert tiny.make_style_prompts(30, 5, "validation") == tiny.make_style_prompts(30, 5, "validation")
    rows = tiny.make_style_rows(60, seed=0)
    assert {r["style"] for r in rows} == set(tiny.STYLES)
    for r in rows:
        parsed = tiny.parse_style_answer(r["response"])
        assert parsed is not None and len(set(parsed["style_words"])) == tiny.N_SLOTS
        assert r["prompt"] == tiny.style_prompt(parsed["topic"], r["style"])
        assert tiny.style_adherence(r["response"], r["style"]) == 1.0
    for p in tiny.make_style_pairs(60, seed=0):
        assert set(p) == {"prompt", "chosen", "rejected", "style"}
        chosen, rejected = tiny.parse_style_answer(p["chosen"]), tiny.parse_style_answer(p["rejected"])
        assert chosen["topic"] == rejected["topic"] in tiny.TOPICS
        assert p["prompt"] == tiny.style_prompt(chosen["topic"], p["style"])
        assert tiny.style_adherence(p["chosen"], p["style"]) == 1.0
        assert tiny.style_adherence(p["rejected"], p["style"]) == -1.0
        assert tiny.style_adherence(p["rejected"], tiny.STYLE_SWAP[p["style"]]) == 1.0


def test_splits_disjoint():
    topics = {}
    for split in ("train", "validation", "test"):
        rows = tiny.make_style_rows(200, seed=1, split=split)
        prompts = tiny.make_style_prompts(200, seed=1, split=split)
        topics[split] = {tiny.parse_style_answer(r["response"])["topic"] for r in rows}
        topics[split] |= {p["prompt"].split()[6] for p in prompts}
        assert topics[split] <= set(tiny.PROMPT_SPLITS[split])
    assert not topics["train"] & topics["validation"]
    assert not topics["train"] & topics["test"]
    assert not topics["validation"] & topics["test"]
    with pytest.raises(ValueError, match="split must be one of"):
        tiny.make_style_rows(2, split="dev")


def _read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_writers(tmp_path):
    sft = _read_jsonl(tiny.write_style_sft_data(str(tmp_path / "sft.jsonl"), n=10, seed=2))
    assert len(sft) == 10
    for row in sft:
        assert set(row) == {"messages", "prompt", "response", "style"}
        assert row["messages"] == [{"role": "user", "content": row["prompt"]},
                                   {"role": "assistant", "content": row["response"]}]
    assert [{k: r[k] for k in ("prompt", "style", "response")} for r in sft] == tiny.make_style_rows(10, 2)

    pairs = _read_jsonl(tiny.write_style_pairs(str(tmp_path / "sub" / "pairs.jsonl"), n=10, seed=2))
    for row, ref in zip(pairs, tiny.make_style_pairs(10, 2)):
        assert set(row) == {"prompt", "chosen", "rejected", "style"}
        user = {"role": "user", "content": ref["prompt"]}
        assert row["prompt"] == ref["prompt"] and row["style"] == ref["style"]
        assert row["chosen"] == [user, {"role": "assistant", "content": ref["chosen"]}]
        assert row["rejected"] == [user, {"role": "assistant", "content": ref["rejected"]}]

    prompts = _read_jsonl(tiny.write_style_prompts(str(tmp_path / "prompts.jsonl"), n=10, seed=2, split="validation"))
    assert prompts == tiny.make_style_prompts(10, 2, "validation")
    assert all(set(p) == {"prompt", "style"} for p in prompts)


def test_style_tokenizer_covers_both_tasks(style_tokenizers, tmp_path):
    tok = style_tokenizers["full"]
    key_tok = tiny.build_tokenizer(str(tmp_path))
    assert tok.chat_template == key_tok.chat_template == tiny.CHAT_TEMPLATE
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")
    assert sorted(tok.all_special_tokens) == sorted(key_tok.all_special_tokens)
    assert all(tok.convert_tokens_to_ids(t) == key_tok.convert_tokens_to_ids(t) for t in tiny.SPECIAL_TOKENS)
    assert tokenizer_fingerprint(tok) != BUILD_TOKENIZER_FINGERPRINT
    assert all(tok.convert_tokens_to_ids("\u2581" + w) != tok.unk_token_id for w in tiny._STYLE_OF)
    texts = [r["prompt"] + " " + r["response"] for r in tiny.make_style_rows(20, 4, "test")]
    texts += [tiny.swap_style(r["prompt"], r["style"]) for r in tiny.make_style_prompts(20, 4)]
    texts += [p["chosen"] for p in tiny.make_pairs(10, 4)]
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids and tok.decode(ids) == text
    chat = tok.apply_chat_template([{"role": "user", "content": texts[0]}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|assistant|>\n")
