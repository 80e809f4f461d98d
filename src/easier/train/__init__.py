"""Fine-tuning between removals: plain PyTorch loops, the objective, recovery aids, recipes.

- :mod:`.finetune`: :class:`FineTune` and the training / evaluation loops;
- :mod:`.objective`: the loss and hit counting for classification and token labels;
- :mod:`.recovery`: early stop, distillation from the dense teacher (:class:`Recovery`);
- :mod:`.recipes`: the paper's training recipes and a short CPU one.
"""
