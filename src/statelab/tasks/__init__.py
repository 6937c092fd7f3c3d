"""Task generators: pure functions of (config, seed).

- :mod:`statelab.tasks.base`: the :class:`Task` API (pools, disjoint train/test split, prompts, k-shot episodes).
- :mod:`statelab.tasks.words`: :data:`TASKS`, the word-function tasks (function-vector style).
- :mod:`statelab.tasks.synthetic`: token-level MQAR, phonebook lookup, copying and selective copying.
- :mod:`statelab.tasks.regression`: in-context linear (and sine) regression.

Worked example::

    >>> from statelab.tasks import TASKS, EpisodeConfig, make_episode
    >>> TASKS["country_capital"]("France")
    'Paris'
    >>> make_episode(EpisodeConfig(task="uppercase", k=1), seed=0).prompt.count("\\nA: ")
    2
"""

from statelab.tasks.base import (
    DEFAULT_TEMPLATE,
    SPLITS,
    Document,
    DocumentConfig,
    Episode,
    EpisodeConfig,
    Split,
    Task,
    build_prompt,
    check_template,
    format_example,
    format_query,
    make_document,
    make_episode,
    split_of,
)
from statelab.tasks.regression import RegressionConfig, make_regression_batch
from statelab.tasks.synthetic import (
    IGNORE_INDEX,
    SYNTHETIC_TASKS,
    CopyingConfig,
    MQARConfig,
    PhonebookConfig,
    SelectiveCopyingConfig,
    SyntheticBatch,
    TextRecallConfig,
    make_copying,
    make_mqar,
    make_phonebook,
    make_selective_copying,
    make_text_recall,
    render_phonebook,
)
from statelab.tasks.words import RELATED_TASKS, TASKS, WORD_TASKS, get_word_task, number_to_words, word_task_names

__all__ = [
    "DEFAULT_TEMPLATE",
    "IGNORE_INDEX",
    "SPLITS",
    "SYNTHETIC_TASKS",
    "CopyingConfig",
    "Document",
    "DocumentConfig",
    "MQARConfig",
    "PhonebookConfig",
    "RegressionConfig",
    "SelectiveCopyingConfig",
    "SyntheticBatch",
    "TextRecallConfig",
    "Episode",
    "EpisodeConfig",
    "Split",
    "Task",
    "RELATED_TASKS",
    "TASKS",
    "WORD_TASKS",
    "build_prompt",
    "check_template",
    "format_example",
    "format_query",
    "get_word_task",
    "make_document",
    "make_copying",
    "make_episode",
    "make_mqar",
    "make_phonebook",
    "make_regression_batch",
    "make_selective_copying",
    "make_text_recall",
    "number_to_words",
    "render_phonebook",
    "split_of",
    "word_task_names",
]
