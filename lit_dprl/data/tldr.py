"""Reddit TL;DR supervised fine-tuning data (stage 1 of the paper's summarisation task) in its public layouts.

Two row layouts are read (one row = one post with its reference summary = one privacy unit):

- OpenAI's ``summarize_from_feedback`` SFT files (``tldr_3_filtered/{train,valid,test}.jsonl``):
  fields ``subreddit``, ``title``, ``post``, ``summary`` (and ``id``). The prompt is the same query the
  reward model's comparisons get (``lit_dprl.data.preference_files.summarize_from_feedback_prompt``, the
  N+ recipe): ``"SUBREDDIT: r/{subreddit}\\n\\nTITLE: {title}\\n\\nPOST: {post}\\n\\nTL;DR:"``.
- CarperAI's ``openai_summarize_tldr`` layout: fields ``prompt`` (already formatted, ending in
  ``"TL;DR:"``) and ``label`` (the summary). The prompt is kept as it is.

In both, the completion is ``" " + summary.strip()`` (one space after "TL;DR:"). A ``user_id`` column, when
present, is kept so that splits stay user-disjoint.
"""

from __future__ import annotations

from datasets import Dataset

from lit_dprl.data.preference_files import summarize_from_feedback_prompt
from lit_dprl.data.splits import USER_COLUMN

OPENAI_SFT_FIELDS = ("subreddit", "title", "post", "summary")
CARPER_SFT_FIELDS = ("prompt", "label")
PROMPT_COLUMN = "prompt"
COMPLETION_COLUMN = "completion"


def tldr_completion(summary: object) -> str:
    """``" " + summary.strip()``; ``ValueError`` for a missing, non-text or blank summary."""
    if not isinstance(summary, str) or not summary.strip():
        raise ValueError(f"the summary must be non-empty text, got {summary!r}")
    return " " + summary.strip()


def openai_tldr_example(row: dict) -> dict[str, str]:
    """``{prompt, completion}`` of one OpenAI SFT row (``subreddit``, ``title``, ``post``, ``summary``)."""
    if not isinstance(row.get("post"), str) or not row["post"].strip():
        raise ValueError(f"the post must be non-empty text, got {row.get('post')!r}")
    return {
        PROMPT_COLUMN: summarize_from_feedback_prompt(row),
        COMPLETION_COLUMN: tldr_completion(row["summary"]),
    }


def carper_tldr_example(row: dict) -> dict[str, str]:
    """``{prompt, completion}`` of one CarperAI row (``prompt`` ending in "TL;DR:", ``label``)."""
    prompt = row["prompt"]
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"the prompt must be non-empty text, got {prompt!r}")
    return {PROMPT_COLUMN: prompt, COMPLETION_COLUMN: tldr_completion(row["label"])}


def tldr_sft_dataset(rows: Dataset, where: str) -> Dataset:
    """Rows in either TL;DR layout as columns ``prompt``, ``completion`` (and ``user_id`` when present).

    The layout is recognised by its fields (OpenAI's first); a bad row raises ``ValueError`` naming
    ``where`` and the row index.
    """
    fields = set(rows.column_names)
    if set(OPENAI_SFT_FIELDS) <= fields:
        to_example = openai_tldr_example
    elif set(CARPER_SFT_FIELDS) <= fields:
        to_example = carper_tldr_example
    else:
        raise ValueError(
            f"{where} is in no TL;DR SFT layout: its columns are {sorted(fields)}. Expected OpenAI's "
            f"{list(OPENAI_SFT_FIELDS)} or CarperAI's {list(CARPER_SFT_FIELDS)}."
        )
    examples: dict[str, list] = {PROMPT_COLUMN: [], COMPLETION_COLUMN: []}
    for index, row in enumerate(rows):
        try:
            example = to_example(row)
        except ValueError as err:
            raise ValueError(f"{where}, row {index}: {err}") from None
        for column, value in example.items():
            examples[column].append(value)
    if USER_COLUMN in fields:
        examples[USER_COLUMN] = list(rows[USER_COLUMN])
    return Dataset.from_dict(examples)
