"""Registers the gradient meta-learners with the harness: MAML, Meta-SGD and Reptile on Meta-World, and
MAML and Meta-SGD with the imitation outer loss (the supervision-matched variants).

All share one settings class, one training loop and one agent; each fixes its ``algo`` (and outer loss).
"""

from gradient_meta.config import ALGOS, MODEL_TYPE, GradientAgentOptions, MetaRLConfig
from icl_metarl.harness.registry import Learner, register

SUMMARIES = {
    "maml": "MAML: a policy initialisation that one policy-gradient step adapts (second order through the step)",
    "meta-sgd": "Meta-SGD: MAML that also learns a step size per parameter",
    "reptile": "Reptile: move the initialisation toward the weights each task's policy-gradient steps reach",
    "maml-imitate": "MAML whose reward-only inner step is meta-trained to imitate the expert on the states the "
                    "adapted policy visits (Guided Meta-Policy Search): the in-context agent's supervision",
    "meta-sgd-imitate": "Meta-SGD with the same imitation outer loss as maml-imitate",
}
#: learner name -> the settings it fixes
FIXED = {**{algo: {"algo": algo} for algo in ALGOS},
         "maml-imitate": {"algo": "maml", "outer_loss": "imitate"},
         "meta-sgd-imitate": {"algo": "meta-sgd", "outer_loss": "imitate"}}

for name, fixed in FIXED.items():
    register(Learner(
        name=name,
        summary=SUMMARIES[name],
        config=MetaRLConfig,
        train="gradient_meta.meta_rl:train_checkpoint",
        load_agent="gradient_meta.rl_agent:load_agent",
        model_type=MODEL_TYPE,
        fixed=fixed,
        agent_options=GradientAgentOptions,
        distributed=True,
        # A (T, 39) forward pass is tiny: with several threads on a busy machine it spends ~20 ms per step
        # waiting on its thread pool instead of ~0.1 ms, slower than the environments themselves.
        threads=1,
    ))
