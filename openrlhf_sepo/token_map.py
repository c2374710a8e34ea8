"""Token scores of one tokenizer moved onto another tokenizer's tokens of the same response text
(``score_tokens --policy.tokenizer``: an oracle / reference of one family scoring for a policy of another).

Each side is a response text and its tokens, given as character spans ``(start, end)`` into that text plus a
``special`` flag (``response_tokens`` gets them from a fast tokenizer's ``return_offsets_mapping`` on the exact
string OpenRLHF's ``RewardDataset`` tokenized: no decoding, no re-spacing). The mapping rule (``map_tokens``):

1. Alignment. Each side's text minus the characters of its special tokens is its *content*. The two contents must
   be equal once outer whitespace is stripped (else ``MappingError``: the row is skipped as ``mapping_failed``).
   Content character c of one side and c of the other are the same character once both are shifted by their
   leading whitespace; every non-special token is an interval of those aligned positions.
2. Text tokens. A source (oracle) text token's score is split among the target (policy) text tokens whose
   intervals overlap it, in proportion to the overlapping characters: weight(i, j) = overlap(i, j) / sum_j'
   overlap(i, j'). Characters that only one side covers (whitespace the other side dropped or left outside its
   tokens) are therefore ignored, not lost.
3. A source text token that overlaps no target text token (whitespace-only, zero-width, or whitespace in the
   margin that only it covers) gives its whole score to the last target text token starting at or before its
   position (else the first target text token; else the target's final special token).
4. Special tokens are matched by position from the end: the final token of each side (the EOS OpenRLHF forces)
   to the other's final token, the one before it to the one before, ...; a source special left over (the source
   template has more of them) gives its score to the earliest matched target special. A target special left
   over gets 0.
5. Identical token intervals and special flags on both sides: the identity (also when a byte-level BPE splits a
   character so that two tokens share one span).

Every source token's weights sum to 1 (float64), so each response's total score is preserved exactly up to float
error; target tokens that no source token reaches get 0.
"""

import bisect
from typing import NamedTuple

import torch


class MappingError(ValueError):
    """The source tokens cannot be mapped onto the target tokens (the texts differ, or a response was truncated)."""


class TokenMap(NamedTuple):
    """A sparse row-stochastic [n_src, n_dst] matrix: score of source token src[k] * weight[k] goes to dst[k]."""

    n_src: int
    n_dst: int
    src: torch.Tensor  # long
    dst: torch.Tensor  # long
    weight: torch.Tensor  # float64

    def apply(self, scores: torch.Tensor) -> torch.Tensor:
        """[n_src] scores -> [n_dst] fp32 scores, sum preserved (accumulated in float64)."""
        if scores.shape != (self.n_src,):
            raise ValueError(f"expected {self.n_src} source scores, got shape {tuple(scores.shape)}")
        out = torch.zeros(self.n_dst, dtype=torch.float64)
        out.index_add_(0, self.dst, scores.double()[self.src] * self.weight)
        return out.float()


def _aligned(text, tokens):
    """-> (content, [(lo, hi)] per token in aligned coordinates, shift): specials' characters removed."""
    keep = [True] * len(text)
    for start, end, special in tokens:
        end = min(end, len(text))
        if special and end > start:
            keep[start:end] = [False] * (end - start)
    cursor, n = [0], 0  # cursor[c]: kept characters before text index c
    for k in keep:
        n += k
        cursor.append(n)
    content = "".join(ch for ch, k in zip(text, keep) if k)
    shift = len(content) - len(content.lstrip())
    spans = [(cursor[min(s, len(text))] - shift, cursor[min(e, len(text))] - shift) for s, e, _ in tokens]
    return content, spans, shift


def map_tokens(src_text, src_tokens, dst_text, dst_tokens) -> TokenMap:
    """The mapping of the module docstring. ``*_tokens``: [(start, end, special)] into ``*_text``, in order."""
    if not dst_tokens:
        raise MappingError("the target response has no tokens")
    src_content, src_spans, _ = _aligned(src_text, src_tokens)
    dst_content, dst_spans, _ = _aligned(dst_text, dst_tokens)
    if src_content.strip() != dst_content.strip():
        a, b = src_content.strip(), dst_content.strip()
        at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        raise MappingError(f"response texts differ after removing special tokens and outer whitespace, at "
                           f"character {at}: {a[max(0, at - 20):at + 20]!r} vs {b[max(0, at - 20):at + 20]!r}")
    src_special = [bool(t[2]) for t in src_tokens]
    dst_special = [bool(t[2]) for t in dst_tokens]
    if src_spans == dst_spans and src_special == dst_special:
        idx = torch.arange(len(src_tokens))
        ones = torch.ones(len(src_tokens), dtype=torch.float64)
        return TokenMap(len(src_tokens), len(dst_tokens), idx, idx.clone(), ones)

    src_idx, dst_idx, weights = [], [], []
    # Specials, matched from the end.
    s_sp = [i for i, sp in enumerate(src_special) if sp]
    d_sp = [j for j, sp in enumerate(dst_special) if sp]
    m = min(len(s_sp), len(d_sp))
    for k in range(1, m + 1):
        src_idx.append(s_sp[-k]), dst_idx.append(d_sp[-k]), weights.append(1.0)
    for i in s_sp[: len(s_sp) - m]:
        src_idx.append(i), dst_idx.append(d_sp[-m] if m else len(dst_tokens) - 1), weights.append(1.0)

    # Text tokens, by overlapping aligned characters.
    d_text = [j for j, sp in enumerate(dst_special) if not sp]
    d_lo = [dst_spans[j][0] for j in d_text]
    d_hi = [dst_spans[j][1] for j in d_text]
    monotone = all(d_lo[k] <= d_lo[k + 1] and d_hi[k] <= d_hi[k + 1] for k in range(len(d_text) - 1))
    fallback_end = d_sp[-1] if d_sp else len(dst_tokens) - 1
    for i, sp in enumerate(src_special):
        if sp:
            continue
        lo, hi = src_spans[i]
        if monotone:  # candidates: ends > lo and starts < hi, a contiguous run when both are sorted
            first = bisect.bisect_right(d_hi, lo)
            last = bisect.bisect_left(d_lo, hi)
            candidates = range(first, last)
        else:
            candidates = range(len(d_text))
        overlaps = [(k, min(hi, d_hi[k]) - max(lo, d_lo[k])) for k in candidates]
        overlaps = [(k, o) for k, o in overlaps if o > 0]
        total = sum(o for _, o in overlaps)
        if total:
            for k, o in overlaps:
                src_idx.append(i), dst_idx.append(d_text[k]), weights.append(o / total)
        else:  # rule 3
            if d_text:
                k = max(bisect.bisect_right(d_lo, lo) - 1, 0) if monotone else \
                    max((k for k in range(len(d_text)) if d_lo[k] <= lo), default=0)
                target = d_text[k]
            else:
                target = fallback_end
            src_idx.append(i), dst_idx.append(target), weights.append(1.0)
    return TokenMap(len(src_tokens), len(dst_tokens), torch.tensor(src_idx, dtype=torch.long),
                    torch.tensor(dst_idx, dtype=torch.long), torch.tensor(weights, dtype=torch.float64))


def special_ids(tokenizer) -> set:
    """Ids the mapping treats as special: the tokenizer's special tokens and its added tokens marked special."""
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False))
    return ids


def response_tokens(tokenizer, prompt, response, ids, prompt_len, max_len, specials=None):
    """-> (response text, [(start, end, special)] per response token ids[prompt_len:]) of one RewardDataset sequence.

    Rebuilds the exact string ``RewardDataset.__getitem__`` tokenizes (``(prompt + response).rstrip("\\n")``, then
    ``" " + eos`` unless it already ends with EOS), tokenizes it the same way with ``return_offsets_mapping`` and
    checks that the ids are ``ids``. Spans are relative to the response text (the string after the prompt);
    a token that straddles the prompt/response boundary is clipped to the response. The final token is special
    (OpenRLHF forces EOS there). ``MappingError`` if max_len truncated the sequence (its last text token was
    replaced by EOS: the response text is cut, and differently for another tokenizer).
    """
    text = (prompt + response).rstrip("\n")
    if not text.endswith(tokenizer.eos_token):
        text += " " + tokenizer.eos_token
    enc = tokenizer(text, max_length=max_len, padding=False, truncation=True, add_special_tokens=False,
                    return_offsets_mapping=True)
    got = list(enc["input_ids"])
    if len(got) != len(ids) or got[:-1] != list(ids[:-1]):
        raise RuntimeError("re-tokenizing with offsets did not give RewardDataset's ids (tokenizer "
                           f"{getattr(tokenizer, 'name_or_path', '?')!r}): cannot map its tokens")
    if got[-1] != tokenizer.eos_token_id:
        raise MappingError(f"the sequence was truncated at --data.max_len {max_len} "
                           f"({getattr(tokenizer, 'name_or_path', '?')!r} side): the response text is cut")
    specials = special_ids(tokenizer) if specials is None else specials
    shift, last = len(prompt), len(got) - 1
    tokens = []
    for t in range(prompt_len, len(got)):
        start, end = enc["offset_mapping"][t]
        tokens.append((max(start - shift, 0), max(end - shift, 0), t == last or got[t] in specials))
    return text[shift:], tokens
