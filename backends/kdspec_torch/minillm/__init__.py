"""MiniLLM (Gu et al., ICLR 2024): on-policy reverse-KL distillation by policy gradient.

`math` holds the loss pieces as pure functions, `rollout` the teacher-mixed sampler with a KV
cache and the batched scoring of rollouts, `stage` the training loop of a `minillm` node.
"""
