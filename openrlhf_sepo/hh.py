"""Preference pairs with no prompt column (the Anthropic HH-RLHF shape): split each pair into prompt + final answers.

HH rows hold two whole dialogues that share everything up to the last answer::

    chosen:   "\\n\\nHuman: Hi\\n\\nAssistant: Hello.\\n\\nHuman: A joke?\\n\\nAssistant: Why did the ..."
    rejected: "\\n\\nHuman: Hi\\n\\nAssistant: Hello.\\n\\nHuman: A joke?\\n\\nAssistant: No."

or two message lists whose last message is the assistant's answer. Without a split, OpenRLHF's
``RewardDataset(is_dpo=True)`` sees an empty prompt and would score and train the whole dialogue.
``split_prompt`` finds the shared prompt; ``--data.prompt_split`` (score_tokens, evaluate) hands the split row
to OpenRLHF's own preprocessing as a ``{"prompt", "chosen", "rejected"}`` row with a prompt key, so only the
final answers are response tokens.
"""

import os

PROMPT_SPLITS = ("none", "marker", "common_prefix")
DEFAULT_MARKER = "\n\nAssistant:"


def split_prompt(chosen, rejected, mode, marker=DEFAULT_MARKER):
    """-> ``(prompt, chosen_answer, rejected_answer)``, or None when the two sides share no prompt.

    Plain strings (``prompt + answer == side`` for both sides; the prompt is never empty or whitespace-only):

    - ``mode="marker"``: the prompt is ``chosen`` up to and including the LAST occurrence of ``marker`` in it;
      ``rejected`` must start with that same prompt. None when ``chosen`` has no marker or ``rejected`` does
      not start with the prompt.
    - ``mode="common_prefix"``: the longest common prefix of the two sides, cut back to just after the last
      ``marker`` inside it if it holds one (so when the sides part at an earlier assistant turn, the answers are
      everything from that turn on). If it holds none but a side contains the marker, the sides part before
      any assistant turn: None. If neither side contains the marker, the prefix is cut back to just before its
      last run of whitespace (so each answer starts with whitespace, as HH answers do after ``"Assistant:"``,
      and no word is split between prompt and answer: a tokenizer then sees the prompt's last token at the
      same place in both). None when nothing is shared or the cut leaves no (non-whitespace) prompt.

    Message lists (``[{"role", "content"}, ...]``, either mode): the prompt is the messages before the last one,
    which both sides must share exactly; the answers are the last messages, as one-message lists, each with
    role ``"assistant"``. None when the earlier messages differ, are empty, or a last message is not the
    assistant's. Identical sides are split like any other pair (their answers are identical).
    """
    if mode not in PROMPT_SPLITS[1:]:
        raise ValueError(f"mode must be one of {PROMPT_SPLITS[1:]}, got {mode!r}")
    if isinstance(chosen, list) and isinstance(rejected, list):
        if len(chosen) < 2 or chosen[:-1] != rejected[:-1]:
            return None
        if any(side[-1].get("role") != "assistant" for side in (chosen, rejected)):
            return None
        return chosen[:-1], chosen[-1:], rejected[-1:]
    if not (isinstance(chosen, str) and isinstance(rejected, str)):
        return None
    if mode == "marker":
        if not marker or marker not in chosen:
            return None
        prompt = chosen[: chosen.rindex(marker) + len(marker)]
        if not rejected.startswith(prompt):
            return None
    else:
        shared = os.path.commonprefix([chosen, rejected])
        if marker and marker in shared:
            prompt = shared[: shared.rindex(marker) + len(marker)]
        elif marker and (marker in chosen or marker in rejected):
            return None  # the sides part before any assistant turn (in a user turn): no shared prompt
        else:
            end = len(shared.rstrip())  # whitespace both share at the end belongs to the answers
            if end == len(shared):  # the sides diverge inside a word: back to the whitespace before it
                end = max((i for i, ch in enumerate(shared) if ch.isspace()), default=0)
            prompt = shared[:end].rstrip()
    if not prompt.strip():
        return None
    return prompt, chosen[len(prompt):], rejected[len(prompt):]


def marker_arg(value):
    """argparse type of ``--data.assistant_marker``: ``\\n`` and ``\\t`` typed on a command line mean a newline and
    a tab (a literal backslash-n in a dialogue marker is never what is meant)."""
    return value.replace("\\n", "\n").replace("\\t", "\t")
