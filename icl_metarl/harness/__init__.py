"""The harness both learners meet at: suites, the Agent protocol, the one rollout loop, the evaluator and
its report, baselines, the Meta-World adapter, files, errors, settings -> command line, the learner
registry, training budgets. It imports no learner; learners import it and register themselves."""
