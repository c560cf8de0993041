"""Registers the in-context learner with the harness: pretraining on histories -> an in-context agent."""

from icl_metarl.harness.registry import Learner, register
from icl_metarl.incontext.config import MODEL_TYPE, InContextAgentOptions, TrainConfig

register(Learner(
    name="icl",
    summary="pretrain the in-context policy on histories",
    config=TrainConfig,
    train="icl_metarl.incontext.train:train_checkpoint",
    load_agent="icl_metarl.incontext.agent:load_agent",
    model_type=MODEL_TYPE,
    agent_options=InContextAgentOptions,
    distributed=True,
))
