"""Training Medusa heads on a frozen base model, on a CPU.

- :mod:`.conversations`: the self-distillation file (JSONL of token ids);
- :mod:`.distill`: the base model's own answers to prompts, generated with vLLM
  (the only module here that imports vLLM, inside a function);
- :mod:`.hidden`: last hidden states of the frozen base model, computed once and cached;
- :mod:`.train`: the training loop (fused full-vocabulary cross-entropy, checkpoints, resume);
- :mod:`.evaluate`: per-head accuracy and the exact greedy tree-verification tau;
- :mod:`.calibrate`: growing a tree from measured accuracies.
"""
