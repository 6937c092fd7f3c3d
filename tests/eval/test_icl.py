"""Prompts from a template and greedy exact match by teacher forcing, on a tiny random Hugging Face Mamba."""

import pytest
import torch

from statelab.errors import ConfigError
from statelab.eval.icl import Prompter, exact_match


def test_exact_match_agrees_with_greedy_generation(hf_dir):
    from statelab.models.loading import load_model
    from statelab.models.tokenizer import load_tokenizer

    model = load_model(hf_dir).eval()
    tok = load_tokenizer(hf_dir)
    prefix = model.encode(torch.tensor([tok.encode("Q: cat\nA: CAT\n\n")]))
    items = []
    for word in ("dog", "sunflower", "a"):
        q = tok.encode(f"Q: {word}\nA: ")
        gen, _, _ = model.generate(torch.tensor([q]), max_new_tokens=3, state=prefix)
        items.append((q, gen[0].tolist()))
    # the model's own greedy continuation is an exact match; changing its last token breaks it
    assert exact_match(model, prefix, items) == [True, True, True]
    broken = [(q, a[:-1] + [(a[-1] + 1) % 256]) for q, a in items]
    assert exact_match(model, prefix, broken) == [False, False, False]
    # right padding in a batch changes nothing: batched == one by one
    assert exact_match(model, prefix, items + broken) == [exact_match(model, prefix, [it])[0] for it in items + broken]


def test_prompter_splits_the_template():
    from statelab.models.tokenizer import ByteTokenizer

    p = Prompter("Q: {x}\nA: {y}\n\n", ByteTokenizer())
    assert p.demos([("cat", "CAT")]) == "Q: cat\nA: CAT\n\n"
    assert p.query("dog") == "Q: dog\nA: " and p.answer("DOG") == "DOG\n"
    q, a = p.item("dog", "DOG")
    assert bytes(q + a) == b"Q: dog\nA: DOG\n"
    with pytest.raises(ConfigError):
        Prompter("{y} then {x}", ByteTokenizer())


def test_demo_ids_mark_the_answers():
    from statelab.models.tokenizer import ByteTokenizer

    p = Prompter("Q: {x}\nA: {y}\n\n", ByteTokenizer())
    ids, mask = p.demo_ids([("cat", "CAT"), ("a", "B")])
    assert bytes(ids) == b"Q: cat\nA: CAT\n\nQ: a\nA: B\n\n"
    assert bytes(i for i, m in zip(ids, mask, strict=True) if m) == b"CAT\nB\n"
