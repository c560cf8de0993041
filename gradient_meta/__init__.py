"""gradient_meta: MAML, Reptile and Meta-SGD as pure functions of parameter dicts, vectorised over tasks."""
