"""Stateful language models: ``logits, state = model(input_ids, state=None)``."""

from statelab.models.base import RunOutput, ScoreResult, StatefulLM

__all__ = ["StatefulLM", "RunOutput", "ScoreResult"]
