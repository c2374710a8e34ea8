"""openrlhf_sepo.token_map: oracle-token scores moved onto another tokenizer's tokens by character overlap, on
hand-made spans (one-to-many, many-to-one, partial overlaps, whitespace, special tokens, identity) and on two real
tiny tokenizers; the per-response sum is preserved in every case."""

import pytest
import torch

from openrlhf_sepo import tiny
from openrlhf_sepo.token_map import MappingError, map_tokens, response_tokens

EOS = "</s>"


def dense(m):
    w = torch.zeros(m.n_src, m.n_dst, dtype=torch.float64)
    w.index_put_((m.src, m.dst), m.weight, accumulate=True)
    return w


def check(src_text, src, dst_text, dst, expected=None):
    """Map, check every source row sums to 1 and random scores keep their sum; compare the dense matrix."""
    m = map_tokens(src_text, src, dst_text, dst)
    w = dense(m)
    torch.testing.assert_close(w.sum(1), torch.ones(len(src), dtype=torch.float64))
    scores = torch.randn(len(src), generator=torch.Generator().manual_seed(0))
    mapped = m.apply(scores)
    assert mapped.dtype == torch.float32 and mapped.shape == (len(dst),)
    assert mapped.double().sum().item() == pytest.approx(scores.double().sum().item(), abs=1e-5)
    if expected is not None:
        torch.testing.assert_close(w, torch.tensor(expected, dtype=torch.float64))
    return m, w


def spans(text, pieces, special=()):
    """[(start, end, is_special)] of consecutive pieces that spell text."""
    out, at = [], 0
    for piece in pieces:
        assert text[at : at + len(piece)] == piece
        out.append((at, at + len(piece), piece in special))
        at += len(piece)
    assert at == len(text)
    return out


def test_identical_tokenizations_give_the_identity():
    text = "The river is calm." + EOS
    toks = spans(text, ["The", " river", " is", " calm", ".", EOS], {EOS})
    m, w = check(text, toks, text, toks)
    assert torch.equal(w, torch.eye(len(toks), dtype=torch.float64))
    # A byte-level BPE splitting one character into two tokens gives them one shared span: still the identity.
    text = "é!" + EOS
    shared = [(0, 1, False), (0, 1, False), (1, 2, False), (2, 6, True)]
    _, w = check(text, shared, text, shared)
    assert torch.equal(w, torch.eye(4, dtype=torch.float64))


def test_one_to_many_and_many_to_one():
    text = "river" + EOS
    one = spans(text, ["river", EOS], {EOS})
    many = spans(text, ["ri", "ver", EOS], {EOS})
    # One oracle token over two policy tokens: split 2:3 by characters.
    check(text, one, text, many, [[0.4, 0.6, 0], [0, 0, 1]])
    # Two oracle tokens inside one policy token: both go to it whole.
    m, _ = check(text, many, text, one, [[1, 0], [1, 0], [0, 1]])
    torch.testing.assert_close(m.apply(torch.tensor([1.5, -0.5, 2.0])), torch.tensor([1.0, 2.0]))


def test_partial_overlaps():
    text = "abcdefg" + EOS
    src = spans(text, ["abc", "defg", EOS], {EOS})
    dst = spans(text, ["ab", "cde", "fg", EOS], {EOS})
    check(text, src, text, dst, [[2 / 3, 1 / 3, 0, 0], [0, 2 / 4, 2 / 4, 0], [0, 0, 0, 1]])


def test_whitespace_on_one_side_only():
    # OpenRLHF appends " </s>" on one side (its template does not end with EOS): a lone whitespace token there.
    src_text = "hi there " + EOS
    src = spans(src_text, ["hi", " there", " ", EOS], {EOS})
    dst_text = "hi there" + EOS
    dst = spans(dst_text, ["hi", " th", "ere", EOS], {EOS})
    # " there" (6 chars) -> " th" 3/6, "ere" 3/6; the lone " " overlaps nothing: to the last token before it.
    check(src_text, src, dst_text, dst, [[1, 0, 0, 0], [0, 0.5, 0.5, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    # Leading whitespace only the target has: its whitespace token receives nothing; content aligns after it.
    dst_text = " hi there" + EOS
    dst = spans(dst_text, [" ", "hi", " there", EOS], {EOS})
    m, w = check(src_text, src, dst_text, dst)
    assert w[:, 0].sum() == 0 and w[0, 1] == 1 and w[1, 2] == 1
    # A character the source side leaves uncovered (a double space only one token spans): ignored, not lost.
    text = "a  b" + EOS
    src = [(0, 1, False), (2, 4, False), (4, 8, True)]  # the first space is in no token
    dst = spans(text, ["a", "  b", EOS], {EOS})
    check(text, src, text, dst, [[1, 0, 0], [0, 1, 0], [0, 0, 1]])


def test_special_tokens_match_by_position_from_the_end():
    # Source template: "x<|eot|> </s>" (end of turn, then OpenRLHF's " " + EOS); target: "x<|im_end|>".
    src_text = "Yes.<|eot|> " + EOS
    src = spans(src_text, ["Yes", ".", "<|eot|>", " ", EOS], {"<|eot|>", EOS})
    dst_text = "Yes.<|im_end|>"
    dst = spans(dst_text, ["Ye", "s.", "<|im_end|>"], {"<|im_end|>"})
    m, w = check(src_text, src, dst_text, dst)
    assert w[4, 2] == 1  # the final EOS -> the final EOS
    assert w[2, 2] == 1  # the left-over end-of-turn -> the earliest matched target special
    assert w[3, 1] == 1  # the whitespace between them -> the last text token
    scores = torch.tensor([0.0, 0.0, 0.0, 0.0, 5.0])
    assert m.apply(scores).tolist() == [0.0, 0.0, 5.0]
    # Equal counts: pairwise from the end; a target special left over gets 0.
    _, w = check(dst_text, dst, src_text, src)
    assert w[2, 4] == 1 and w[:, 2].sum() == 0


def test_texts_that_differ_are_refused():
    a = "The river." + EOS
    b = "The rivers." + EOS
    with pytest.raises(MappingError, match="differ .* at character 9"):
        map_tokens(a, spans(a, ["The", " river.", EOS], {EOS}), b, spans(b, ["The", " rivers.", EOS], {EOS}))


def test_response_tokens_and_two_real_tokenizers(tmp_path):
    t512 = tiny.build_tokenizer(str(tmp_path / "t512"), 512)
    t300 = tiny.build_tokenizer(str(tmp_path / "t300"), 300)
    prompt = "<|user|>\nWrite a short note about the river.</s>\n<|assistant|>\n"
    response = "The river is soft and calm. My note is clear kind.</s>\n"
    sides = {}
    for name, tok in (("512", t512), ("300", t300)):
        prompt_len = len(tok(prompt, add_special_tokens=False)["input_ids"])
        ids = tok((prompt + response).rstrip("\n"), add_special_tokens=False)["input_ids"]
        text, toks = response_tokens(tok, prompt, response, ids, prompt_len, 128)
        assert text == response.rstrip("\n") and len(toks) == len(ids) - prompt_len
        assert toks[-1] == (len(text) - len(EOS), len(text), True) and not any(s for *_, s in toks[:-1])
        # Each span is the characters of its token (Metaspace: a leading space is the token's own).
        pieces = tok.convert_ids_to_tokens(ids[prompt_len:-1])
        assert [text[a:b] for a, b, _ in toks[:-1]] == [p.replace("\u2581", " ") for p in pieces]
        sides[name] = text, toks, ids, prompt_len
        with pytest.raises(MappingError, match="truncated at --data.max_len"):
            short = prompt_len + 3
            truncated = tok((prompt + response).rstrip("\n"), add_special_tokens=False, max_length=short,
                            truncation=True)["input_ids"]
            truncated[-1] = tok.eos_token_id  # as RewardDataset forces it
            response_tokens(tok, prompt, response, truncated, prompt_len, short)
    m, w = check(*sides["300"][:2], *sides["512"][:2])
    assert m.n_src != m.n_dst  # two different BPEs ...
    _, w_same = check(*sides["512"][:2], *sides["512"][:2])
    assert torch.equal(w_same, torch.eye(m.n_dst, dtype=torch.float64))  # ... and the identity on one
    with pytest.raises(RuntimeError, match="did not give RewardDataset's ids"):
        text, toks, ids, prompt_len = sides["512"]
        response_tokens(t512, prompt, response, ids[:-2] + ids[-1:], prompt_len, 128)
