"""Few-shot regression: the in-context regressor beside MAML, Meta-SGD, Reptile and a pretrained network on
the same tasks and query points (``evaluation.py``), and a probe of whether in-context prediction behaves
like gradient descent on the support set (``probe.py``). The task families live in
``icl_metarl.harness.regression_tasks``, where the gradient learners read them too."""
