"""Registers the gradient meta-learners with the harness: MAML, Meta-SGD and Reptile on Meta-World.

The three share one settings class, one training loop and one agent; each fixes its ``algo``.
"""

from gradient_meta.config import ALGOS, MODEL_TYPE, GradientAgentOptions, MetaRLConfig
from icl_metarl.harness.registry import Learner, register

SUMMARIES = {
    "maml": "MAML: a policy initialisation that one policy-gradient step adapts (second order through the step)",
    "meta-sgd": "Meta-SGD: MAML that also learns a step size per parameter",
    "reptile": "Reptile: move the initialisation toward the weights each task's policy-gradient steps reach",
}

for algo in ALGOS:
    register(Learner(
        name=algo,
        summary=SUMMARIES[algo],
        config=MetaRLConfig,
        train="gradient_meta.meta_rl:train_checkpoint",
        load_agent="gradient_meta.rl_agent:load_agent",
        model_type=MODEL_TYPE,
        fixed={"algo": algo},
        agent_options=GradientAgentOptions,
        distributed=True,
    ))
